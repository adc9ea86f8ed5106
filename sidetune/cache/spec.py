"""Cache specs: which stages and tokens a cache keeps, in which dtype, chunked and sharded how.

Specs are YAML files in the top-level cache_specs/ folder, installed with sidetune as the
`cache_specs` package (`--spec NAME`), or anywhere (`--spec path/to/spec.yaml`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import yaml

import cache_specs
from sidetune.cache.codec import CODECS, INT8_SCALES, Codec, codec_for
from sidetune.cache.layout import StageShape, TokenLayout, contiguous_groups, summed_stage_id
from sidetune.errors import SidetuneError

SPECS_DIR = Path(cache_specs.__file__).parent  # package data: in every install, editable or from a wheel
TOKEN_MODES = ("all", "cls", "mean")
COMPRESSORS = ("none", "zstd")


@dataclass(frozen=True)
class CacheSpec:
    """`stages`: "all", "last", {"every": g} (0, g, 2g, ..., depth) or a list of indices.
    {"last": k} (the last k stages). `tokens`: "all" (prefix tokens first, then patches), "cls"
    (the first prefix token) or "mean" (mean of the patch tokens). `max_grid`: with tokens "all",
    a stage's spatial grid larger than max_grid x max_grid is average-pooled down to at most
    that (the prefix tokens are kept): small caches of a CNN's high-resolution early stages.
    `sum_groups`: store, instead of the selected stages, the sums of their tokens over
    `sum_groups` contiguous groups (`contiguous_groups`), and with `keep_last` the backbone's
    last stage beside them: MIST's cache, two tensors per image at one group.
    `dtype`: a float type, or int8 with float32 scales per `scale` ("token" or "channel";
    sidetune/cache/codec.py)."""

    name: str
    stages: str | dict | tuple[int, ...] = "all"
    tokens: str = "all"
    dtype: str = "float16"
    scale: str = "token"
    chunk_images: int = 1
    shard_images: int = 64
    compressor: str = "none"
    max_grid: int | None = None
    sum_groups: int | None = None
    keep_last: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.tokens not in TOKEN_MODES:
            problems.append(f"tokens must be one of {', '.join(TOKEN_MODES)}, not {self.tokens!r}")
        if self.dtype not in CODECS:
            problems.append(f"dtype must be one of {', '.join(CODECS)}, not {self.dtype!r}")
        if self.scale not in INT8_SCALES:
            problems.append(f"scale must be one of {', '.join(INT8_SCALES)}, not {self.scale!r}")
        if self.compressor not in COMPRESSORS:
            problems.append(f"compressor must be one of {', '.join(COMPRESSORS)}, not {self.compressor!r}")
        if not (isinstance(self.shard_images, int) and isinstance(self.chunk_images, int)
                and 1 <= self.chunk_images <= self.shard_images and self.shard_images % self.chunk_images == 0):
            problems.append("chunk_images must be a positive divisor of shard_images")
        if not (self.stages in ("all", "last") or _is_every_or_last(self.stages) or _is_index_list(self.stages)):
            problems.append(f"stages must be 'all', 'last', {{every: g}}, {{last: k}} or a list of indices, "
                            f"not {self.stages!r}")
        if self.max_grid is not None and not (isinstance(self.max_grid, int) and self.max_grid >= 1):
            problems.append(f"max_grid must be a positive integer, not {self.max_grid!r}")
        if self.sum_groups is not None and not (isinstance(self.sum_groups, int) and self.sum_groups >= 1):
            problems.append(f"sum_groups must be a positive integer, not {self.sum_groups!r}")
        if not isinstance(self.keep_last, bool):
            problems.append(f"keep_last must be true or false, not {self.keep_last!r}")
        if problems:
            raise SidetuneError(f"Cache spec '{self.name}' is invalid: {'; '.join(problems)}.")

    def resolve_stages(self, depth: int, first: int = 0) -> list[int]:
        """Absolute stage indices for a backbone whose stages run from `first` to `depth` (a
        ViT's from 0, the tokens entering block 1; a `forward_intermediates` model's from 1)."""
        if self.stages == "all":
            return list(range(first, depth + 1))
        if self.stages == "last":
            return [depth]
        if isinstance(self.stages, dict) and "last" in self.stages:
            count = self.stages["last"]
            if count > depth - first + 1:
                raise SidetuneError(f"Cache spec '{self.name}' keeps the last {count} stages, but the backbone has "
                                    f"{depth - first + 1} (stages {first}..{depth}). Ask for at most that many.")
            return list(range(depth - count + 1, depth + 1))
        if isinstance(self.stages, dict):
            gap = self.stages["every"]
            if depth % gap:
                raise SidetuneError(
                    f"Cache spec '{self.name}' keeps every {gap}th stage but the backbone has {depth} "
                    f"blocks, not a multiple of {gap}. Choose a gap that divides {depth}."
                )
            return [stage for stage in range(0, depth + 1, gap) if stage >= first]
        bad = [s for s in self.stages if not first <= s <= depth]
        if bad:
            raise SidetuneError(
                f"Cache spec '{self.name}' asks for stages {bad}, but the backbone has stages "
                f"{first}..{depth}. Fix the spec's stage list."
            )
        return sorted(set(self.stages))

    def stored_layout(self, backbone_stages: Sequence[StageShape]) -> TokenLayout:
        """What this spec stores of a backbone whose stages have these shapes: the kept stages
        (tokens selected, grids pooled), or their sums and the last stage."""
        shapes = {shape.stage: self.stored_shape(shape) for shape in backbone_stages}
        depth, first = backbone_stages[-1].stage, backbone_stages[0].stage
        stages = self.resolve_stages(depth, first)
        if self.sum_groups is None:
            return TokenLayout(tuple(shapes[stage] for stage in stages))
        if self.sum_groups > len(stages):
            raise SidetuneError(f"Cache spec '{self.name}' sums {len(stages)} stages in {self.sum_groups} groups; "
                                f"a group needs at least one stage. Set sum_groups to at most {len(stages)}.")
        groups = contiguous_groups(stages, self.sum_groups)
        entries = []
        for index, group in enumerate(groups):
            kinds = {replace(shapes[stage], stage=0) for stage in group}
            if len(kinds) > 1:
                raise SidetuneError(
                    f"Cache spec '{self.name}' sums stages {group[0]}..{group[-1]}, but their tokens differ in shape "
                    f"({', '.join(f'{shapes[s].num_tokens}x{shapes[s].width}' for s in group)}): only stages of one "
                    "shape add up (a ViT's, EVA's, BEiT's). Use a spec that stores the stages (e.g. default).")
            entries.append(replace(shapes[group[0]], stage=summed_stage_id(index, len(groups)), summed=group))
        if self.keep_last:
            entries.append(shapes[depth])
        return TokenLayout(tuple(entries))

    def stored_shape(self, shape: StageShape) -> StageShape:
        """The shape a backbone stage has once this spec selected (and pooled) its tokens."""
        if self.tokens == "cls":
            return replace(shape, num_tokens=1, grid=(0, 0), num_prefix_tokens=1)
        if self.tokens == "mean":
            return replace(shape, num_tokens=1, grid=(1, 1), num_prefix_tokens=0)
        grid = self._pooled_grid(shape.grid)
        return replace(shape, num_tokens=shape.num_prefix_tokens + grid[0] * grid[1], grid=grid)

    def _pooled_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        if self.max_grid is None:
            return grid
        return min(grid[0], self.max_grid), min(grid[1], self.max_grid)

    def select_tokens(self, x: torch.Tensor, shape: StageShape) -> torch.Tensor:
        """(B, T, D) tokens of a backbone stage of `shape` -> (B, T', D) stored tokens."""
        prefix = shape.num_prefix_tokens
        if self.tokens == "cls":
            if prefix < 1:
                raise SidetuneError(f"Cache spec '{self.name}' keeps the CLS token, but the backbone has none; "
                                    "use tokens: mean.")
            return x[:, :1]
        if self.tokens == "mean":
            return x[:, prefix:].mean(dim=1, keepdim=True)
        pooled = self._pooled_grid(shape.grid)
        if pooled == tuple(shape.grid):
            return x
        patches = x[:, prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *shape.grid)
        patches = F.adaptive_avg_pool2d(patches, pooled).flatten(2).transpose(1, 2)
        return torch.cat([x[:, :prefix], patches], dim=1)

    def codec(self) -> Codec:
        return codec_for(self.dtype, self.scale)

    def describe(self) -> dict:
        """The manifest's record (an identity field): fields added since format 2 appear only
        when set, so a cache written before them resumes under the same spec."""
        record = asdict(self)
        if isinstance(self.stages, tuple):
            record["stages"] = list(self.stages)
        for field in ("max_grid", "sum_groups"):
            if record[field] is None:
                del record[field]
        if "sum_groups" not in record:
            del record["keep_last"]
        return record


def _is_every_or_last(stages) -> bool:
    return (isinstance(stages, dict) and len(stages) == 1 and set(stages) <= {"every", "last"}
            and isinstance(next(iter(stages.values())), int) and next(iter(stages.values())) >= 1)


def _is_index_list(stages) -> bool:
    return isinstance(stages, (list, tuple)) and len(stages) > 0 and all(isinstance(s, int) and s >= 0 for s in stages)


def available_specs() -> list[str]:
    return sorted(path.stem for path in SPECS_DIR.glob("*.yaml"))


def specs_serving(depth: int, stages: list[int], token_modes: tuple[str, ...], first: int = 0,
                  one_shape: bool = True, sums: bool = False) -> list[str]:
    """The shipped specs that keep `stages` (of a backbone with stages `first`..`depth`) with
    tokens in `token_modes` (int8 and summed ones only if the backbone's stages have
    `one_shape`), the fewest bytes per image first (pooling specs, made for CNNs, last). Summed
    specs serve a method that reads sums (`sums`: MIST) where they keep the last stage, and any
    other method through that stage alone."""
    serving = []
    for name in available_specs():
        spec = load_spec(name)
        try:
            kept = spec.resolve_stages(depth, first)
        except SidetuneError:  # a stage gap that does not divide this depth
            continue
        entries = len(kept)
        if spec.sum_groups is not None:
            entries = spec.sum_groups + spec.keep_last
            last = [depth] if spec.keep_last else []
            kept = (stages if last else []) if sums else last
        if spec.tokens in token_modes and set(stages) <= set(kept) and (one_shape or (
                not spec.codec().quantized and spec.sum_groups is None)):
            serving.append((spec.max_grid is not None, spec.tokens == "all", entries * spec.codec().itemsize, name))
    return [name for *_, name in sorted(serving)]


def load_spec(name_or_path: str) -> CacheSpec:
    """A spec by name (cache_specs/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path).expanduser()
    looks_like_a_path = "/" in name_or_path or name_or_path.endswith((".yaml", ".yml"))
    if looks_like_a_path and not path.is_file():
        raise SidetuneError(f"Cache spec file {path} does not exist. Pass the path of an existing YAML spec, or a "
                            f"shipped spec by name ({', '.join(available_specs())}).")
    if not path.is_file():
        path = SPECS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SidetuneError(
            f"Unknown cache spec '{name_or_path}'. Choose one of {', '.join(available_specs())} "
            "or pass the path to a YAML spec file."
        )
    try:
        fields = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SidetuneError(f"Cache spec {path} is not valid YAML: {error}.") from error
    if not isinstance(fields, dict):
        raise SidetuneError(f"Cache spec {path} must be a YAML mapping of fields.")
    return spec_from_record({"name": path.stem, **fields}, origin=str(path))


def spec_from_record(fields: dict, origin: str = "manifest") -> CacheSpec:
    known = set(CacheSpec.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise SidetuneError(f"Cache spec {origin} has unknown fields {unknown}; allowed: {sorted(known)}.")
    if isinstance(fields.get("stages"), list):
        fields = {**fields, "stages": tuple(fields["stages"])}
    return CacheSpec(**fields)
