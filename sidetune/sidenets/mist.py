"""MIST (Tang, Fu, Wu, arXiv 2406.17559), as reconstructed in docs/methods.md: the side network
reads sums of intermediate features instead of every stage. With the stages cut into k
contiguous groups and S_g the sum of group g's tokens,

    u = 0;  for g = 1..k:  u = u + S_g,  then `depth` modules  u = u + W_o MHA_r(LN(u))
    y = z_N + (u - sum_g S_g)                logits = head(pool(LN_f(y)))

with LAST's low-rank attention modules (no FFN) and W_o zero-initialised, so the network starts
as the linear probe on the last stage z_N. It reads a summed cache (the sums and z_N: two
tensors per image at k = 1) or any cache of every stage, summing on the fly; both give the same
network up to the cache's rounding of the sums."""

from __future__ import annotations

import torch

from sidetune.cache.layout import contiguous_groups
from sidetune.errors import SidetuneError
from sidetune.kernels.chain_reference import computed_dtype
from sidetune.sidenets.base import FeatureLayout
from sidetune.sidenets.last import LowRankAttentionSide, running_sums


class MIST(LowRankAttentionSide):
    name = "mist"
    summary = "MIST: LAST's modules over sums of contiguous groups of stages"
    option_help = {"groups": "contiguous groups of stages summed (0: a summed cache's own; 1 on a cache of every stage)"}
    option_minimum = {"groups": 0}
    reads_sums = True
    default_grid = {"lr": [3e-4, 1e-3, 3e-3], "weight_decay": [1e-4, 1e-3], "rank": [8, 16]}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", groups: int = 0,
                 rank: int = 16, depth: int = 4, heads: int = 1, zero_init_out: bool = True,
                 standardize: bool = False):
        """`groups`: k, the number of contiguous groups of stages summed; 0 takes a summed
        cache's own grouping (and 1 on a cache of every stage). `depth`: modules per group."""
        super().__init__(layout, num_configs, pool, standardize)
        self.summed_groups = self._groups_of_stages(layout, groups)
        self.build_stage_embeddings()
        self.build_modules(len(self.summed_groups), rank, depth, heads, zero_init_out)

    @staticmethod
    def _groups_of_stages(layout: FeatureLayout, groups: int) -> list[tuple[int, ...]]:
        if layout.sums:
            if groups not in (0, len(layout.sums)):
                raise SidetuneError(
                    f"MIST with {groups} groups cannot read this cache: it stores {len(layout.sums)} sums "
                    f"({', '.join(shape.label for shape in layout.sums)}). Use --groups {len(layout.sums)} (or 0: the "
                    "cache's own), or a cache of every stage (--spec default) to choose the groups freely.")
            if layout.depth not in layout.stages or not layout.uniform:
                raise SidetuneError(
                    f"MIST adds its output to the last stage's tokens (stage {layout.depth}), which this summed cache "
                    "does not store beside its sums in the same shape. Extract with a spec that keeps it "
                    "(keep_last: true, as --spec summed does).")
            return [shape.summed for shape in layout.sums]
        stages = list(range(layout.first_stage, layout.depth + 1))
        count = groups or 1
        if count > len(stages):
            raise SidetuneError(f"MIST groups ({count}) cannot exceed the {len(stages)} stages "
                                f"{stages[0]}..{stages[-1]} it sums; choose at most {len(stages)}.")
        return contiguous_groups(stages, count)

    def stages_needed(self) -> list[int]:
        """A summed cache's sums and the last stage; otherwise every stage (summed here)."""
        if self.layout.sums:
            return [shape.stage for shape in self.layout.sums] + [self.layout.depth]
        return list(range(self.layout.first_stage, self.layout.depth + 1))

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.uniform_stages(tokens)
        if self.layout.sums:
            sums = tokens[:, :self.groups].transpose(0, 1)
        else:
            first = self.layout.first_stage
            sums = torch.stack([tokens[:, group[0] - first:group[-1] - first + 1].sum(1, dtype=computed_dtype(tokens))
                                for group in self.summed_groups])
        return self.side_features(running_sums(sums), tokens[:, -1])
