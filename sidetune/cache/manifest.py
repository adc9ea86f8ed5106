"""The manifest: the cache's self-description, in `sidetune.json` at its root.

Stage two learns everything it needs from it (see docs/cache-format.md). Its identity fields
decide whether an existing cache may be resumed by a new extract command. It is replaced whole
(written beside, then renamed; one PUT on an object store), so a crash at any moment leaves the
old or the new manifest, never half of one. Format 1 kept it in the root zarr.json's
attributes, rewritten in place; such caches are still read."""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from sidetune.cache.layout import TokenLayout
from sidetune.cache.location import Location
from sidetune.cache.spec import CacheSpec, spec_from_record
from sidetune.roles import SplitRoles

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_KEY = "sidetune"  # root zarr.json attribute: the format version (format 1: the whole manifest)
MANIFEST_FILE = "sidetune.json"
LOCK_FILE = "extract.lock"

# (section, key) pairs that must match for an extract to resume into an existing cache;
# key None means the whole section.
IDENTITY_FIELDS: tuple[tuple[str, str | None], ...] = (
    ("backbone", "timm_name"),
    ("backbone", "weights_sha256"),
    ("preprocessing", None),
    ("spec", None),
    ("dataset", "fingerprint"),
    ("compute", "precision"),
    ("views", None),  # absent in a cache without augmented views
)


def build_manifest(*, backbone: dict, preprocessing: dict, dataset: dict, spec: dict,
                   stage_shapes: list[dict], compute: dict, views: dict | None = None, frames: int = 1) -> dict:
    """`stage_shapes`: each stored stage's StageShape record (sidetune/cache/layout.py), in order;
    `views`: how augmented views of the training images were made (none: no such section)."""
    last = stage_shapes[-1]
    uniform = len({(shape["num_tokens"], shape["width"]) for shape in stage_shapes}) == 1
    return {
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone,
        "preprocessing": preprocessing,
        "dataset": {key: value for key, value in dataset.items() if key != "split_sizes"},
        "spec": spec,
        "layout": {
            "stages": [shape["stage"] for shape in stage_shapes],
            "num_tokens": last["num_tokens"],
            "num_prefix_tokens": last["num_prefix_tokens"] if spec["tokens"] == "all" else 0,
            "token_selection": spec["tokens"],
            "width": last["width"],
            "axes": (["clip" if frames > 1 else "image", "stage", "frame-major token" if frames > 1 else "token",
                      "channel"] if uniform else ["clip" if frames > 1 else "image", "stage-major token-channel"]),
            "stage_shapes": stage_shapes,
            **({"frames": frames} if frames > 1 else {}),
        },
        "compute": compute,
        **({"views": views} if views else {}),
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


def write_manifest(location: Location, manifest: dict) -> None:
    location.write_atomically(MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())


# what every manifest holds, and the type of each: a manifest without them is damaged
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "backbone": dict, "preprocessing": dict, "dataset": dict, "spec": dict, "layout": dict, "compute": dict,
    "splits": dict, "created": str}
REQUIRED_IN = {"backbone": ("timm_name", "weights_sha256", "depth"), "dataset": ("name", "class_names"),
               "layout": ("stages", "num_tokens", "width"), "spec": ("dtype",)}


def read_manifest(location: Location, root_attributes: dict) -> dict | None:
    """The manifest of the cache at `location` whose root group has `root_attributes`; None when
    this is not a sidetune cache, or one whose creation stopped before its manifest was written.
    A manifest that is not JSON, or lacks what every manifest holds, is refused as damaged."""
    marker = root_attributes.get(MANIFEST_KEY)
    if marker is None:
        return None
    if marker.get("format_version") == 1:
        return dict(marker)
    data = location.read_bytes(MANIFEST_FILE)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged_manifest(location, f"it is not JSON ({error})") from None
    problems = manifest_problems(record)
    if problems:
        raise damaged_manifest(location, "; ".join(problems))
    return record


def manifest_problems(record: object) -> list[str]:
    """What a manifest lacks or holds of the wrong type, as phrases (none: sound)."""
    if not isinstance(record, dict):
        return [f"it holds a {type(record).__name__}, not an object"]
    version = record.get("format_version")
    if type(version) is not int:
        return [f"its format_version is {version!r} (a {type(version).__name__}), not an integer"]
    if version not in READABLE_VERSIONS:
        return []  # another format (a newer sidetune's): the reader says so
    problems = [f"its {key} is missing" if key not in record else f"its {key} is a {type(record[key]).__name__}"
                for key, kind in REQUIRED.items() if not isinstance(record.get(key), kind)]
    problems += [f"its {section} lacks {key}" for section, keys in REQUIRED_IN.items()
                 if isinstance(record.get(section), dict) for key in keys if key not in record[section]]
    return problems


def damaged_manifest(location: Location, problem: str) -> "SidetuneError":
    from sidetune.errors import SidetuneError

    return SidetuneError(
        f"The manifest of cache {location} ({MANIFEST_FILE}) is damaged: {problem}. A cache cannot be read without "
        f"it: rebuild it with the `sidetune extract` command that made it and --overwrite (or restore {MANIFEST_FILE} "
        "from a backup).")


@dataclass(frozen=True)
class CacheManifest:
    """A manifest read back, typed and read-only: what everything outside cache/ (training, live
    evaluation, predict, sweeps, the command line) reads instead of the record's keys. Sections
    handed on whole (the backbone record to reload the backbone, the preprocessing record) come
    as read-only mappings."""

    record: Mapping[str, Any]

    # the dataset
    @property
    def dataset(self) -> Mapping[str, Any]:
        return MappingProxyType(self.record["dataset"])

    @property
    def dataset_name(self) -> str:
        return self.record["dataset"]["name"]

    @property
    def task_name(self) -> str:
        """The VTAB-1k task the cache was extracted from, else its dataset's name."""
        return self.record["dataset"].get("vtab_task") or self.dataset_name

    @property
    def class_names(self) -> list[str]:
        return list(self.record["dataset"]["class_names"])

    @property
    def roles(self) -> SplitRoles:
        """Which split trains, selects, retrains and reports (sidetune/roles.py): as recorded at
        extraction, kept to the splits the cache has; caches written before roles were recorded
        get them from their split names."""
        return SplitRoles.from_record(self.record["dataset"].get("roles"), self.record["splits"])

    @property
    def carved_validation(self) -> Mapping[str, Any] | None:
        """How the validation split was carved from the training split (split, fraction, seed),
        or None when the dataset came with one."""
        carved = self.record["dataset"].get("validation")
        return None if carved is None else MappingProxyType(carved)

    # the backbone
    @property
    def backbone(self) -> Mapping[str, Any]:
        """The backbone's record, as `sidetune.backbones.load_recorded_backbone` reads it."""
        return MappingProxyType(self.record["backbone"])

    @property
    def backbone_name(self) -> str:
        """Its alias (vit_b16), else its timm name."""
        return self.record["backbone"]["alias"] or self.record["backbone"]["timm_name"]

    @property
    def backbone_identity(self) -> tuple[str, str]:
        """(timm name, weights sha256): caches of one backbone share it."""
        return self.record["backbone"]["timm_name"], self.record["backbone"]["weights_sha256"]

    @property
    def depth(self) -> int:
        return self.record["backbone"]["depth"]

    @property
    def backbone_stages(self) -> list[Mapping[str, Any]] | None:
        """The backbone's stages and their shapes; None in caches written before any timm backbone."""
        stages = self.record["backbone"].get("stages")
        return None if stages is None else [MappingProxyType(stage) for stage in stages]

    @property
    def final_norm_eps(self) -> float | None:
        """The backbone's final LayerNorm's eps; None when it has none."""
        norm = self.record["backbone"].get("final_norm")
        return None if norm is None else norm["eps"]

    # how it was extracted and stored
    @property
    def preprocessing(self) -> Mapping[str, Any]:
        return MappingProxyType(self.record["preprocessing"])

    @property
    def spec(self) -> CacheSpec:
        return spec_from_record(dict(self.record["spec"]))

    @property
    def precision(self) -> str:
        """The extraction's autocast precision (fp32, bf16, fp16)."""
        return self.record["compute"]["precision"]

    @property
    def extract_batch_size(self) -> int:
        return self.record["compute"].get("batch_size", 64)

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.from_manifest(self.record)

    @property
    def width(self) -> int:
        """The width of the tokens side networks read (the last stored stage's)."""
        return self.record["layout"]["width"]

    @property
    def num_tokens(self) -> int:
        """The last stored stage's tokens (of every frame, in a video cache)."""
        return self.record["layout"]["num_tokens"]

    @property
    def frames(self) -> int:
        """Frames per clip in a video cache; 1 in an image cache."""
        return self.record["layout"].get("frames", 1)

    @property
    def num_prefix_tokens(self) -> int:
        return self.record["layout"]["num_prefix_tokens"]

    @property
    def token_selection(self) -> str:
        return self.record["layout"]["token_selection"]

    @property
    def stages(self) -> list[int]:
        return list(self.record["layout"]["stages"])

    @property
    def format_version(self) -> int:
        return self.record["format_version"]

    @property
    def created(self) -> str:
        return self.record["created"]
