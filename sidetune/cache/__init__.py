"""The feature cache: the contract between stage one (extract) and stage two (train)."""

from sidetune.cache.manifest import FORMAT_VERSION
from sidetune.cache.reader import Cache, CachedSplit, open_cache
from sidetune.cache.spec import CacheSpec, available_specs, load_spec

__all__ = ["FORMAT_VERSION", "Cache", "CachedSplit", "CacheSpec", "available_specs", "load_spec", "open_cache"]
