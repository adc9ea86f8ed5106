"""What was written, recorded so that damage is found, named and repaired.

Every stored shard records, when it is written, the CRC-32 of its stored values (its tokens,
then its int8 scales) in `shard_checksum`, that of its augmented views (and their scales) in
`view_checksum` where the cache stores views, and the bytes of its objects on disk in
`shard_nbytes` (-1: a shard written before sidetune kept records). Every split's labels (and a
view's rows) record their CRC-32 in the manifest. Readers check a shard each time they read it
whole (a resident load reads each shard once; streaming reads whole shards too), `sidetune info`
compares the bytes on disk with the record (cheap: no data is read) and `info --verify` reads
every shard. Rerunning the `sidetune extract` command that made a cache recomputes exactly the
damaged shards (extraction is deterministic shard by shard, so the repair is bitwise the
original)."""

from __future__ import annotations

import zlib
from typing import Iterable

import numpy as np
import zarr

from sidetune.cache.location import Location
from sidetune.errors import SidetuneError

NO_RECORD = -1
RECORD_ARRAYS = ("shard_checksum", "shard_nbytes")
PLAIN_ARRAYS = ("tokens", "scales")  # checked by shard_checksum
VIEW_ARRAYS = ("views", "view_scales")  # checked by view_checksum
SHARDED_ARRAYS = (*PLAIN_ARRAYS, *VIEW_ARRAYS)


def checksum(*blocks: np.ndarray | None) -> int:
    """CRC-32 of the blocks' bytes, in order (None skipped)."""
    value = 0
    for block in blocks:
        if block is not None:
            value = zlib.crc32(np.ascontiguousarray(block).view(np.uint8), value)
    return value


def create_records(group: zarr.Group, num_shards: int) -> None:
    """A stored split's per-shard records, one chunk per shard (so ranks write their own);
    added to a split created before sidetune kept them, which then has none for its earlier shards."""
    if "shard_nbytes" not in group:
        group.create_array("shard_checksum", shape=(num_shards,), dtype="uint32", chunks=(1,), fill_value=0)
        group.create_array("shard_nbytes", shape=(num_shards,), dtype="int64", chunks=(1,), fill_value=NO_RECORD)
    if "views" in group and "view_checksum" not in group:
        group.create_array("view_checksum", shape=(num_shards,), dtype="uint32", chunks=(1,), fill_value=0)


def shard_keys(group: zarr.Group, shard: int) -> list[str]:
    """The store keys of a shard's objects: one per sharded array (tokens, int8 scales, views)."""
    arrays = [group[name] for name in SHARDED_ARRAYS if name in group]
    return [f"{array.path}/{array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))}" for array in arrays]


def stored_bytes(location: Location, group: zarr.Group, shard: int) -> int:
    """Bytes of the shard's objects on disk (0 for objects that are absent)."""
    return sum(location.object_size(key) or 0 for key in shard_keys(group, shard))


def record_shard(group: zarr.Group, location: Location, shard: int, tokens: np.ndarray,
                 scales: np.ndarray | None, views: np.ndarray | None = None, view_scales: np.ndarray | None = None) -> None:
    """Record a shard just written: its values' checksums and its bytes on disk."""
    group["shard_checksum"][shard] = checksum(tokens, scales)
    if views is not None:
        group["view_checksum"][shard] = checksum(views, view_scales)
    group["shard_nbytes"][shard] = stored_bytes(location, group, shard)


def shard_rows(shard: int, shard_images: int, num_images: int) -> slice:
    return slice(shard * shard_images, min((shard + 1) * shard_images, num_images))


def find_damaged(group: zarr.Group, location: Location, shards: Iterable[int], shard_images: int, num_images: int,
                 read: bool) -> dict[int, str]:
    """Shard -> what is wrong with it, for the shards given: objects missing or of another size
    than recorded; with `read`, also unreadable or holding other values than were written."""
    records = all(name in group for name in RECORD_ARRAYS)
    nbytes = group["shard_nbytes"][:] if records else None
    damaged = {}
    for shard in shards:
        recorded = NO_RECORD if nbytes is None else int(nbytes[shard])
        size = stored_bytes(location, group, shard)
        if recorded == NO_RECORD:  # no record: only a missing object tells
            if size == 0:
                damaged[shard] = "is missing"
            continue
        if size != recorded:
            damaged[shard] = "is missing" if size == 0 else f"holds {size:,} bytes where {recorded:,} were written"
        elif read:
            rows = shard_rows(shard, shard_images, num_images)
            for names, record in ((PLAIN_ARRAYS, "shard_checksum"), (VIEW_ARRAYS, "view_checksum")):
                if record not in group:
                    continue
                try:
                    blocks = [group[name][rows] for name in names if name in group]
                except Exception as error:  # zarr's codecs refuse a damaged object in many ways
                    damaged[shard] = f"cannot be read ({type(error).__name__})"
                    break
                if checksum(*blocks) != int(group[record][shard]):
                    damaged[shard] = "holds other values than were written"
                    break
    return damaged


def mismatched_shards(group: zarr.Group, start: int, blocks: list[np.ndarray | None], shard_images: int,
                      num_images: int, record: str = "shard_checksum") -> dict[int, str]:
    """Of the rows from `start` that `blocks` (tokens and scales; or views and their scales, with
    `record` "view_checksum") hold, the whole shards whose values differ from their record."""
    if not all(name in group for name in (*RECORD_ARRAYS, record)):
        return {}
    stop = start + len(blocks[0])
    first, last = -(-start // shard_images), stop // shard_images if stop < num_images else -(-stop // shard_images)
    if first >= last:
        return {}
    nbytes = group["shard_nbytes"][first:last]
    sums = group[record][first:last]
    damaged = {}
    for index, shard in enumerate(range(first, last)):
        if nbytes[index] == NO_RECORD:
            continue
        rows = shard_rows(shard, shard_images, num_images)
        local = slice(rows.start - start, rows.stop - start)
        if checksum(*(None if block is None else block[local] for block in blocks)) != int(sums[index]):
            damaged[shard] = "holds other values than were written"
    return damaged


def damaged_error(cache: str, split: str, damaged: dict[int, str], shard_images: int, num_images: int) -> SidetuneError:
    """One paragraph naming the damaged shards of a split and the repair."""
    described = "; ".join(f"shard {shard} (images {rows.start}-{rows.stop - 1}) {what}"
                          for shard, what in sorted(damaged.items())
                          for rows in [shard_rows(shard, shard_images, num_images)])
    return SidetuneError(
        f"Cache {cache} is damaged in split {split}: {described}. Rerun the `sidetune extract` command that made the "
        "cache (same --model, --dataset, --spec and --out): it checks every shard and recomputes exactly the damaged "
        f"ones. `sidetune info --verify {cache}` checks the whole cache."
    )


def labels_checksum(values: np.ndarray) -> int:
    """The CRC-32 of a split's labels (or a view's rows), as int64."""
    return checksum(np.asarray(values, dtype=np.int64))
