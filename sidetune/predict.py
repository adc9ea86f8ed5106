"""Inference after training: images (or clips) -> the backbone recorded in the run's cache
manifest -> the trained side network -> class probabilities.

Features are computed exactly as extraction computed them (same preprocessing, precision,
stages, token selection and storage dtype), so an image that is in the cache gets the logits
the cached path gives. Unlike stage two, this imports timm: it runs the backbone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image

from sidetune.datasets.sources import IMAGE_SUFFIXES
from sidetune.datasets.video import FrameSampling, is_clip, read_frames
from sidetune.errors import SidetuneError


@dataclass
class Prediction:
    path: Path
    logits: torch.Tensor  # (C,)
    probabilities: torch.Tensor  # (C,)

    def top(self, class_names: list[str], k: int = 5) -> list[tuple[str, float]]:
        values, indices = self.probabilities.topk(min(k, len(class_names)))
        return [(class_names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]


def image_paths(inputs: Iterable[str | Path], clips: bool = False) -> list[Path]:
    """Files as given, folders expanded (recursively, sorted) to the images they hold; with
    `clips`, to the clips (video files, frame folders) they hold, a frame folder being one."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if clips and item.is_dir() and not is_clip(item):
            found = sorted(p for p in item.rglob("*") if is_clip(p))
            if not found:
                raise SidetuneError(f"Folder {item} holds no clips (video files or folders of frames).")
            paths.extend(found)
        elif clips and (item.is_dir() or item.is_file()):
            paths.append(item)
        elif item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise SidetuneError(f"Folder {item} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise SidetuneError(f"No such image or folder: {item}.")
    if not paths:
        raise SidetuneError("No images given; pass image files or folders.")
    return paths


def predict(run_dir: str | Path, inputs: Iterable[str | Path], *, which: str = "last",
            weights: str | Path | None = None, device: str = "auto", batch_size: int = 32) -> list[Prediction]:
    """Classify images (clips, for a run from a video cache: video files or frame folders, read
    as the cache's were) with a finished run: its side network (`which`: 'last' or 'best') on
    the features of the backbone its cache was built with."""
    from sidetune.backbones import Preprocessing, load_recorded_backbone
    from sidetune.compute import AUTOCAST_DTYPES, resolve_device
    from sidetune.features import as_read_from_cache
    from sidetune.runs import open_run
    from sidetune.training import TrainConfig, restore_sidenet

    run = open_run(run_dir)
    manifest = run.cache_info
    sampling = FrameSampling.from_record(manifest.dataset.get("frames"))
    paths = image_paths(inputs, clips=sampling is not None)
    torch_device = resolve_device(device)
    net = restore_sidenet(manifest, TrainConfig.from_record(run.config["config"]), run.state(which)).to(torch_device)
    backbone = load_recorded_backbone(manifest.backbone, weights)
    backbone.model.to(torch_device)
    transform = Preprocessing.from_record(manifest.preprocessing).transform()
    spec, layout = manifest.spec, manifest.layout
    positions = [layout.stages.index(stage) for stage in net.stages_needed()]

    predictions = []
    with torch.inference_mode():
        for begin in range(0, len(paths), batch_size):
            batch_paths = paths[begin:begin + batch_size]
            if sampling is None:
                images = torch.stack([transform(_read_image(path)) for path in batch_paths])
            else:  # (B, F, C, H, W)
                images = torch.stack([torch.stack([transform(frame) for frame in _read_clip(path, sampling)])
                                      for path in batch_paths])
            images = images.to(torch_device)
            tokens = as_read_from_cache(backbone, spec, layout, images, AUTOCAST_DTYPES[manifest.precision])
            logits = net(layout.select(tokens, positions))[0].float().cpu()
            for path, row in zip(batch_paths, logits):
                predictions.append(Prediction(path, row, row.softmax(-1)))
    return predictions


def _read_clip(path: Path, sampling: FrameSampling) -> list[Image.Image]:
    try:
        return read_frames(path, sampling)
    except Exception as error:
        raise SidetuneError(f"Could not read clip {path} ({type(error).__name__}: {error}). Pass video files "
                            "(mp4, webm, avi, mkv) or folders of frames that PyAV and PIL can open.") from None


def _read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:
        raise SidetuneError(f"Could not read image {path} ({type(error).__name__}: {error}). "
                            "Pass image files (or folders of them) that PIL can open.") from error
