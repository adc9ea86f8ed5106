"""Replacing a folder (a cache, a run) without deleting it first: the replacement is built beside
it, in `<name>.sidetune-new`, and swapped in by two renames only once it is complete. An
interrupted build leaves the old folder as it was (rerunning the command resumes the build); a
crash between the two renames is undone by `recover` the next time."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

STAGED_SUFFIX = ".sidetune-new"
RETIRED_SUFFIX = ".sidetune-old"


def staging_path(target: str | Path) -> Path:
    """Where the replacement of `target` is built."""
    target = Path(target)
    return target.with_name(target.name + STAGED_SUFFIX)


def swap_in(target: str | Path) -> None:
    """Put the finished replacement in `target`'s place and delete the old folder."""
    target = Path(target)
    retired = target.with_name(target.name + RETIRED_SUFFIX)
    if retired.exists():
        shutil.rmtree(retired)
    if target.exists():
        os.rename(target, retired)
    os.rename(staging_path(target), target)
    shutil.rmtree(retired, ignore_errors=True)


def recover(target: str | Path) -> None:
    """After a crash in `swap_in`: the old folder back where it was if the new one never took
    its place, else the old one's remains deleted."""
    target = Path(target)
    retired = target.with_name(target.name + RETIRED_SUFFIX)
    if retired.exists():
        if target.exists():
            shutil.rmtree(retired)
        else:
            os.rename(retired, target)
