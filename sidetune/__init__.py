"""sidetune: cache a frozen backbone's per-layer features once, then train many side networks
from the cache.

    import sidetune
    sidetune.extract("vit_b16", "dtd")            # stage one: writes ./cache/dtd
    cache = sidetune.open_cache("cache/dtd")      # the manifest, splits and arrays
    run_dir, result = sidetune.train("cache/dtd", sidetune.TrainConfig.create("last", {"rank": 16}))
    sidetune.predict(run_dir, ["photo.jpg"])      # the backbone again, then the side network
    sidetune.sweep("cache/dtd", sidetune.expand_grid("last", {"lr": [1e-3, 3e-3], "rank": [8, 16]}))

Importing sidetune never imports timm: stage two runs where timm is not installed. The names
below are imported on first use, so that a light module (sidetune.errors, the command line's
`--help`) does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

PUBLIC_API = {  # name -> the module it lives in
    "Cache": "sidetune.cache", "CachedSplit": "sidetune.cache", "CacheSpec": "sidetune.cache",
    "load_spec": "sidetune.cache", "open_cache": "sidetune.cache", "SidetuneError": "sidetune.errors",
    "evaluate": "sidetune.evaluate", "extract": "sidetune.extract", "plan_extraction": "sidetune.extract",
    "predict": "sidetune.predict", "expand_grid": "sidetune.sweeps", "sweep": "sidetune.sweeps",
    "train": "sidetune.train", "TrainConfig": "sidetune.training", "TrainResult": "sidetune.training",
}
__all__ = sorted(PUBLIC_API)

if TYPE_CHECKING:
    from sidetune.cache import Cache, CachedSplit, CacheSpec, load_spec, open_cache
    from sidetune.errors import SidetuneError
    from sidetune.evaluate import evaluate
    from sidetune.extract import extract, plan_extraction
    from sidetune.predict import predict
    from sidetune.sweeps import expand_grid, sweep
    from sidetune.train import train
    from sidetune.training import TrainConfig, TrainResult


class PackageWithFunctions(types.ModuleType):
    """sidetune.extract (and train, evaluate, predict) name both a module and the function in it;
    importing the module would bind the module over the function, as the import system sets a
    submodule on its package. This package keeps the function."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and PUBLIC_API.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = PackageWithFunctions


def __getattr__(name: str) -> object:
    if name not in PUBLIC_API:
        raise AttributeError(f"module 'sidetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(PUBLIC_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *PUBLIC_API})
