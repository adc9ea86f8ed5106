"""Writing the cache: create or reopen the zarr group, write shards, mark splits complete.

A stored split's group holds:
  tokens          (N, S, T, D) chunked by `chunk_images`, sharded by `shard_images`; (N, E) when
                  the stages differ in shape (sidetune/cache/layout.py)
  scales          (N, S, T, 1) or (N, S, 1, D) float32, sharded like tokens: int8 specs only
  labels          (N,) int64
  shard_complete  (num_shards,) uint8, one chunk per shard: 1 once that shard's tokens are written
  shard_absmax    (num_shards, S) float32, one chunk per shard: max |x| per stage before casting
  shard_checksum  (num_shards,) uint32 and shard_nbytes (num_shards,) int64, one chunk per
                  shard: the CRC-32 of the shard's stored values and its bytes on disk, recorded
                  when it is written (sidetune/cache/integrity.py)
  views           (N, V, S, T, D) (or (N, V, E)), sharded like tokens: V augmented views of each
                  image, in a cache extracted with --views (sidetune/views.py); view_scales beside
                  them for int8, and view_checksum (num_shards,) uint32
A view (a split whose images all lie in a stored split) holds `rows` (N,) int64 into that
split and its `labels`; a live split (evaluated through the backbone when needed) is only a
manifest record. Every shard has its own chunks in every array, so different processes can own
different shards without ever writing the same object. A split enters the manifest only after
its arrays exist, and is marked complete only after every shard is marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from sidetune.cache.integrity import create_records, find_damaged, labels_checksum, record_shard, shard_keys
from sidetune.cache.location import Location
from sidetune.cache.manifest import (
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST_FILE,
    MANIFEST_KEY,
    identity_differences,
    read_manifest,
    write_manifest,
)
from sidetune.errors import SidetuneError

IGNORED_ENTRIES = (LOCK_FILE, ".sidetune-write-probe")  # never make a folder "not a cache"


@dataclass
class SplitWriter:
    name: str
    group: zarr.Group
    num_images: int
    shard_images: int
    location: Location

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_images)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_images
        return start, min(start + self.shard_images, self.num_images)

    def pending_shards(self) -> list[int]:
        done = self.group["shard_complete"][:]
        return [int(i) for i in np.flatnonzero(done == 0)]

    def write_shard(self, shard: int, tokens: np.ndarray, absmax: np.ndarray, scales: np.ndarray | None = None,
                    views: np.ndarray | None = None, view_scales: np.ndarray | None = None) -> None:
        """Write one shard's tokens (and int8 scales, and augmented views), then its statistics
        and its record (checksums, bytes), then its completion mark."""
        start, stop = self.shard_bounds(shard)
        if tokens.shape[0] != stop - start:
            raise ValueError(f"shard {shard} of {self.name} needs {stop - start} images, got {tokens.shape[0]}")
        self.group["tokens"][start:stop] = tokens
        if scales is not None:
            self.group["scales"][start:stop] = scales
        if views is not None:
            self.group["views"][start:stop] = views
            if view_scales is not None:
                self.group["view_scales"][start:stop] = view_scales
        self.group["shard_absmax"][shard] = absmax
        record_shard(self.group, self.location, shard, tokens, scales, views, view_scales)
        self.group["shard_complete"][shard] = 1

    def damaged_shards(self, read: bool = True) -> dict[int, str]:
        """Of the shards marked written, those whose objects are missing, of another size than
        recorded, or (with `read`) unreadable or holding other values (sidetune/cache/integrity.py)."""
        done = [int(i) for i in np.flatnonzero(self.group["shard_complete"][:] == 1)]
        return find_damaged(self.group, self.location, done, self.shard_images, self.num_images, read)

    def recompute(self, shards: list[int]) -> None:
        """Mark shards as not written and delete what is left of them (zarr would read a damaged
        shard's index to write over it), so that extraction computes them again."""
        for shard in shards:
            self.group["shard_complete"][shard] = 0
            for key in shard_keys(self.group, shard):
                self.location.remove_object(key)


def _ignored(name: str) -> bool:
    return name.startswith(IGNORED_ENTRIES)


def holds_cache(location: Location) -> bool:
    """Whether `location` holds anything but a lock (a cache, or other files); refuses other files:
    --overwrite never replaces what is not a sidetune cache."""
    if all(_ignored(name) for name in location.entries()):
        return False
    if not (location.has("zarr.json") and MANIFEST_KEY in zarr.open_group(str(location), mode="r").attrs):
        raise SidetuneError(
            f"--overwrite refuses to replace {location}: it is not a sidetune cache. Point --out at a "
            "cache folder or a new folder."
        )
    return True


def _remove_cache(location: Location) -> None:
    """Delete a sidetune cache (keeping the lock file its writer holds), and never anything else."""
    if holds_cache(location):
        location.remove(keep=(LOCK_FILE,))


class CacheWriter:
    """Creates a cache (or reopens a compatible one) and hands out split writers."""

    def __init__(self, location: Location, root: zarr.Group, manifest: dict):
        self.location = location
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, manifest: dict, overwrite: bool = False, replace_other: bool = False
             ) -> "CacheWriter":
        """Create the cache at `path`, or reopen an existing one built with the same identity.

        An existing cache from another backbone, weights, preprocessing, spec or dataset is
        refused unless `overwrite`, which deletes it first, or `replace_other`, which deletes
        it only when it differs (a replacement being built beside a cache: resumed if it is
        this one)."""
        location = Location(path)
        if overwrite and not all(_ignored(name) for name in location.entries()):
            _remove_cache(location)
        if replace_other and location.has("zarr.json"):
            root = zarr.open_group(str(location), mode="r")
            try:
                earlier = read_manifest(location, dict(root.attrs)) if MANIFEST_KEY in root.attrs else None
            except SidetuneError:  # a damaged replacement: start it again
                earlier = None
            if earlier is None or earlier.get("format_version") != FORMAT_VERSION or identity_differences(earlier, manifest):
                location.remove(keep=(LOCK_FILE,))
        existing = None
        if location.has("zarr.json"):
            root = zarr.open_group(str(location), mode="r+")
            if MANIFEST_KEY not in root.attrs:
                raise SidetuneError(f"{path} is a zarr store but not a sidetune cache. Choose another --out or pass --overwrite.")
            existing = read_manifest(location, dict(root.attrs))
            if existing is None:  # created, then stopped before its first manifest: nothing to keep
                location.remove(keep=(LOCK_FILE,))
        elif not all(_ignored(name) for name in location.entries()):
            raise SidetuneError(f"Output folder {path} exists and is not a sidetune cache. Choose another --out or pass --overwrite.")
        if existing is not None:
            if existing.get("format_version") != FORMAT_VERSION:
                raise SidetuneError(
                    f"Cache {path} has format version {existing.get('format_version')}, this sidetune "
                    f"writes version {FORMAT_VERSION}. Pass --overwrite to rebuild it."
                )
            differences = identity_differences(existing, manifest)
            if differences:
                raise SidetuneError(
                    f"Cache {path} was built differently: {'; '.join(differences)}. Pass --out for a "
                    "new cache, or --overwrite to replace this one."
                )
            manifest = {**manifest, "created": existing["created"], "splits": existing.get("splits", {})}
        else:
            root = zarr.open_group(str(location), mode="a")  # "a", not "w": the writer's lock file stays
            root.attrs[MANIFEST_KEY] = {"format_version": FORMAT_VERSION, "manifest": MANIFEST_FILE}
        writer = cls(location, root, manifest)
        writer._save_manifest()
        return writer

    @classmethod
    def attach(cls, path: str | Path, manifest: dict) -> "CacheWriter":
        """Open a cache another process (torchrun's rank 0) has just created or verified with
        `open`, to write shards into; never writes the manifest itself."""
        location = Location(path)
        root = zarr.open_group(str(location), mode="r+")
        return cls(location, root, {**manifest, **read_manifest(location, dict(root.attrs))})

    def write_backbone_params(self, params: dict[str, np.ndarray]) -> None:
        group = self.root.require_group("backbone")
        for name, value in params.items():
            if name not in group:
                group.create_array(name, data=np.asarray(value, dtype=np.float32))

    def is_complete(self, split: str) -> bool:
        return bool(self.manifest["splits"].get(split, {}).get("complete"))

    def split(self, name: str, labels: np.ndarray, token_shape: tuple[int, ...],
              dtype: str, chunk_images: int, shard_images: int, compressor: str,
              scale_shape: tuple[int, int, int] | None = None, num_stages: int | None = None,
              views: int = 0) -> SplitWriter:
        """Create a stored split's arrays (or reopen them after an interruption). `token_shape`:
        one image's (S, T, D), or (E,) for stages of different shapes (then `num_stages` says
        how many); `scale_shape`: the per-image shape of int8 scales, None for a float dtype;
        `views`: how many augmented views of each image it stores beside its tokens."""
        num_stages = token_shape[0] if num_stages is None else num_stages
        num_images = len(labels)
        num_shards = -(-num_images // shard_images)
        if self.manifest["splits"].get(name, {}).get("kind", "stored") != "stored":
            del self.manifest["splits"][name]  # a live split (or a view) to be cached in full now: made again below
        if name in self.manifest["splits"]:
            group = self.root[name]
            stored_views = group["views"].shape[1] if "views" in group else 0
            if group["tokens"].shape != (num_images, *token_shape) or stored_views != views:
                raise SidetuneError(
                    f"Split {name} in {self.root.store} has shape {group['tokens'].shape} and {stored_views} views, "
                    f"expected {(num_images, *token_shape)} and {views}. Pass --overwrite to rebuild the cache."
                )
            create_records(group, num_shards)
            self._repair_labels(name, group, labels=labels)
            return SplitWriter(name, group, num_images, shard_images, self.location)
        group = self._fresh_group(name)
        group.create_array(
            "tokens", shape=(num_images, *token_shape), dtype=dtype,
            chunks=(chunk_images, *token_shape), shards=(shard_images, *token_shape),
            compressors=None if compressor == "none" else "auto", fill_value=0,
            dimension_names=("image", "stage", "token", "channel") if len(token_shape) == 3 else ("image", "element"),
        )
        if scale_shape is not None:
            group.create_array("scales", shape=(num_images, *scale_shape), dtype="float32",
                               chunks=(chunk_images, *scale_shape), shards=(shard_images, *scale_shape),
                               compressors=None, fill_value=0, dimension_names=("image", "stage", "token", "channel"))
        if views:
            group.create_array("views", shape=(num_images, views, *token_shape), dtype=dtype,
                               chunks=(chunk_images, views, *token_shape), shards=(shard_images, views, *token_shape),
                               compressors=None if compressor == "none" else "auto", fill_value=0)
            if scale_shape is not None:
                group.create_array("view_scales", shape=(num_images, views, *scale_shape), dtype="float32",
                                   chunks=(chunk_images, views, *scale_shape), shards=(shard_images, views, *scale_shape),
                                   compressors=None, fill_value=0)
        group.create_array("labels", data=np.asarray(labels, dtype=np.int64), chunks=(max(num_images, 1),))
        group.create_array("shard_complete", shape=(num_shards,), dtype="uint8", chunks=(1,), fill_value=0)
        group.create_array("shard_absmax", shape=(num_shards, num_stages), dtype="float32",
                           chunks=(1, num_stages), fill_value=0)
        create_records(group, num_shards)
        self.manifest["splits"][name] = {
            "kind": "stored", "num_images": num_images, "num_shards": num_shards, "complete": False, "absmax": None,
            "labels_checksum": labels_checksum(labels), **({"views": views} if views else {}),
        }
        self._save_manifest()
        return SplitWriter(name, group, num_images, shard_images, self.location)

    def open_split(self, name: str, num_images: int, shard_images: int) -> SplitWriter:
        """A stored split's arrays that another process (torchrun's rank 0) created, to write
        shards into; never touches the manifest."""
        return SplitWriter(name, self.root[name], num_images, shard_images, self.location)

    def reopen(self, name: str) -> None:
        """Mark a complete split incomplete again (some of its shards are to be recomputed)."""
        self.manifest["splits"][name]["complete"] = False
        self._save_manifest()

    def view(self, name: str, parent: str, rows: np.ndarray, labels: np.ndarray) -> str:
        """Record `name` as rows of the stored split `parent` (its images are all there). A split
        the cache holds already stays as it is; returns how the split is kept."""
        if name in self.manifest["splits"]:
            self._repair_labels(name, self.root[name], labels=labels, rows=rows)
            return self.manifest["splits"][name].get("kind", "stored")
        group = self._fresh_group(name)
        group.create_array("rows", data=np.asarray(rows, dtype=np.int64), chunks=(max(len(rows), 1),))
        group.create_array("labels", data=np.asarray(labels, dtype=np.int64), chunks=(max(len(labels), 1),))
        self.manifest["splits"][name] = {"kind": "view", "view_of": parent, "num_images": len(rows), "complete": True,
                                         "labels_checksum": labels_checksum(labels), "rows_checksum": labels_checksum(rows)}
        self._save_manifest()
        return "view"

    def live(self, name: str, labels: np.ndarray, fingerprint: str) -> str:
        """Record `name` as a split evaluated live, through the backbone, from the dataset's
        images (identified by `fingerprint`); only its labels are stored. A split the cache holds
        already (cached, say) stays as it is; returns how the split is kept."""
        if name in self.manifest["splits"]:
            self._repair_labels(name, self.root[name], labels=labels)
            return self.manifest["splits"][name].get("kind", "stored")
        group = self._fresh_group(name)
        group.create_array("labels", data=np.asarray(labels, dtype=np.int64), chunks=(max(len(labels), 1),))
        self.manifest["splits"][name] = {"kind": "live", "num_images": len(labels), "fingerprint": fingerprint,
                                         "complete": True, "labels_checksum": labels_checksum(labels)}
        self._save_manifest()
        return "live"

    def _repair_labels(self, name: str, group: zarr.Group, **arrays: np.ndarray) -> None:
        """Rewrite a split's labels (a view's rows) where they no longer match their record,
        from the dataset's, which match it (the dataset's identity is checked at open)."""
        record = self.manifest["splits"][name]
        for array, values in arrays.items():
            recorded = record.get(f"{array}_checksum")
            if recorded is None or recorded != labels_checksum(values):
                continue  # no record (an older cache), or the dataset's differ: nothing to repair from
            try:
                intact = labels_checksum(group[array][:]) == recorded
            except Exception:  # missing or unreadable
                intact = False
            if not intact:
                if array in group:
                    del group[array]
                group.create_array(array, data=np.asarray(values, dtype=np.int64), chunks=(max(len(values), 1),))

    def _fresh_group(self, name: str) -> zarr.Group:
        """An empty group for a split the manifest does not know yet (removing what an
        interrupted creation left)."""
        if name in self.root:
            del self.root[name]
        return self.root.create_group(name)

    def finish_split(self, writer: SplitWriter) -> bool:
        """Mark the split complete if every shard is written; returns whether it is."""
        if writer.pending_shards():
            return False
        absmax = writer.group["shard_absmax"][:].max(axis=0) if writer.num_shards else np.zeros(0)
        self.manifest["splits"][writer.name].update(complete=True, absmax=[float(v) for v in absmax])
        self._save_manifest()
        return True

    def _save_manifest(self) -> None:
        write_manifest(self.location, self.manifest)
