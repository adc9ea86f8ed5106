"""Split roles: which split of a dataset (and of its cache) trains, which selects, which is
trained on for the final model, and which is reported.

    train     trains every configuration while selecting      (VTAB-1k: train800)
    val       scores them to select the best                  (val200)
    trainval  trains the selected ones again: train and val   (train800val200)
    test      reports the selected ones, once                 (test)

A dataset declares its roles when it is read (sidetune/datasets/validation.py carves a
validation split where it has none) and the cache's manifest records them; caches written
before roles were recorded get them from their split names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable, Mapping

ROLES = ("train", "val", "trainval", "test")
ROLE_NAMES: dict[str, tuple[str, ...]] = {  # split names that take a role, in order of preference
    "train": ("train800", "train"),
    "val": ("val200", "val", "valid", "validation"),
    "trainval": ("train800val200", "trainval"),
    "test": ("test",),
}


@dataclass(frozen=True)
class SplitRoles:
    """The split (by name) that plays each role; None where no split does."""

    train: str | None = None
    val: str | None = None
    trainval: str | None = None
    test: str | None = None

    @classmethod
    def from_names(cls, names: Iterable[str]) -> "SplitRoles":
        """Roles read from conventional split names (train800 or train, val200 or val ...)."""
        present = list(names)
        return cls(**{role: next((name for name in candidates if name in present), None)
                      for role, candidates in ROLE_NAMES.items()})

    @classmethod
    def from_record(cls, record: Mapping[str, str | None] | None, names: Iterable[str]) -> "SplitRoles":
        """Recorded roles (a manifest's) restricted to the splits present, else roles from the names."""
        present = list(names)
        if record is None:
            return cls.from_names(present)
        return cls(**{role: record.get(role) if record.get(role) in present else None for role in ROLES})

    def record(self) -> dict[str, str | None]:
        return asdict(self)

    def only(self, names: Iterable[str]) -> "SplitRoles":
        """These roles, kept only for the splits in `names`."""
        present = set(names)
        return replace(self, **{role: None for role, name in asdict(self).items() if name not in present})

    @property
    def can_select(self) -> bool:
        """Whether the selection protocol can run: select on train -> val, retrain on trainval,
        report test."""
        return None not in (self.train, self.val, self.trainval, self.test)

    @property
    def final_training(self) -> str | None:
        """The split a final model trains on: train and val together where they exist."""
        return self.trainval or self.train

    def describe(self) -> str:
        """`train train800, val val200, ...` for the roles that are played."""
        return ", ".join(f"{role} {name}" for role, name in asdict(self).items() if name is not None) or "none"
