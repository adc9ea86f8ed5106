"""Video datasets: clips of a fixed number of frames, read like images.

A clip is a video file (mp4, webm, avi, mkv, mov) or a frame folder (one folder of JPEG/PNG
frames, in name order, as SSv2 and Kinetics are often shared). Datasets are laid out as image
datasets are: class folders of clips (optionally under train/, val/, test/), or list files of
`path label` lines (VTAB-1k's split names, paths relative to the folder). Videos are decoded
with PyAV (`av` on PyPI), whose wheels carry FFmpeg's libraries: nothing to install beside
Python (torchcodec needs an FFmpeg installed on the system). Decoding runs in the DataLoader's
worker processes, as image decoding does.

`FrameSampling` picks each clip's frames deterministically: `frames` of them spread uniformly
over the clip (the first and the last included), or with `stride` every stride-th frame from the
first. A clip with fewer frames than asked repeats its last one (the loader counts such clips
and says so)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sidetune.datasets.sources import IMAGE_SUFFIXES
from sidetune.errors import SidetuneError

VIDEO_SUFFIXES = {".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v"}
DEFAULT_FRAMES = 8


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a clip are read: `frames` of them, uniformly over the clip, or (with
    `stride`) frames 0, stride, 2 stride, ...; short clips repeat their last frame."""

    frames: int = DEFAULT_FRAMES
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.frames < 1 or (self.stride is not None and self.stride < 1):
            raise SidetuneError(f"--frames must be at least 1 and --frame-stride at least 1 (got {self.frames}, "
                                f"{self.stride}).")

    def indices(self, available: int) -> list[int]:
        """The frame numbers read from a clip of `available` frames."""
        if available < 1:
            raise ValueError("a clip without frames")
        if self.stride is None:
            wanted = np.linspace(0, available - 1, self.frames) if self.frames > 1 else np.zeros(1)
            return [int(round(x)) for x in wanted]
        return [min(i * self.stride, available - 1) for i in range(self.frames)]

    def needed(self) -> int | None:
        """How many frames a clip needs to be read without repeating one (None: any, uniform)."""
        return None if self.stride is None else (self.frames - 1) * self.stride + 1

    def describe(self) -> dict:
        return {**asdict(self), "rule": "stride" if self.stride else "uniform",
                "short_clips": "the last frame repeated"}

    @classmethod
    def from_record(cls, record: dict | None) -> "FrameSampling | None":
        """The sampling a manifest's dataset record describes (None: an image dataset)."""
        return None if record is None else cls(record["frames"], record.get("stride"))


def is_clip(path: Path) -> bool:
    """A video file, or a folder whose files are frames (images only)."""
    if path.is_file():
        return path.suffix.lower() in VIDEO_SUFFIXES
    return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()) and not any(
        p.is_dir() for p in path.iterdir())


def frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def count_frames(path: Path) -> int:
    """The frames a clip has: files in a frame folder; a video's header count (decoding it when
    the header has none); 0 for a clip that cannot be read (extraction names it when it reads it)."""
    if path.is_dir():
        return len(frame_files(path))
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return stream.frames or sum(1 for _ in container.decode(stream))
    except (av.FFmpegError, IndexError, OSError):
        return 0


def read_frames(path: Path, sampling: FrameSampling) -> list[Image.Image]:
    """The sampled frames of one clip, as RGB images."""
    if path.is_dir():
        files = frame_files(path)
        chosen = sampling.indices(len(files))
        opened = {}
        for index in sorted(set(chosen)):
            with Image.open(files[index]) as frame:
                opened[index] = frame.convert("RGB")
        return [opened[index] for index in chosen]
    import av

    with av.open(str(path)) as container:
        frames = [frame.to_image().convert("RGB") for frame in container.decode(container.streams.video[0])]
    chosen = sampling.indices(len(frames))
    return [frames[index] for index in chosen]


@dataclass
class ClipSplit:
    """Clips (video files or frame folders) with labels: `image(i)` is clip i's sampled frames."""

    paths: list[Path]
    labels: np.ndarray
    root: Path
    sampling: FrameSampling

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> list[Image.Image]:
        return read_frames(self.paths[index], self.sampling)

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def fingerprint(self) -> str:
        digest = hashlib.sha256(repr(self.sampling).encode())
        for path, label in zip(self.paths, self.labels.tolist()):
            size = sum(p.stat().st_size for p in frame_files(path)) if path.is_dir() else path.stat().st_size
            named = path.relative_to(self.root) if path.is_relative_to(self.root) else path
            digest.update(f"{named}|{label}|{size}\n".encode())
        return digest.hexdigest()

    def keys(self) -> list[str]:
        return [f"{path.resolve()}|{label}" for path, label in zip(self.paths, self.labels.tolist())]

    def subset(self, indices: np.ndarray) -> "ClipSplit":
        return ClipSplit([self.paths[i] for i in indices], self.labels[indices], self.root, self.sampling)
