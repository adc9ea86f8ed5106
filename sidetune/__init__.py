"""sidetune: cache a frozen backbone's per-layer features once, then train many side networks
from the cache.

    import sidetune
    sidetune.extract("vit_b16", "dtd")            # stage one: writes ./cache/dtd
    cache = sidetune.open_cache("cache/dtd")      # the manifest, splits and arrays
    run_dir, result = sidetune.train("cache/dtd", sidetune.TrainConfig.create("last", {"rank": 16}))
    sidetune.predict(run_dir, ["photo.jpg"])      # the backbone again, then the side network
    sidetune.sweep("cache/dtd", sidetune.expand_grid("last", {"lr": [1e-3, 3e-3], "rank": [8, 16]}))

Importing sidetune never imports timm: stage two runs where timm is not installed.
"""

from sidetune.cache import Cache, CachedSplit, CacheSpec, load_spec, open_cache
from sidetune.errors import SidetuneError
from sidetune.evaluate import evaluate
from sidetune.extract import extract, plan_extraction
from sidetune.predict import predict
from sidetune.sweeps import expand_grid, sweep
from sidetune.train import train
from sidetune.training import TrainConfig, TrainResult

__version__ = "0.1.0"

__all__ = ["Cache", "CachedSplit", "CacheSpec", "SidetuneError", "TrainConfig", "TrainResult", "evaluate", "expand_grid",
           "extract", "load_spec", "open_cache", "plan_extraction", "predict", "sweep", "train"]
