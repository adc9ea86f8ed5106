"""sidetune: cache a frozen backbone's per-layer features once, then train many side networks
from the cache.

    import sidetune
    sidetune.extract("vit_b16", "dtd")            # stage one: writes ./cache/dtd
    cache = sidetune.open_cache("cache/dtd")      # the manifest, splits and arrays

Importing sidetune never imports timm: stage two runs where timm is not installed.
"""

from sidetune.cache import Cache, CachedSplit, CacheSpec, load_spec, open_cache
from sidetune.errors import SidetuneError
from sidetune.extract import extract

__version__ = "0.1.0"

__all__ = ["Cache", "CachedSplit", "CacheSpec", "SidetuneError", "extract", "load_spec", "open_cache"]
