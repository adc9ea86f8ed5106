"""Where a cache lives: a local folder, or an fsspec URL (s3://, gs://, file://, memory://, ...).

zarr opens both kinds itself (a local store for paths, its fsspec store for URLs); this module
holds the few whole-cache operations around it — does it exist, is the folder empty, can we
write there, delete it — on the matching fsspec filesystem. Credentials for object stores come
from the environment, as the fsspec backend (s3fs, gcsfs) reads them; they are never written
into the cache."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

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
        if self.is_local:  # file:// URLs become plain paths: zarr's local store makes folders itself
            self.text = self.root

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

    def remove(self, keep: tuple[str, ...] = ()) -> None:
        """Delete the location, or everything in it but the entries named in `keep`."""
        if not keep:
            self.fs.rm(self.root, recursive=True)
            return
        for name in self.entries():
            if name not in keep:
                self.fs.rm(self._child(name), recursive=True)

    def local_bytes(self) -> int:
        """Bytes of the files under a local location (0 for an object store, or none there);
        files that vanish while it counts (another writer's renames) are skipped."""
        if not self.is_local:
            return 0
        total = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    continue
        return total

    @property
    def is_local(self) -> bool:
        return "file" in self.fs.protocol

    def object_size(self, key: str) -> int | None:
        """Bytes of the object `key` (a path below the location); None when there is none."""
        try:
            return int(self.fs.size(self._child(key)))
        except FileNotFoundError:
            return None

    def remove_object(self, key: str) -> None:
        """Delete the object `key` (a path below the location), if there is one."""
        try:
            self.fs.rm_file(self._child(key))
        except FileNotFoundError:
            pass

    def read_bytes(self, name: str) -> bytes | None:
        """The object `name`, or None when there is none."""
        try:
            return self.fs.cat_file(self._child(name))
        except FileNotFoundError:
            return None

    def write_atomically(self, name: str, data: bytes) -> None:
        """Replace the object `name` so that a reader sees the old or the new bytes, never a mix:
        on a local disk a temporary file renamed over it; on an object store one PUT (objects
        are replaced whole)."""
        if not self.is_local:
            self.fs.pipe_file(self._child(name), data)
            return
        target = Path(self._child(name))
        temporary = target.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    @contextlib.contextmanager
    def exclusive(self, name: str, what: str) -> Iterator[None]:
        """Hold an exclusive lock on the lock file `name` for `what` (a local disk; a no-op on
        object stores, which have no locks). A second holder is refused at once; the lock dies
        with its process, so a killed writer never leaves it held. The file is removed when the
        holder finishes (while still locked: a process that opened it meanwhile finds it gone and
        is refused rather than sharing the cache with the next writer)."""
        if not self.is_local:
            yield
            return
        self.fs.makedirs(self.root, exist_ok=True)
        path = Path(self._child(name))
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
                    raise BlockingIOError  # locked a file its holder removed on finishing: someone else's turn
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise SidetuneError(
                    f"{self.text} is being written by {holder}. Two writers would corrupt it: wait for that "
                    f"one to finish (or stop it), then rerun {what}; or choose another --out."
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{what} (pid {os.getpid()} on {socket.gethostname()})")
            handle.flush()
            try:
                yield
            finally:
                path.unlink(missing_ok=True)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
