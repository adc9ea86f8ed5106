"""Reading the cache: `open_cache(path)` gives the manifest, the splits and their arrays.

A split is stored (`CachedSplit`: its tokens are in the cache), a view (`ViewSplit`: rows of a
stored split, its images being all there) or live (`LiveSplit`: only labels; evaluated through
the backbone when needed, by sidetune/live.py). This module never imports timm or the
backbone: stage two runs where neither is installed. zarr 3.1 reads many small chunks slowly,
so `CachedSplit.load` reads whole shards at a time and returns one in-memory array; never
index zarr per training batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from sidetune.cache.codec import Codec, codec_for
from sidetune.cache.integrity import damaged_error, find_damaged, labels_checksum, mismatched_shards
from sidetune.cache.layout import TokenLayout
from sidetune.cache.location import Location
from sidetune.cache.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MANIFEST_KEY,
    READABLE_VERSIONS,
    CacheManifest,
    read_manifest,
)
from sidetune.errors import SidetuneError


def checked_labels(split: "CachedSplit | ViewSplit | LiveSplit", array: str = "labels") -> np.ndarray:
    """A split's labels (or a view's rows), checked against the checksum the manifest recorded
    when they were written (caches written before have none)."""
    recorded = split.record.get(f"{array}_checksum")
    try:
        values = split.group[array][:]
    except Exception as error:  # missing or unreadable
        if recorded is None:
            raise
        values, recorded = None, f"unreadable ({type(error).__name__})"
    if recorded is not None and (values is None or labels_checksum(values) != recorded):
        raise SidetuneError(
            f"The {array} of split {split.name} ({split.group.store}) are damaged: they differ from what was written. "
            "Rerun the `sidetune extract` command that made the cache: it rewrites them from the dataset.")
    return values


@dataclass
class CachedSplit:
    """A stored split: its tokens (and int8 scales) are in the cache. Every read of whole shards
    is checked against the records written with them (sidetune/cache/integrity.py)."""

    name: str
    group: zarr.Group
    record: dict
    layout: TokenLayout
    codec: Codec
    location: Location
    kind = "stored"

    @property
    def stages(self) -> list[int]:
        return self.layout.stages

    @property
    def tokens(self) -> zarr.Array:
        """The (N, S, T, D) token array on disk ((N, E) for stages of different shapes)."""
        return self.group["tokens"]

    @property
    def scales(self) -> zarr.Array | None:
        """int8 caches: the scales beside the tokens, (N, S, T, 1) or (N, S, 1, D)."""
        return self.group["scales"] if self.codec.quantized else None

    @property
    def labels(self) -> np.ndarray:
        return checked_labels(self)

    @property
    def num_images(self) -> int:
        return int(self.record["num_images"])

    @property
    def complete(self) -> bool:
        return bool(self.record["complete"])

    def damaged_shards(self, read: bool = False) -> dict[int, str]:
        """Shard -> what is wrong with it: objects missing or of another size than recorded
        (cheap); with `read`, also unreadable or holding other values than were written."""
        done = [int(i) for i in np.flatnonzero(self.group["shard_complete"][:] == 1)]
        return find_damaged(self.group, self.location, done, self.shard_size, self.num_images, read)

    def _read(self, rows: slice) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens and int8 scales as stored, every whole shard among `rows` checked."""
        try:
            tokens, scales = self.tokens[rows], None if self.scales is None else self.scales[rows]
        except Exception as error:  # a shard zarr cannot decode: find which
            first, last = rows.start // self.shard_size, -(-(rows.stop or self.num_images) // self.shard_size)
            damaged = find_damaged(self.group, self.location, range(first, last), self.shard_size, self.num_images, True)
            raise damaged_error(str(self.location), self.name, damaged or {first: f"cannot be read ({error})"},
                                self.shard_size, self.num_images) from None
        damaged = mismatched_shards(self.group, rows.start or 0, [tokens, scales], self.shard_size, self.num_images)
        if damaged:  # a missing or cut object says so more plainly than its values
            damaged.update(find_damaged(self.group, self.location, damaged, self.shard_size, self.num_images, False))
            raise damaged_error(str(self.location), self.name, damaged, self.shard_size, self.num_images)
        return tokens, scales

    @property
    def shards_done(self) -> int:
        return int(self.group["shard_complete"][:].sum())

    @property
    def nbytes_stored(self) -> int:
        arrays = [self.group[name] for name in ("tokens", "scales", "views", "view_scales") if name in self.group]
        return sum(int(array.nbytes_stored()) for array in arrays)

    @property
    def view_count(self) -> int:
        """The augmented views stored of each image (0: none; `extract --views`)."""
        return self.group["views"].shape[1] if "views" in self.group else 0

    def load_views(self, stages: Sequence[int] | None = None, count: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
        """The first `count` (default: all) augmented views of every image, as stored: (N, V, S',
        T, D) (or (N, V, E')) of the requested stages, and their int8 scales (None for a float
        type); every shard checked against the checksum written with it."""
        self.require_complete()
        count = self.view_count if count is None else count
        positions = self.stage_positions(stages)
        try:
            views = self.group["views"][:]
            scales = self.group["view_scales"][:] if "view_scales" in self.group else None
        except Exception as error:  # a shard zarr cannot decode: find which
            damaged = find_damaged(self.group, self.location, range(-(-self.num_images // self.shard_size)),
                                   self.shard_size, self.num_images, True)
            raise damaged_error(str(self.location), self.name, damaged or {0: f"cannot be read ({error})"},
                                self.shard_size, self.num_images) from None
        damaged = mismatched_shards(self.group, 0, [views, scales], self.shard_size, self.num_images, "view_checksum")
        if damaged:
            raise damaged_error(str(self.location), self.name, damaged, self.shard_size, self.num_images)
        n = len(views)
        views = self.layout.select(views[:, :count].reshape(n * count, *views.shape[2:]), positions)
        views = views.reshape(n, count, *views.shape[1:])
        if scales is not None:
            scales = scales[:, :count][:, :, positions] if positions != list(range(len(self.stages))) else scales[:, :count]
        return views, scales

    def stage_positions(self, stages: Sequence[int] | None) -> list[int]:
        """Positions on the stage axis of the requested backbone stages (all when None)."""
        if stages is None:
            return list(range(len(self.stages)))
        missing = [s for s in stages if s not in self.stages]
        if missing:
            raise SidetuneError(
                f"Split {self.name} stores stages {self.stages}, not {missing}. Extract with a cache "
                "spec that keeps them (e.g. --spec default keeps every stage)."
            )
        return [self.stages.index(s) for s in stages]

    @property
    def shard_size(self) -> int:
        """Images per shard: the unit of writing, resuming and reading."""
        return self.tokens.shards[0] if self.tokens.shards else self.tokens.chunks[0]

    def image_nbytes(self, stages: Sequence[int] | None = None) -> int:
        """Bytes one image takes in memory with the requested stages (tokens and scales, as stored)."""
        return self.codec.image_nbytes(self.layout.image_shape(stages))

    def read_stored(self, rows: slice, stages: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens as stored (and int8 scales, else None) of the images in `rows` (whole shards,
        to read fast), the requested stages only."""
        positions = self.stage_positions(stages)
        every = positions == list(range(len(self.stages)))
        # a chunk holds every stage; scales exist for uniform layouts only
        tokens, scales = self._read(rows)
        return self.layout.select(tokens, positions), scales if scales is None or every else scales[:, positions]

    def read_rows(self, rows: slice, stages: Sequence[int] | None = None) -> np.ndarray:
        """Tokens of the images in `rows`, decoded (int8: to float16)."""
        return self.codec.decode_numpy(*self.read_stored(rows, stages))

    def load_stored(self, stages: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole split as stored: one (N, S', T, D) array of the requested stages, and its
        int8 scales (None for a float type)."""
        positions = self.stage_positions(stages)
        self.require_complete()
        if positions == list(range(len(self.stages))):  # one read: zarr decodes every chunk concurrently (1.7x faster than by shard)
            return self._read(slice(0, self.num_images))
        outputs = [np.empty((self.num_images, *self.layout.image_shape(stages)), dtype=self.tokens.dtype)]
        if self.scales is not None:
            outputs.append(np.empty((self.num_images, len(positions), *self.scales.shape[2:]), dtype=self.scales.dtype))
        for start in range(0, self.num_images, self.shard_size):
            rows = slice(start, min(start + self.shard_size, self.num_images))
            for out, block in zip(outputs, self.read_stored(rows, stages)):
                out[rows] = block
        return outputs[0], outputs[1] if len(outputs) > 1 else None

    def load(self, stages: Sequence[int] | None = None) -> np.ndarray:
        """The whole split as one (N, S', T, D) array of the requested stages, decoded (int8:
        to float16)."""
        return self.codec.decode_numpy(*self.load_stored(stages))

    @property
    def stored(self) -> "CachedSplit":
        """The stored split holding this split's images: itself."""
        return self

    def require_complete(self) -> None:
        if not self.complete:
            raise SidetuneError(
                f"Split {self.name} is incomplete ({self.shards_done}/{self.record['num_shards']} shards). "
                "Rerun the same `sidetune extract` command to finish it."
            )


@dataclass
class ViewSplit:
    """A split whose images all lie in the stored split `parent`: stored as row indices."""

    name: str
    group: zarr.Group
    record: dict
    parent: CachedSplit
    kind = "view"

    @property
    def rows(self) -> np.ndarray:
        return checked_labels(self, "rows")

    @property
    def layout(self) -> TokenLayout:
        return self.parent.layout

    @property
    def stages(self) -> list[int]:
        return self.parent.stages

    @property
    def labels(self) -> np.ndarray:
        return checked_labels(self)

    @property
    def num_images(self) -> int:
        return int(self.record["num_images"])

    @property
    def complete(self) -> bool:
        return self.parent.complete

    @property
    def nbytes_stored(self) -> int:
        return int(self.group["rows"].nbytes_stored() + self.group["labels"].nbytes_stored())

    def image_nbytes(self, stages: Sequence[int] | None = None) -> int:
        return self.parent.image_nbytes(stages)

    def load_stored(self, stages: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The view's images as stored, gathered from the parent's (which is read whole)."""
        rows = self.rows
        return tuple(None if block is None else block[rows] for block in self.parent.load_stored(stages))

    def load(self, stages: Sequence[int] | None = None) -> np.ndarray:
        return self.parent.codec.decode_numpy(*self.load_stored(stages))

    @property
    def stored(self) -> CachedSplit:
        return self.parent

    def require_complete(self) -> None:
        self.parent.require_complete()


@dataclass
class LiveSplit:
    """A split kept out of the cache: its images go through the backbone when it is evaluated."""

    name: str
    group: zarr.Group
    record: dict
    kind = "live"

    @property
    def labels(self) -> np.ndarray:
        return checked_labels(self)

    @property
    def num_images(self) -> int:
        return int(self.record["num_images"])

    complete = True
    nbytes_stored = 0


Split = CachedSplit | ViewSplit | LiveSplit


@dataclass
class Cache:
    """A feature cache opened for reading. `backbone_weights` and `data_root` say where the
    backbone's weights and the dataset's images are when they moved since extraction: only a
    live split (evaluated through the backbone) needs them."""

    path: str
    root: zarr.Group
    manifest: dict
    backbone_weights: str | None = None
    data_root: str | None = None

    def relocate(self, weights: str | Path | None = None, data_root: str | Path | None = None) -> "Cache":
        """Where to find the backbone's weights and the dataset's images for live evaluation."""
        self.backbone_weights = None if weights is None else str(weights)
        self.data_root = None if data_root is None else str(data_root)
        return self

    @property
    def info(self) -> CacheManifest:
        """The manifest, typed and read-only: what code outside cache/ reads."""
        return CacheManifest(self.manifest)

    @property
    def live_splits(self) -> list[str]:
        return [name for name, record in self.manifest["splits"].items() if record.get("kind") == "live"]

    @property
    def codec(self) -> Codec:
        spec = self.manifest["spec"]
        return codec_for(spec["dtype"], spec.get("scale", "token"))

    @property
    def token_layout(self) -> TokenLayout:
        """The stored stages and their shapes."""
        return TokenLayout.from_manifest(self.manifest)

    @property
    def splits(self) -> dict[str, Split]:
        layout = self.token_layout
        stored = {name: CachedSplit(name, self.root[name], record, layout, self.codec, Location(self.path))
                  for name, record in self.manifest["splits"].items() if record.get("kind", "stored") == "stored"}
        splits: dict[str, Split] = {}
        for name, record in self.manifest["splits"].items():
            kind = record.get("kind", "stored")  # format 1 stored every split
            if kind == "stored":
                splits[name] = stored[name]
            elif kind == "view":
                splits[name] = ViewSplit(name, self.root[name], record, stored[record["view_of"]])
            else:
                splits[name] = LiveSplit(name, self.root[name], record)
        return splits

    def split(self, name: str) -> Split:
        splits = self.splits
        if name not in splits:
            raise SidetuneError(
                f"Cache {self.path} has no split '{name}'; it has {', '.join(splits) or 'none'}. "
                "Choose one of those, or extract the split with --splits."
            )
        return splits[name]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["dataset"]["class_names"])

    def shared_images(self, first: str, second: str) -> int:
        """How many images of split `second` are also images of split `first`. Exact for stored
        splits and views, which are rows of one stored split; a live split shares none with a
        split of another name (its images are not all in the cache, and their keys are not kept)."""
        a, b = self.split(first), self.split(second)
        if first == second:
            return b.num_images
        if a.kind == "live" or b.kind == "live" or a.stored.name != b.stored.name:
            return 0
        rows = lambda split: np.arange(split.num_images) if split.kind == "stored" else split.rows  # noqa: E731
        return int(np.isin(rows(b), rows(a)).sum())

    def damage(self, read: bool = False) -> dict[str, str]:
        """Split -> what is damaged in it and the repair (one paragraph), for the splits with
        damage: labels or rows that differ from their record, and stored shards whose objects
        are missing or of another size than recorded; with `read` (every shard read back: as
        long as a load), also shards that cannot be read or hold other values than were written."""
        found = {}
        for split in self.splits.values():
            try:
                split.labels
                if split.kind == "view":
                    split.rows
                if split.kind == "stored" and (damaged := split.damaged_shards(read)):
                    raise damaged_error(self.path, split.name, damaged, split.shard_size, split.num_images)
            except SidetuneError as error:
                found[split.name] = str(error)
        return found

    def final_norm(self) -> dict[str, np.ndarray] | None:
        """The backbone's frozen final LayerNorm (weight, bias, eps), or None."""
        record = self.manifest["backbone"].get("final_norm")
        if record is None:
            return None
        group = self.root["backbone"]
        return {"weight": group["final_norm_weight"][:], "bias": group["final_norm_bias"][:], "eps": record["eps"]}


def open_cache(path: str | Path) -> Cache:
    """Open a sidetune feature cache for reading (format 2, or a format-1 cache)."""
    path = str(path)
    try:
        root = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        raise SidetuneError(f"No sidetune cache at {path}. Create one with `sidetune extract --out {path} ...`.") from error
    if MANIFEST_KEY not in root.attrs:
        raise SidetuneError(f"{path} is a zarr store but not a sidetune cache (no '{MANIFEST_KEY}' attribute).")
    manifest = read_manifest(Location(path), dict(root.attrs))
    if manifest is None:
        raise SidetuneError(f"Cache {path} has no {MANIFEST_FILE}: its creation was interrupted. Rerun the "
                            "`sidetune extract` command that made it.")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise SidetuneError(
            f"Cache {path} has format version {manifest.get('format_version')}; this sidetune reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))} (and writes {FORMAT_VERSION}). Re-extract it."
        )
    return Cache(path, root, manifest)

