"""Video as LoSA adapts it: clips decoded from real video files (or read from frame folders),
every frame through the frozen image backbone once, the frames laid along the cache's tokens,
and side networks that mix time trained from the cache.

The clips: a bright sprite moving left or moving right over four frames. Every start position
appears once in each class, so the two classes hold the same frames and only their order
carries the class: a method blind to frame order scores exactly chance, and the temporal side
networks must learn it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import python_path
from sidetune.training import TrainConfig, train_group

FRAMES, STARTS, SIZE = 4, 9, 32


def sprite_frames(direction: int, start: int) -> list[np.ndarray]:
    positions = [start + 6 * t for t in range(FRAMES)]
    frames = []
    for x in positions if direction > 0 else positions[::-1]:
        frame = np.full((SIZE, SIZE, 3), 30, np.uint8)
        frame[12:20, x:x + 6] = 230
        frames.append(frame)
    return frames


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    """Lossless H.264 (every frame decodes to its pixels, whatever its place in the clip)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=4, options={"qp": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv444p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_frame_folder(folder: Path, frames: list[np.ndarray]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{index:03d}.png")


def write_clips(root: Path, as_video: bool = True) -> Path:
    for split, repeats in (("train", 2), ("val", 1), ("test", 1)):
        for start in range(STARTS):
            for name, direction in (("left", -1), ("right", 1)):
                for repeat in range(repeats):
                    frames = sprite_frames(direction, start)
                    if as_video:
                        write_video(root / split / name / f"{start}_{repeat}.mp4", frames)
                    else:
                        write_frame_folder(root / split / name / f"{start}_{repeat}", frames)
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_clips(tmp_path_factory.mktemp("video") / "sprites")


@pytest.fixture(scope="module")
def video_cache(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("video-cache") / "sprites"
    done = CliRunner().invoke(app, ["extract", "--model", "test_vit", "--no-pretrained", "--dataset", str(clips),
                                    "--frames", str(FRAMES), "--workers", "1", "--out", str(out)])  # a spawned decoder
    assert done.exit_code == 0, done.output
    return sidetune.open_cache(out)


def test_a_folder_of_mp4_clips_is_cached_with_a_frame_axis_along_the_tokens(video_cache):
    manifest = video_cache.manifest
    assert manifest["layout"]["frames"] == FRAMES and manifest["dataset"]["frames"]["rule"] == "uniform"
    assert video_cache.split("train").num_images == 2 * 2 * STARTS
    assert video_cache.split("test").stored.tokens.shape == (2 * STARTS, 7, FRAMES * 101, 64)  # 6 blocks, 1 + 10x10


def test_the_cached_tokens_of_a_clip_are_the_backbones_output_on_its_decoded_frames(video_cache, clips):
    from sidetune.backbones import Preprocessing, load_backbone
    from sidetune.datasets.video import FrameSampling, read_frames

    path = sorted((clips / "test" / "right").glob("*.mp4"))[3]
    frames = read_frames(path, FrameSampling(FRAMES))
    transform = Preprocessing.from_record(video_cache.manifest["preprocessing"]).transform()
    model = load_backbone("test_vit", pretrained=False).model
    with torch.no_grad():
        images = torch.stack([transform(frame) for frame in frames])
        expected = model.forward_features(images)  # (F, 101, 64), after the final norm
    from sidetune.datasets import load_source

    test = load_source(str(clips)).splits["test"]
    index = test.paths.index(path)
    cached = torch.from_numpy(video_cache.split("test").stored.tokens[index, -1].astype(np.float32))
    norm = video_cache.final_norm()
    normed = torch.nn.functional.layer_norm(cached, (64,), torch.from_numpy(norm["weight"]),
                                            torch.from_numpy(norm["bias"]), norm["eps"])
    torch.testing.assert_close(normed.view(FRAMES, 101, 64), expected, atol=2e-2, rtol=1e-2)  # float16 in the cache


def test_frame_folders_are_clips_too(tmp_path):
    from sidetune.datasets import load_source

    source = load_source(str(write_clips(tmp_path / "folders", as_video=False)), sampling=None)
    assert source.sampling.frames == 8 and len(source.splits["test"]) == 2 * STARTS
    frames = source.splits["test"].image(0)
    assert len(frames) == 8 and frames[0].size == (SIZE, SIZE)  # 4 frames read as 8: each repeated


def test_a_frame_order_blind_method_scores_chance_and_temporal_side_networks_learn_the_order(video_cache):
    def top1(method, options, **fields):
        settings = TrainConfig.create(method, options, warmup_epochs=2, batch_size=8, **fields)
        [result] = train_group(video_cache, [settings], "train", "test", "cpu")
        return result.top1

    assert top1("linear", {}, epochs=40) == pytest.approx(50.0)  # the same frames in both classes: exactly chance
    assert top1("losa", {"token_rank": 4, "channel_rank": 4}, epochs=60, lr=1e-2) >= 90.0
    assert top1("evl", {"rank": 16, "layers": 7}, epochs=100, lr=3e-3) >= 80.0


def test_factorised_losa_mixes_tokens_within_frames_and_frames_at_each_position(video_cache):
    from sidetune.training import sidenet_blueprint

    net = sidenet_blueprint(video_cache, "losa", {"token_rank": 4, "temporal_rank": 2}).build(1)
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters() if name.startswith("mixer1")}
    assert shapes["mixer1_w_t1"] == (1, 101, 4) and shapes["mixer1_w_f1"] == (1, FRAMES, 2)
    assert shapes["mixer1_w_f2"] == (1, 2, FRAMES)


def test_a_clip_that_cannot_be_decoded_is_named_with_the_fix(clips, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(clips, broken)
    (broken / "train" / "left" / "0_0.mp4").write_bytes(b"not a video")
    done = subprocess.run([sys.executable, "-m", "sidetune", "extract", "--model", "test_vit", "--no-pretrained",
                           "--dataset", str(broken), "--frames", "4", "--workers", "0", "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin",
                                                               "COLUMNS": "300"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "0_0.mp4" in done.stderr and "rerun the same command" in " ".join(done.stderr.split())


def test_train_and_sweep_run_on_the_video_cache_from_the_command_line(video_cache, tmp_path):
    trained = CliRunner().invoke(app, ["train", "--cache", str(video_cache.path), "--method", "losa", "--epochs", "2",
                                       "--token-rank", "4", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_split"] == "test"
    swept = CliRunner().invoke(app, ["sweep", "--cache", str(video_cache.path), "--method", "linear", "--lr", "0.03,0.3",
                                     "--epochs", "2", "--out", str(tmp_path / "sweep")])
    assert swept.exit_code == 0, swept.output


def test_predict_classifies_clips_and_evaluate_scores_a_split_live(video_cache, clips, tmp_path):
    from sidetune.evaluate import evaluate
    from sidetune.predict import predict

    run_dir, result = sidetune.train(video_cache, TrainConfig.create("linear", epochs=3), out=tmp_path / "run",
                                     train_split="train", eval_split="val")
    predictions = predict(run_dir, [clips / "test" / "left"])
    assert len(predictions) == STARTS and predictions[0].probabilities.shape == (2,)
    # the same clips through the cache and through predict: the same logits
    tokens = torch.from_numpy(video_cache.split("test").stored.tokens[:][:, [6]].astype(np.float32))
    from sidetune.runs import open_run
    from sidetune.training import restore_sidenet

    run = open_run(run_dir)
    net = restore_sidenet(run.cache_info, TrainConfig.from_record(run.config["config"]), run.state())
    from sidetune.datasets import load_source

    test = load_source(str(clips)).splits["test"]
    rows = [test.paths.index(p.path) for p in predictions]
    with torch.no_grad():
        cached = net(tokens[rows])[0]
    torch.testing.assert_close(torch.stack([p.logits for p in predictions]), cached, atol=1e-3, rtol=1e-3)
    assert evaluate(run_dir, "val")["top1"] == result.top1


def test_a_live_test_split_of_clips_scores_as_its_cached_copy(clips, tmp_path):
    """List files of clips with VTAB-1k's split names: test is left live, and its top-1 through
    the backbone equals the top-1 from a cache that stores it."""
    lines = {split: [f"{path.relative_to(clips)} {0 if path.parent.name == 'left' else 1}"
                     for path in sorted((clips / folder).rglob("*.mp4"))]
             for split, folder in (("train800", "train"), ("val200", "val"), ("test", "test"))}
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
        (clips / f"{split}.txt").write_text("\n".join(split_lines) + "\n")
    try:
        options = dict(model="test_vit", pretrained=False, workers=0, frames=FRAMES, spec="cls")
        sidetune.extract(dataset=str(clips), out=tmp_path / "live", **options)
        sidetune.extract(dataset=str(clips), out=tmp_path / "cached", splits=["train800val200", "test"], **options)
    finally:
        for split in lines:
            (clips / f"{split}.txt").unlink()
    live, cached = (sidetune.open_cache(tmp_path / name) for name in ("live", "cached"))
    assert live.split("test").kind == "live" and cached.split("test").kind == "stored"
    settings = TrainConfig.create("linear", epochs=3)
    [from_live] = train_group(live, [settings], "train800val200", "test", "cpu")
    [from_cache] = train_group(cached, [settings], "train800val200", "test", "cpu")
    assert from_live.top1 == from_cache.top1
