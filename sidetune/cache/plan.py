"""Planning a cache before any compute: which splits are stored, which are views of a stored
split (every image already there), which are left to live evaluation; the bytes each takes;
and whether they fit the free space where the cache goes."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sidetune.cache.codec import Codec
from sidetune.cache.location import Location, is_url
from sidetune.cache.spec import CacheSpec
from sidetune.errors import SidetuneError

FREE_MARGIN = 1.02  # zarr metadata and the manifest beside the arrays


@dataclass
class SplitPlan:
    name: str
    kind: str  # "stored", "view" or "live"
    num_images: int
    nbytes: int = 0
    parent: str | None = None  # a view's stored split
    rows: np.ndarray | None = field(default=None, repr=False)  # a view's rows in it
    views: int = 0  # a stored split's augmented views of each image (`extract --views`)


@dataclass
class CachePlan:
    """What `extract` will write: per split, and in all, against the free space at `out`."""

    out: str
    spec: str
    splits: list[SplitPlan]
    free_bytes: int | None  # None: not known (an object store)
    notes: list[str] = field(default_factory=list)  # what the dataset's reading decided (a carved validation split)
    warnings: list[str] = field(default_factory=list)  # what is likely a mistake in the data (sidetune.datasets.check_data)

    @property
    def nbytes(self) -> int:
        return sum(split.nbytes for split in self.splits)

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.nbytes * FREE_MARGIN <= self.free_bytes

    def describe(self) -> str:
        """One line per split."""
        lines = []
        for split in self.splits:
            how = {"stored": "stored" + (f" with {split.views} augmented views" if split.views else ""),
                   "view": f"rows of {split.parent}", "live": "live (through the backbone)"}[split.kind]
            lines.append(f"{split.name}: {split.num_images:,} images, {how}, {human_bytes(split.nbytes)}")
        return "\n".join(lines)


def split_layout(splits: dict[str, list], live: set[str]) -> dict[str, SplitPlan]:
    """Each split (named, with its images' keys) stored, a view of a stored split holding all
    its images (the largest candidate), or live; in the order of `splits`."""
    candidates = sorted((name for name in splits if name not in live), key=lambda name: -len(splits[name]))
    index: dict[str, dict[str, int]] = {}  # stored split -> image key -> row
    plans: dict[str, SplitPlan] = {}
    for name in candidates:
        keys = splits[name]
        parent = next((p for p, rows in index.items() if all(key in rows for key in keys)), None)
        if parent is None:
            index[name] = {}
            for row, key in enumerate(keys):
                index[name].setdefault(key, row)
            plans[name] = SplitPlan(name, "stored", len(keys))
        else:
            rows = np.array([index[parent][key] for key in keys], dtype=np.int64)
            plans[name] = SplitPlan(name, "view", len(keys), parent=parent, rows=rows)
    for name in live:
        plans[name] = SplitPlan(name, "live", len(splits[name]))
    return {name: plans[name] for name in splits}


def split_nbytes(plan: SplitPlan, token_shape: tuple[int, ...], codec: Codec) -> int:
    """Bytes on disk: tokens for a stored split; row indices and labels for a view; labels
    for a live split."""
    labels = 8 * plan.num_images
    if plan.kind == "stored":
        return plan.num_images * codec.image_nbytes(token_shape) * (1 + plan.views) + labels
    return labels + (8 * plan.num_images if plan.kind == "view" else 0)


def free_bytes(out: str | Path) -> int | None:
    """Free bytes on the disk that will hold `out` (its nearest existing folder); None for an
    object store."""
    if is_url(out) and not Location(out).is_local:
        return None
    path = Path(str(Location(out))).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def plan_cache(out: str | Path, spec: CacheSpec, splits: dict[str, SplitPlan], token_shape: tuple[int, ...],
               existing_bytes: int = 0) -> CachePlan:
    """The plan with each split's bytes; `existing_bytes` (already written by an interrupted
    run) count as free, since they are kept."""
    codec = spec.codec()
    sized = [replace(plan, nbytes=split_nbytes(plan, token_shape, codec)) for plan in splits.values()]
    free = free_bytes(out)
    return CachePlan(str(out), spec.name, sized, None if free is None else free + existing_bytes)


def refuse_if_too_big(plan: CachePlan, alternatives: dict[str, int], live_option: int | None) -> None:
    """One paragraph naming the size, the free space, and what would fit."""
    if plan.fits:
        return
    fitting = [f"--spec {name} ({human_bytes(size)})" for name, size in alternatives.items()
               if size * FREE_MARGIN <= plan.free_bytes]
    if live_option is not None and live_option * FREE_MARGIN <= plan.free_bytes:
        fitting.append(f"caching every split but test, which train and sweep then evaluate live "
                       f"({human_bytes(live_option)}; leave test out of --splits)")
    options = ("These would fit: " + "; ".join(fitting) + ".") if fitting else "No shipped spec fits either."
    raise SidetuneError(
        f"The cache would take {human_bytes(plan.nbytes)} at {plan.out} (spec {plan.spec}), but only "
        f"{human_bytes(plan.free_bytes)} are free there. {options} Free some space, or choose --out on a "
        "larger disk; `sidetune extract ... --dry-run` shows the plan."
    )


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return str(count)


def disk_is_full(error: BaseException) -> bool:
    """Whether an exception (or one it wraps) is the disk running out of space."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (28, 122):  # ENOSPC, EDQUOT
            return True
        error = error.__cause__ or error.__context__
    return False

