"""Ladder side-tuning, LST (Sung, Cho, Bansal, NeurIPS 2022; ylsung/Ladder-Side-Tuning, whose code
is for T5/BART), ported to vision backbones as docs/methods.md reconstructs it: a narrow
transformer (width d_s = D / `reduction`) beside the frozen one, fed by down-projections of
every stage through learned gates,

    s = D_0(z_0)
    for j = 1..N:  mu_j = sigmoid(alpha_j / 0.1);  s = mu_j s + (1 - mu_j) D_j(z_j);  s = Block_j(s)
    logits = head(U(pool(LN(s))))

D_j: Linear D -> d_s per stage, Block_j: a pre-norm transformer block at width d_s (heads of
width `head_dim`, MLP width 4 d_s), U: Linear d_s -> D, alpha_j = 0 at the start (mu = 0.5).
The original initialises its side blocks from pruned backbone weights, which the cache does
not hold: here their weights start as small_normal (0.02) and their biases at zero; D_j and U
keep nn.Linear's default initialisation, as in the original code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidetune.errors import SidetuneError
from sidetune.sidenets.base import (
    FeatureLayout,
    SideNet,
    attention,
    layer_norm_stacked,
    ones,
    per_config,
    shared_product,
    small_normal,
    uniform_fan_in,
    zeros,
)

GATE_TEMPERATURE = 0.1  # LST's mu = sigmoid(alpha / T)
MLP_RATIO = 4


class LST(SideNet):
    name = "lst"
    summary = "LST: a narrow ladder transformer fed by every stage through learned gates"
    option_help = {"reduction": "side width = backbone width / reduction", "head_dim": "width of the side network's attention heads"}
    default_grid = {"lr": [3e-4, 1e-3, 3e-3], "weight_decay": [1e-4, 1e-3], "reduction": [4, 8]}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", reduction: int = 8,
                 head_dim: int = 8, standardize: bool = False):
        super().__init__(layout, num_configs, pool, standardize)
        d = layout.width
        if d % reduction:
            raise SidetuneError(f"LST reduction {reduction} must divide the backbone width {d}; choose a divisor.")
        side = d // reduction
        if side > head_dim and side % head_dim:
            raise SidetuneError(f"LST side width {side} (= {d} / {reduction}) is not a multiple of the head width "
                                f"{head_dim}; choose another --reduction or head_dim.")
        self.side, self.heads = side, max(1, side // head_dim)
        self.build_stage_embeddings()
        for j in range(len(self.stages_needed())):
            self.stacked(f"down{j}.weight", (d, side), uniform_fan_in(d))
            self.stacked(f"down{j}.bias", (side,), uniform_fan_in(d), decay=False)
            if j == 0:
                continue
            self.stacked(f"gate{j}", (1,), zeros, decay=False)
            for norm in ("norm1", "norm2"):
                self.stacked(f"block{j}.{norm}_weight", (side,), ones, decay=False)
                self.stacked(f"block{j}.{norm}_bias", (side,), zeros, decay=False)
            for name, shape in (("qkv", (side, 3 * side)), ("proj", (side, side)),
                                ("fc1", (side, MLP_RATIO * side)), ("fc2", (MLP_RATIO * side, side))):
                self.stacked(f"block{j}.{name}_weight", shape, small_normal)
                self.stacked(f"block{j}.{name}_bias", shape[1:], zeros, decay=False)
        self.stacked("out_norm.weight", (side,), ones, decay=False)
        self.stacked("out_norm.bias", (side,), zeros, decay=False)
        self.stacked("up.weight", (side, d), uniform_fan_in(side))
        self.stacked("up.bias", (d,), uniform_fan_in(side), decay=False)

    def stages_needed(self) -> list[int]:
        return list(range(self.layout.first_stage, self.layout.depth + 1))

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.uniform_stages(tokens)
        s = self._down(tokens[:, 0], 0)  # (K, B, T, d_s)
        for j in range(1, tokens.shape[1]):
            mu = torch.sigmoid(getattr(self, f"gate{j}") / GATE_TEMPERATURE)[:, :, None, None]  # (K, 1, 1, 1)
            s = self._block(mu * s + (1 - mu) * self._down(tokens[:, j], j), f"block{j}")
        pooled = self.pool_tokens(layer_norm_stacked(s, self.out_norm_weight, self.out_norm_bias))
        k, b = pooled.shape[:2]
        parts = pooled.view(k, b, -1, self.side)  # one part per pooled vector (two for pool both)
        up = torch.einsum("kbps,ksd->kbpd", parts, self.up_weight) + self.up_bias[:, None, None]
        return up.reshape(k, b, -1)

    def _down(self, z: torch.Tensor, j: int) -> torch.Tensor:
        """D_j(z_j) for every configuration: one product of the shared (B, T, D) stage."""
        return shared_product(z.float(), getattr(self, f"down{j}_weight")) + getattr(self, f"down{j}_bias")[:, None, None]

    def _block(self, s: torch.Tensor, prefix: str) -> torch.Tensor:
        """A pre-norm transformer block at the side width, per configuration: (K, B, T, d_s)."""
        p = lambda name: getattr(self, f"{prefix}_{name}")
        k, b, t, w = s.shape
        x = layer_norm_stacked(s, p("norm1_weight"), p("norm1_bias"))
        qkv = per_config(x, p("qkv_weight")) + p("qkv_bias")[:, None, None]
        q, key, v = qkv.reshape(k * b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = attention(q, key, v).transpose(1, 2).reshape(k, b, t, w)
        s = s + per_config(a, p("proj_weight")) + p("proj_bias")[:, None, None]
        x = layer_norm_stacked(s, p("norm2_weight"), p("norm2_bias"))
        x = F.gelu(per_config(x, p("fc1_weight")) + p("fc1_bias")[:, None, None])
        return s + per_config(x, p("fc2_weight")) + p("fc2_bias")[:, None, None]
