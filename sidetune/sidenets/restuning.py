"""Res-Tuning-Bypass (Jiang et al., NeurIPS 2023), as ModelScope's ms-swift composes it
(swift/tuners/restuning.py, restuning_components.py; docs/methods.md): a bypass fed laterally by
each frozen stage and vertically by its own previous output, through residual adapters,

    A(x) = x + W2 GELU(W1 x + b1) + b2           W1: D -> l, W2: l -> D (per token)
    b_0  = z_0
    b_j  = A_lat,j(z_j) + A_vert,j(b_{j-1})      j = 1..N
    logits = head(pool(LN_f(b_N)))

The bypass reads detached backbone outputs only, so it trains from the cache. W1 and W2 start
Xavier-uniform and the biases at zero, as ms-swift's res_adapter; `zero_init_out` zeroes the
last vertical adapter's W2 instead (ms-swift's option for the last block)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sidetune.sidenets.base import FeatureLayout, SideNet, per_config, shared_product, zeros


def xavier_uniform(fan_in: int, fan_out: int):
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return lambda tensor, generator: tensor.uniform_(-bound, bound, generator=generator)


class ResTuning(SideNet):
    name = "restuning"
    summary = "Res-Tuning bypass: residual adapters fed by every stage"
    option_help = {"bottleneck": "the adapters' bottleneck width",
                   "zero_init_out": "zero the last vertical adapter's W2 (ms-swift's option for the last block)"}
    norm_without_final_norm = True  # LN_f(b_N): a plain LayerNorm where the backbone has none
    default_grid = {"lr": [3e-4, 1e-3, 3e-3], "weight_decay": [1e-4, 1e-3], "bottleneck": [16, 32]}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", bottleneck: int = 32,
                 zero_init_out: bool = False, standardize: bool = False):
        super().__init__(layout, num_configs, pool, standardize)
        self.bottleneck = bottleneck
        self.build_stage_embeddings()
        d, stages = layout.width, self.stages_needed()
        for j in range(1, len(stages)):
            for kind in ("lateral", "vertical"):
                last_out = zero_init_out and kind == "vertical" and j == len(stages) - 1
                self.stacked(f"{kind}{j}.w1", (d, bottleneck), xavier_uniform(d, bottleneck))
                self.stacked(f"{kind}{j}.b1", (bottleneck,), zeros, decay=False)
                self.stacked(f"{kind}{j}.w2", (bottleneck, d), zeros if last_out else xavier_uniform(bottleneck, d))
                self.stacked(f"{kind}{j}.b2", (d,), zeros, decay=False)

    def stages_needed(self) -> list[int]:
        return list(range(self.layout.first_stage, self.layout.depth + 1))

    def represent(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.uniform_stages(tokens)
        bypass = tokens[:, 0].float().expand(self.num_configs, *tokens[:, 0].shape)  # b_0 = z_0, (K, B, T, D)
        for j in range(1, tokens.shape[1]):
            z = tokens[:, j].float()  # shared by every configuration
            bypass = self._adapter(z, f"lateral{j}", shared=True) + self._adapter(bypass, f"vertical{j}", shared=False)
        return bypass

    def _adapter(self, x: torch.Tensor, name: str, shared: bool) -> torch.Tensor:
        """A(x) = x + W2 GELU(W1 x + b1) + b2 for every configuration; x is (B, T, D) when
        shared by all of them (one product for the first projection), else (K, B, T, D)."""
        w1, b1, w2, b2 = (getattr(self, f"{name}_{part}") for part in ("w1", "b1", "w2", "b2"))
        hidden = F.gelu((shared_product(x, w1) if shared else per_config(x, w1)) + b1[:, None, None])
        return x + per_config(hidden, w2) + b2[:, None, None]
