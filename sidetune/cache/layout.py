"""How a cache lays out one image's tokens.

Every stored stage has a shape (`StageShape`: tokens, width, spatial grid, prefix tokens). When
all stored stages share one (tokens, width) — every ViT — an image is one (S, T, D) array, as
format 1 stored it. When they differ — the stages of a Swin, a ConvNeXt, an EfficientNet — an
image is one flat (E,) vector, the stages' (T_s, D_s) tokens one after another (E = sum of
T_s * D_s), and `TokenLayout` cuts a batch back into per-stage (B, T_s, D_s) views. One array
either way: a batch is one gather and a shard one write.

A stored entry may also be a sum of stages (a `summed` cache spec, MIST's cache): its
`StageShape.summed` lists the backbone stages it adds up, and its stage id is negative
(`summed_stage_id`), so it never collides with a backbone stage and sorts before them.

A video cache stores clips: every frame through the backbone, each stage's tokens of all
`frames` frames one frame after another along the token axis (`TokenLayout.frames`; a stage's
`num_tokens` is then frames x the tokens of one frame, its `grid` and prefix tokens those of
one frame). Readers and the cache machinery see a clip as an image with more tokens; the side
networks that look at positions fold the frames out (`frame_tokens`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class StageShape:
    """One stage's output as tokens: `num_tokens` (the `num_prefix_tokens` first, then the
    `grid` of spatial positions, row-major) of `width` channels."""

    stage: int
    num_tokens: int
    width: int
    grid: tuple[int, int]
    num_prefix_tokens: int
    summed: tuple[int, ...] = ()  # the backbone stages this entry is the sum of; empty: `stage` itself

    def describe(self) -> dict:
        record = {**asdict(self), "grid": list(self.grid), "summed": list(self.summed)}
        if not self.summed:  # absent from plain stages' records, as before sums existed
            del record["summed"]
        return record

    @classmethod
    def from_record(cls, record: dict) -> "StageShape":
        return cls(record["stage"], record["num_tokens"], record["width"], tuple(record["grid"]),
                   record["num_prefix_tokens"], tuple(record.get("summed", ())))

    @property
    def label(self) -> str:
        """'stage 12', or 'the sum of stages 0..6' for a stored sum."""
        if not self.summed:
            return f"stage {self.stage}"
        return f"the sum of stages {self.summed[0]}..{self.summed[-1]}"

    @property
    def numel(self) -> int:
        return self.num_tokens * self.width


@dataclass(frozen=True)
class TokenLayout:
    """The stored stages' shapes, in stage order; `frames` > 1 for a video cache (each shape's
    tokens those of every frame)."""

    shapes: tuple[StageShape, ...]
    frames: int = 1

    @classmethod
    def from_manifest(cls, manifest: dict) -> "TokenLayout":
        layout = manifest["layout"]
        if "stage_shapes" in layout:
            return cls(tuple(StageShape.from_record(record) for record in layout["stage_shapes"]), layout.get("frames", 1))
        grid = tuple(manifest["backbone"].get("patch_grid", (0, 0)))  # caches written before stage shapes
        if layout["token_selection"] != "all":
            grid = (1, 1) if layout["token_selection"] == "mean" else (0, 0)
        return cls(tuple(StageShape(stage, layout["num_tokens"], layout["width"], grid, layout["num_prefix_tokens"])
                         for stage in layout["stages"]))

    @property
    def stages(self) -> list[int]:
        return [shape.stage for shape in self.shapes]

    def over_frames(self, frames: int) -> "TokenLayout":
        """This (one image's) layout for clips of `frames` frames: every stage's tokens x frames."""
        if frames == 1:
            return self
        return TokenLayout(tuple(replace(shape, num_tokens=shape.num_tokens * frames) for shape in self.shapes), frames)

    def frames_into_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """A batch of B x frames packed frames (clip by clip, frame by frame, in this layout's
        one-frame shapes) -> B packed clips: each stage's frames one after another."""
        if self.frames == 1:
            return tokens
        per_frame = TokenLayout(tuple(replace(s, num_tokens=s.num_tokens // self.frames) for s in self.shapes))
        stages = per_frame.unpack(tokens, per_frame.stages)  # each (B*F, T_s, D_s)
        clips = [x.reshape(-1, self.frames * x.shape[1], x.shape[2]) for x in stages]
        return pack_stages(clips)

    @property
    def uniform(self) -> bool:
        return len({(shape.num_tokens, shape.width) for shape in self.shapes}) == 1

    def describe_stages(self) -> str:
        """'stages [0, 1, ..., 12]', or 'the sum of stages 0..12, stage 12' for a summed cache."""
        if not any(shape.summed for shape in self.shapes):
            return f"stages {self.stages}"
        return ", ".join(shape.label for shape in self.shapes)

    @property
    def backbone_stages(self) -> list[int]:
        """The backbone stages a batch of this layout is computed from (summed ones included)."""
        return sorted({stage for shape in self.shapes for stage in (shape.summed or (shape.stage,))})

    def image_shape(self, stages: Sequence[int] | None = None) -> tuple[int, ...]:
        """One image's array: (S, T, D) when uniform, else (E,)."""
        shapes = self._shapes(stages)
        if self.uniform:
            return len(shapes), shapes[0].num_tokens, shapes[0].width
        return (sum(shape.numel for shape in shapes),)

    def _shapes(self, stages: Sequence[int] | None) -> list[StageShape]:
        if stages is None:
            return list(self.shapes)
        return [self.shapes[self.stages.index(stage)] for stage in stages]

    def select(self, array, positions: Sequence[int]):
        """The stages at `positions` (on the stored stage axis) of a batch or array with images
        first (numpy or torch, stored or decoded)."""
        positions = list(positions)
        if positions == list(range(len(self.shapes))):
            return array
        if self.uniform:
            return array[:, positions]
        starts = np.cumsum([0] + [shape.numel for shape in self.shapes])
        columns = np.concatenate([np.arange(starts[p], starts[p + 1]) for p in positions])
        return array[:, columns] if isinstance(array, np.ndarray) else array[:, torch.from_numpy(columns).to(array.device)]

    def unpack(self, tokens: torch.Tensor, stages: Sequence[int]) -> list[torch.Tensor]:
        """A batch holding `stages` -> their (B, T_s, D_s) tokens."""
        return unpack_stages(tokens, [(s.num_tokens, s.width) for s in self._shapes(stages)])


def contiguous_groups(stages: Sequence[int], count: int) -> list[tuple[int, ...]]:
    """`stages` cut into `count` contiguous groups of near-equal size, the larger ones first
    (13 stages in 2 groups: 0..6 and 7..12): how summed caches and MIST group stages."""
    if not 1 <= count <= len(stages):
        raise ValueError(f"cannot cut {len(stages)} stages into {count} groups")
    return [tuple(int(s) for s in group) for group in np.array_split(np.asarray(stages), count)]


def summed_stage_id(group: int, groups: int) -> int:
    """The stage id of the stored sum of group `group` of `groups`: -groups..-1 in group order."""
    return group - groups


def pack_stages(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-stage (B, T_s, D_s) tokens -> (B, S, T, D) when their shapes agree, else (B, E)."""
    if len({tuple(x.shape[1:]) for x in outputs}) == 1:
        return torch.stack(list(outputs), dim=1)
    return torch.cat([x.flatten(1) for x in outputs], dim=1)


def unpack_stages(tokens: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """(B, S, T, D) or (B, E) tokens of stages shaped (T_s, D_s) -> a (B, T_s, D_s) view each."""
    if tokens.dim() == 4:
        return list(tokens.unbind(1))
    views, start = [], 0
    for num_tokens, width in shapes:
        views.append(tokens[:, start:start + num_tokens * width].view(tokens.shape[0], num_tokens, width))
        start += num_tokens * width
    return views
