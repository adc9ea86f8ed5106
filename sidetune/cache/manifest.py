"""The manifest: the self-description stored in the cache's root attributes.

Stage two learns everything it needs from it (see docs/cache-format.md). Its identity fields
decide whether an existing cache may be resumed by a new extract command."""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import sys

FORMAT_VERSION = 1
MANIFEST_KEY = "sidetune"

# (section, key) pairs that must match for an extract to resume into an existing cache;
# key None means the whole section.
IDENTITY_FIELDS: tuple[tuple[str, str | None], ...] = (
    ("backbone", "timm_name"),
    ("backbone", "weights_sha256"),
    ("preprocessing", None),
    ("spec", None),
    ("dataset", "fingerprint"),
    ("compute", "precision"),
)


def build_manifest(*, backbone: dict, preprocessing: dict, dataset: dict, spec: dict,
                   stages: list[int], num_tokens: int, compute: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone,
        "preprocessing": preprocessing,
        "dataset": {key: value for key, value in dataset.items() if key != "split_sizes"},
        "spec": spec,
        "layout": {
            "stages": stages,
            "num_tokens": num_tokens,
            "num_prefix_tokens": backbone["num_prefix_tokens"] if spec["tokens"] == "all" else 0,
            "token_selection": spec["tokens"],
            "width": backbone["width"],
            "axes": ["image", "stage", "token", "channel"],
        },
        "compute": compute,
        "splits": {},
        "versions": environment_versions(),
    }


def identity_differences(existing: dict, requested: dict) -> list[str]:
    """Human-readable descriptions of every identity field that differs."""
    differences = []
    for section, key in IDENTITY_FIELDS:
        old = existing.get(section, {})
        new = requested.get(section, {})
        if key is not None:
            old, new = old.get(key), new.get(key)
        if old != new:
            label = f"{section}.{key}" if key else section
            differences.append(f"{label} is {_short(old)} in the cache but {_short(new)} now")
    return differences


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def environment_versions() -> dict[str, str]:
    versions = {}
    for package in ("sidetune", "torch", "torchvision", "timm", "zarr", "numpy", "pillow", "datasets"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    versions["python"] = ".".join(str(v) for v in sys.version_info[:3])
    return versions
