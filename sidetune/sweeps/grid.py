"""A sweep's configurations: a grid of values expanded to `TrainConfig`s, each value checked
against its setting's type and least value (a method option's are its own declaration's), the
method's default grid, and YAML grid files."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import yaml

import sweep_grids
from sidetune.declarations import declared_options
from sidetune.errors import SidetuneError
from sidetune.sidenets import SIDENETS, method_options
from sidetune.training import TrainConfig

FIELD_TYPES = {"lr": float, "weight_decay": float, "label_smoothing": float, "seed": int, "epochs": int,
               "warmup_epochs": int, "batch_size": int, "data_seed": int, "augment": str, "augment_magnitude": float,
               "views": int}
# The smallest value each numeric training setting takes (lr must be above it).
LOWEST = {"lr": 0.0, "weight_decay": 0.0, "label_smoothing": 0.0, "epochs": 1, "warmup_epochs": 0, "batch_size": 1,
          "augment_magnitude": 0.0, "views": 0}  # a method option's least value is its own declaration's
FLAGS = {"weight_decay": "wd"}


def checked_value(name: str, value: object, kind: type) -> object:
    """`value` of the sweep setting `name` as `kind`, or one line saying what is wrong."""
    flag = "--" + FLAGS.get(name, name).replace("_", "-")
    if kind is bool or kind is str:
        return value
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise SidetuneError(f"{flag} got {value!r}, which is not {'an integer' if kind is int else 'a number'}; "
                            f"give comma-separated values, e.g. {flag} {'8,16' if kind is int else '1e-3,3e-3'}.") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise SidetuneError(f"{flag} got {value!r}; give finite numbers, e.g. {flag} 1e-3,3e-3.")
    lowest = LOWEST.get(name) if name in FIELD_TYPES or name in LOWEST else declared_options()[name].minimum
    if lowest is not None and (number < lowest or (name == "lr" and number <= lowest)):
        bound = "above 0" if name == "lr" else f"at least {lowest}"
        raise SidetuneError(f"{flag} got {value!r}; it must be {bound}.")
    if name == "label_smoothing" and number >= 1:
        raise SidetuneError(f"{flag} got {value!r}; label smoothing must be below 1.")
    return number


def expand_grid(method: str, grid: dict[str, list], fixed: dict[str, object] | None = None) -> list[TrainConfig]:
    """Every combination of the grid's values (in order, the last key varying fastest), with
    the fixed settings; keys are TrainConfig fields (lr, weight_decay, seed, ...) or options of
    the method (rank, pool, ...)."""
    fixed, grid = dict(fixed or {}), dict(grid)
    options = method_options(method)
    known = set(FIELD_TYPES) | set(options)
    unknown = sorted((set(grid) | set(fixed)) - known)
    if unknown:
        raise SidetuneError(f"Unknown sweep setting {', '.join(unknown)} for method {method}; sweepable: "
                            f"{', '.join(sorted(known))}.")
    kinds = {**FIELD_TYPES, **{name: type(default) for name, default in options.items()}}
    for name, values in grid.items():
        if not values:
            raise SidetuneError(f"--{FLAGS.get(name, name).replace('_', '-')} has no values; give at least one.")
        grid[name] = [checked_value(name, value, kinds[name]) for value in values]
    fixed = {name: checked_value(name, value, kinds[name]) for name, value in fixed.items()}
    keys = list(grid)
    configs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        settings = {**fixed, **dict(zip(keys, values))}
        config_fields = {k: FIELD_TYPES[k](v) for k, v in settings.items() if k in FIELD_TYPES}
        config_options = {k: v for k, v in settings.items() if k in options}
        configs.append(TrainConfig.create(method, config_options, **config_fields))
    if len(set(configs)) != len(configs):
        raise SidetuneError("The sweep lists the same configuration twice; remove the repeated values.")
    return configs


def default_grid(method: str) -> dict[str, list]:
    """The values `sweep` tries for `method` when given none (docs/methods.md)."""
    method_options(method)  # refuses an unknown method
    return {name: list(values) for name, values in SIDENETS[method].default_grid.items()}



def sweep_configs(method: str, values: dict[str, list], fixed: dict[str, object] | None = None, *,
                  from_file: bool = False) -> tuple[list[TrainConfig], list[str]]:
    """What a sweep trains: the grid of `values` with `fixed` settings, where a sweep given no
    list of several values (and no grid file) tries the method's default grid for the settings
    it leaves out. Returns the configurations and the names of the defaulted settings."""
    defaulted: list[str] = []
    if not from_file and not any(isinstance(v, list) and len(v) > 1 for v in values.values()):
        defaults = {name: grid for name, grid in default_grid(method).items() if name not in values}
        defaulted = list(defaults)
        values = {**defaults, **values}
    return expand_grid(method, values, fixed), defaulted


GRIDS_DIR = Path(sweep_grids.__file__).parent  # package data, as cache_specs


def shipped_grids() -> list[str]:
    """The names of the grids that ship with sidetune (`--grid NAME`)."""
    return sorted(path.stem for path in GRIDS_DIR.glob("*.yaml"))


def load_grid(path: str | Path) -> tuple[str | None, dict[str, list], dict[str, object]]:
    """A YAML grid file: `method`, fixed settings at the top level, lists under `grid`.

        method: last
        epochs: 100
        grid: {lr: [3.0e-4, 1.0e-3], rank: [8, 16]}
    """
    path = Path(path)
    if not path.is_file() and (GRIDS_DIR / f"{path}.yaml").is_file():
        path = GRIDS_DIR / f"{path}.yaml"
    if not path.is_file():
        raise SidetuneError(f"No sweep grid {path}: pass a YAML file, or a shipped grid by name "
                            f"({', '.join(shipped_grids())}).")
    try:
        record = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SidetuneError(f"Could not read the sweep grid {path}: {error}.") from error
    if not isinstance(record, dict) or not isinstance(record.get("grid"), dict):
        raise SidetuneError(f"Sweep grid {path} must be a YAML mapping with a 'grid' mapping of lists "
                            "(e.g. grid: {lr: [1.0e-3, 3.0e-3]}), and fixed settings beside it.")
    grid = {k: v if isinstance(v, list) else [v] for k, v in record.pop("grid").items()}
    method = record.pop("method", None)
    return method, grid, record
