"""Video: what a per-frame cache takes, and what training from it saves.

    python benchmarks/video.py [--clips 32] [--frames 8] [--out FILE]

Storage (no data: the planning code `extract` uses): bytes per clip at ViT-B/16 for 8 and 16
frames with every shipped spec, and a Kinetics-400-sized training set (240,436 clips) with each.

Speed, on this machine's CPU: one epoch of side-network training (LoSA, factorised; LAST; the
linear probe) over `--clips` generated clips of `--frames` frames through a random
vit_tiny_patch16_224, from the video cache, against the paper's way: the backbone run over every
frame of every clip (forward only: it is frozen) and then the same side-network step, every
epoch. Each figure the fastest of 2 epochs after a warm-up one."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import sidetune
from common import WORK, machine, write_result
from sidetune.cache.layout import StageShape, TokenLayout
from sidetune.cache.spec import available_specs, load_spec

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_video import sprite_frames, write_video  # noqa: E402  the test's clips: real mp4 files

KINETICS_400_TRAIN = 240_436
VIT_B16 = TokenLayout(tuple(StageShape(stage, 197, 768, (14, 14), 1) for stage in range(13)))
MODEL = "vit_tiny_patch16_224"


def storage() -> list[dict]:
    rows = []
    for name in available_specs():
        if name.startswith("cnn-"):
            continue  # a CNN's specs: the shapes here are ViT-B/16's
        spec = load_spec(name)
        try:
            layout = spec.stored_layout(VIT_B16.shapes)
        except sidetune.SidetuneError:
            continue
        row = {"spec": name}
        for frames in (8, 16):
            per_clip = spec.codec().image_nbytes(layout.over_frames(frames).image_shape())
            row[f"clip_{frames}"] = per_clip
            row[f"kinetics_{frames}"] = per_clip * KINETICS_400_TRAIN
        rows.append(row)
    return rows


def speed(clips: int, frames: int) -> list[dict]:
    from sidetune.backbones import load_backbone, resolve_preprocessing
    from sidetune.features import stored_layout, stored_tokens
    from sidetune.training import TrainConfig, sidenet_blueprint
    from sidetune.training.data import LoadedSplits
    from sidetune.training.optim import StackedAdamW
    from sidetune.training.step import StackedStep

    folder = WORK / f"video-{clips}-{frames}"
    for index in range(clips):
        path = folder / ("left" if index % 2 else "right") / f"{index}.mp4"
        if not path.exists():
            write_video(path, sprite_frames(1 if index % 2 else -1, index % 9) * (frames // 4))
    sidetune.extract(MODEL, str(folder), WORK / f"video-cache-{clips}-{frames}", pretrained=False, device="cpu",
                     frames=frames, splits=["trainval"], batch_size=8)
    cache = sidetune.open_cache(WORK / f"video-cache-{clips}-{frames}")
    backbone = load_backbone(MODEL, pretrained=False)
    layout = stored_layout(cache.info.spec, backbone).over_frames(frames)
    transform = resolve_preprocessing("vtab", backbone).transform()
    from sidetune.datasets import load_source
    from sidetune.datasets.video import FrameSampling

    split = load_source(str(folder), sampling=FrameSampling(frames)).splits["trainval"]
    rows = []
    for method, options in (("linear", {}), ("last", {"rank": 8}), ("losa", {})):
        config = TrainConfig.create(method, options, batch_size=8)
        blueprint = sidenet_blueprint(cache, method, dict(config.options))
        net = blueprint.build(1)
        net.reset_parameters([0])
        data = LoadedSplits(cache, torch.device("cpu")).get("trainval", blueprint.stages)
        optimizer = StackedAdamW(net, torch.tensor([config.lr]), torch.tensor([config.weight_decay]))
        step = StackedStep(net, optimizer, torch.zeros(1), 8, data.sample_shape, data.dtype, cuda_graphs=False)
        positions = [cache.token_layout.stages.index(stage) for stage in blueprint.stages]

        def cache_epoch() -> None:
            for number, (tokens, labels) in enumerate(data.batches(8, torch.Generator().manual_seed(0)), 1):
                step(tokens, labels, number, 1.0)

        clips_pixels = [torch.stack([transform(frame) for frame in split.image(i)]) for i in range(len(split))]

        def paper_epoch() -> None:  # decoded frames in memory (generous to it): only the backbone runs every epoch
            for number, begin in enumerate(range(0, len(split), 8), 1):
                with torch.no_grad():
                    tokens = stored_tokens(backbone, cache.info.spec, layout, torch.stack(clips_pixels[begin:begin + 8]))
                labels = torch.as_tensor(split.labels[begin:begin + 8])
                step(layout.select(tokens, positions).to(data.dtype), labels, number, 1.0)

        timings = {}
        for way, epoch in (("cache", cache_epoch), ("paper", paper_epoch)):
            epoch()  # warm-up
            seconds = []
            for _ in range(2):
                started = time.perf_counter()
                epoch()
                seconds.append(time.perf_counter() - started)
            timings[way] = min(seconds)
        rows.append({"method": method, "cache_seconds": round(timings["cache"], 3), "paper_seconds": round(timings["paper"], 3),
                     "speedup": round(timings["paper"] / timings["cache"], 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    write_result("video", {"machine": machine(torch.device("cpu")), "model": MODEL, "clips": args.clips,
                           "frames": args.frames, "kinetics_400_train_clips": KINETICS_400_TRAIN,
                           "storage": storage(), "speed": speed(args.clips, args.frames)}, args.out)


if __name__ == "__main__":
    main()
