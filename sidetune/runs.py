"""Run directories: what `sidetune train` leaves behind, and reading it back.

    runs/<name>/
      config.json        the training config, the splits, and the cache's manifest (no split data)
      log.jsonl          one line per epoch: loss, training accuracy, eval accuracy when measured
      metrics.json       written last: the final result (its presence marks a finished run)
      model.safetensors  the side network's final state (best.safetensors: best on the eval split)
      curve.png          the learning curve
      checkpoint.pt      while training: the state to resume from (removed when finished)

A run is self-contained: `open_run` reads its record (config with the cache's manifest,
metrics, state files) back without the cache, and predict rebuilds the side network from it."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from sidetune.cache.location import Location
from sidetune.cache.manifest import CacheManifest
from sidetune.cache.plan import disk_is_full
from sidetune.errors import SidetuneError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.jsonl"
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
CURVE_FILE = "curve.png"
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = "run.lock"  # while `train` (or `sweep`, in a sweep folder) writes the folder


@contextlib.contextmanager
def disk_full_said(folder: Path, kept: str) -> Iterator[None]:
    """A disk that fills while `folder` is written becomes one paragraph: what was `kept`, and
    that rerunning the command resumes once there is space (files are replaced atomically, so
    none is left half written)."""
    try:
        yield
    except Exception as error:
        if disk_is_full(error):
            raise SidetuneError(f"The disk holding {folder} is full. {kept} Free some space and rerun the same command "
                                "to resume.") from None
        raise


def default_run_dir(cache_path: str | Path, method: str, now: dt.datetime | None = None) -> Path:
    """runs/<cache name>-<method>-<YYYYmmdd-HHMMSS>."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(str(cache_path).rstrip('/')).name}-{method}-{stamp}"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` to a temporary file beside `path`, then rename: a reader never sees half a file,
    and a write that fails (a full disk) leaves the old file and no temporary one."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


RETRAIN = "Train the run again: rerun its `sidetune train` command with --overwrite."


def read_record(path: Path, needs: tuple[str, ...] = (), fix: str = RETRAIN) -> dict:
    """A JSON record a run or sweep wrote (config.json, metrics.json, sweep.json); one that is
    damaged (not JSON, not an object, without the keys `needs`) is an error naming it and `fix`."""
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SidetuneError(f"{path} is damaged (not JSON: {error}). {fix}") from None
    missing = [key for key in needs if key not in record] if isinstance(record, dict) else list(needs)
    if not isinstance(record, dict) or missing:
        what = f"lacks {', '.join(missing)}" if isinstance(record, dict) else f"holds a {type(record).__name__}"
        raise SidetuneError(f"{path} is damaged (it {what}). {fix}")
    return record


def write_json(path: Path, record: dict | list) -> None:
    write_atomically(path, lambda target: target.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n"))


def _jsonable(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    data = save({name: tensor.contiguous() for name, tensor in state.items()})  # in memory: a full disk is an OSError
    write_atomically(path, lambda target: target.write_bytes(data))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A saved state; a damaged file is an error naming it and the fix."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors' own error for a cut or altered file
        raise SidetuneError(f"{path} is damaged ({type(error).__name__}: {error}). {RETRAIN}") from None


def save_checkpoint(path: Path, record: dict) -> None:
    """Write a checkpoint: plain data (GroupState.to_record), replaced atomically."""
    buffer = io.BytesIO()
    torch.save(record, buffer)  # in memory: writing it is then Python's, so a full disk is an OSError (ENOSPC)
    write_atomically(path, lambda target: target.write_bytes(buffer.getvalue()))


def load_checkpoint(path: Path):
    """A checkpoint's plain data. One written before checkpoints were plain data is a pickled
    GroupState, read as such (our own file, never downloaded), its classes found where they
    live now."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as refused:
            if "weights_only" not in str(refused):
                raise
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_MovedClasses)
    except Exception as error:  # cut short or altered: torch and pickle fail in many ways
        raise damaged_checkpoint(path, error) from None


def damaged_checkpoint(path: Path, error: BaseException) -> SidetuneError:
    """The error for a checkpoint that cannot be read or is not one."""
    return SidetuneError(
        f"The checkpoint {path} is damaged ({type(error).__name__}), so the run cannot resume from it. Delete it to "
        "train this run again from its first epoch (rerun the same command), or pass --overwrite.")


class _MovedClasses:
    """pickle, with the module the training state's classes lived in before sidetune/training/."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            return super().find_class("sidetune.training.state" if module == "sidetune.engine" else module, name)

    load = staticmethod(pickle.load)


def writing(folder: Path, what: str):
    """Hold the run folder's lock while `what` writes it (created if need be): a second writer
    is refused in one line; the lock dies with its process, and is removed when the writer ends."""
    return Location(str(folder)).exclusive(LOCK_FILE, what)


def prepare_run_dir(out: Path, config_record: dict, replace_other: bool = False) -> bool:
    """Create `out` for a run with this config; True when an interrupted run of the same
    config is there to resume. A finished run, another config's run, or a folder that is not
    a run is refused; with `replace_other` (a replacement built beside a run) any other run
    there is deleted and one of the same config resumed."""
    config_path = out / CONFIG_FILE
    if out.exists() and not config_path.is_file() and any(path.name != LOCK_FILE for path in out.iterdir()):
        raise SidetuneError(f"{out} exists and is not a sidetune run directory; choose another --out.")
    if config_path.is_file():
        if replace_other and ((out / METRICS_FILE).is_file() or not _same_config(config_path, config_record)):
            for path in out.iterdir():  # all but the lock its writer holds
                if path.name != LOCK_FILE:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif (out / METRICS_FILE).is_file():
            raise SidetuneError(f"{out} already holds a finished run. Choose another --out, or pass --overwrite to replace it.")
        elif _comparable(read_record(config_path, fix=OVERWRITE)) != _comparable(config_record):
            raise SidetuneError(f"{out} holds an unfinished run with other settings. Rerun with its settings to resume "
                                "it, choose another --out, or pass --overwrite to replace it.")
        else:
            return (out / CHECKPOINT_FILE).is_file()
    out.mkdir(parents=True, exist_ok=True)
    write_json(config_path, config_record)
    return False


OVERWRITE = "Pass --overwrite to replace the run, or choose another --out."


def _same_config(path: Path, config_record: dict) -> bool:
    try:
        return _comparable(read_record(path)) == _comparable(config_record)
    except SidetuneError:  # damaged: not the same
        return False


def _comparable(record: dict) -> str:
    from sidetune.training import TrainConfig  # lazily: the training package is the heavier one

    fields = {k: v for k, v in record.items() if k not in ("created", "device")}
    if "config" in fields:  # a config written before a field existed has that field at its default
        fields["config"] = TrainConfig.from_record(fields["config"]).describe()
    return json.dumps(fields, sort_keys=True, default=_jsonable)


@dataclass
class Run:
    """A finished run read back from its directory."""

    path: Path
    config: dict  # config.json
    metrics: dict  # metrics.json

    @property
    def cache_manifest(self) -> dict:
        return self.config["cache_manifest"]

    @property
    def cache_info(self) -> CacheManifest:
        """The manifest of the cache it was trained from, typed and read-only."""
        return CacheManifest(self.cache_manifest)

    @property
    def class_names(self) -> list[str]:
        return self.cache_info.class_names

    def state(self, which: str = "last") -> dict[str, torch.Tensor]:
        """The side network's state: 'last' (final epoch) or 'best' (best on the eval split)."""
        path = self.path / (MODEL_FILE if which == "last" else BEST_FILE)
        if not path.is_file():
            raise SidetuneError(f"Run {self.path} has no {path.name}"
                                + (" (the best state is kept when training with --eval-every)." if which == "best" else "."))
        return load_state(path)


def open_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise SidetuneError(f"{path} is not a sidetune run directory (no {CONFIG_FILE}); pass a folder written by `sidetune train`.")
    if not (path / METRICS_FILE).is_file():
        raise SidetuneError(f"Run {path} did not finish (no {METRICS_FILE}). Rerun the same `sidetune train` command to resume it.")
    return Run(path, read_record(path / CONFIG_FILE, ("config", "cache_manifest", "cache")),
               read_record(path / METRICS_FILE, ("method", "top1", "train_split", "eval_split")))
