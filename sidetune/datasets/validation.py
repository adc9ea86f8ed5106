"""A validation split for every dataset: where a source has a training split and no validation
split, a seeded, stratified share of its training images is carved out as `val`; `train` is
the rest and `trainval` their union (the images the source called its training split). The
cache stores `trainval` once and keeps `train` and `val` as row views of it, so the selection
protocol (select on train -> val, retrain on trainval, report test) runs on any dataset."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sidetune.datasets.sources import ImageSource, UnionSplit
from sidetune.roles import SplitRoles

VALIDATION_FRACTION = 0.2  # VTAB-1k's 200 of 1000
VALIDATION_SEED = 0


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows), both sorted: round(fraction x n) of each class's n rows held
    out, drawn by a generator seeded with `seed`; a class of one image is kept whole."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(len(members) * fraction)) if len(members) > 1 else 0
        held.extend(members[:count])
        kept.extend(members[count:])
    return np.sort(np.asarray(kept, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def with_validation(source: ImageSource, fraction: float = VALIDATION_FRACTION,
                    seed: int = VALIDATION_SEED) -> ImageSource:
    """`source` with every role it can have: a carved `val` where it has training images and no
    validation split, and the union of train and val where it has both but not their union.
    The roles and the carving are recorded (`roles`, `validation`) and said in the notes."""
    roles = source.split_roles
    splits = dict(source.splits)
    if roles.val is None and roles.final_training is not None:
        pool_name = roles.final_training
        pool = splits.pop(pool_name)
        kept, held = stratified_split(pool.labels, fraction, seed)
        if not len(held):
            note = (f"no validation split, and none carved: {pool_name}'s classes are too small to hold "
                    f"{fraction:.0%} of any out; sweeps then need --protocol none")
            return replace(source, notes=[*source.notes, note])
        for name in (roles.train, roles.trainval):
            splits.pop(name, None)
        train, val = pool.subset(kept), pool.subset(held)
        splits = {"train": train, "val": val, "trainval": UnionSplit([train, val]), **splits}
        validation = {"carved_from": pool_name, "fraction": fraction, "seed": seed, "stratified": True,
                      "images": len(held)}
        note = (f"no validation split: val ({len(held):,} images, {fraction:.0%} of each class, seed {seed}) carved "
                f"from {pool_name}; train is the other {len(kept):,}, trainval both (stored once)")
        return replace(source, splits=splits, notes=[*source.notes, note], validation=validation,
                       roles=SplitRoles("train", "val", "trainval", roles.test))
    if roles.train and roles.val and roles.trainval is None:
        splits["trainval"] = UnionSplit([splits[roles.train], splits[roles.val]])
        note = f"trainval: {roles.train} and {roles.val} together (stored once), for retraining the selected model"
        return replace(source, splits=splits, notes=[*source.notes, note],
                       roles=replace(roles, trainval="trainval"))
    return source
