"""Where a cache lives: a local folder, or an fsspec URL (s3://, gs://, file://, memory://, ...).

zarr opens both kinds itself (a local store for paths, its fsspec store for URLs); this module
holds the few whole-cache operations around it — does it exist, is the folder empty, can we
write there, delete it — on the matching fsspec filesystem. Credentials for object stores come
from the environment, as the fsspec backend (s3fs, gcsfs) reads them; they are never written
into the cache."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec

from sidetune.errors import SidetuneError

REMOTE_EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}  # protocol -> `pip install sidetune[...]`


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


class Location:
    """A cache's place, given as a local path or a URL."""

    def __init__(self, value: str | Path):
        self.text = str(value) if is_url(value) else str(Path(value).expanduser())
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.text)
        except (ImportError, ValueError) as error:
            protocol = self.text.split("://", 1)[0]
            extra = REMOTE_EXTRAS.get(protocol)
            hint = f"pip install 'sidetune[{extra}]'" if extra else f"install the fsspec backend for {protocol}://"
            raise SidetuneError(f"Cannot open {self.text}: {error}. To use {protocol}:// locations, {hint}.") from error
        if "file" in self.fs.protocol:  # a str or a tuple of names
            self.text = self.root  # file:// URLs become plain paths: zarr's local store makes folders itself

    def __str__(self) -> str:
        return self.text

    def _child(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def has(self, name: str) -> bool:
        return self.fs.exists(self._child(name))

    def entries(self) -> list[str]:
        """Names directly inside; none when the location does not exist yet."""
        try:
            return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def check_writable(self) -> None:
        """Fail before any compute if the cache cannot be created or written here."""
        probe = self._child(f".sidetune-write-probe-{os.getpid()}")  # one per process: torchrun ranks probe at once
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except (OSError, PermissionError) as error:
            reason = getattr(error, "strerror", None) or error
            raise SidetuneError(f"Cannot write the cache to {self.text} ({reason}). Choose a writable --out.") from error

    def remove(self) -> None:
        self.fs.rm(self.root, recursive=True)
