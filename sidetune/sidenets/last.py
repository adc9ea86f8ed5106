"""LAST, Low-rank Attention Side-Tuning (Tang et al., arXiv 2402.04009), as reconstructed in
docs/methods.md: u_0 = x_0, u_i = F_i(u_{i-1} + x_i), y = u_m - sum_{i<m} x_i, where each F_i
is `depth` residual low-rank attention modules h + W_o MHA_r(LN(h))."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidetune.errors import SidetuneError
from sidetune.sidenets.base import FeatureLayout, SideNet, layer_norm_stacked, ones, uniform_fan_in, zeros


class LAST(SideNet):
    name = "last"

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "cls", rank: int = 16,
                 gap: int = 1, depth: int = 1, heads: int = 1, zero_init_out: bool = True,
                 standardize: bool = False):
        super().__init__(layout, num_configs, pool, standardize)
        if layout.depth % gap:
            raise SidetuneError(f"LAST gap {gap} must divide the backbone depth {layout.depth}; choose a divisor.")
        if rank % heads:
            raise SidetuneError(f"LAST heads ({heads}) must divide the rank ({rank}).")
        self.rank, self.gap, self.depth, self.heads = rank, gap, depth, heads
        self.groups = layout.depth // gap
        d = layout.width
        for i in range(self.groups):
            for j in range(depth):
                prefix = f"lsa{i}_{j}"
                self.stacked(f"{prefix}.norm_weight", (d,), ones, decay=False)
                self.stacked(f"{prefix}.norm_bias", (d,), zeros, decay=False)
                for projection in ("q", "k", "v"):
                    self.stacked(f"{prefix}.w_{projection}", (d, rank), uniform_fan_in(d))
                self.stacked(f"{prefix}.w_o", (rank, d), zeros if zero_init_out else uniform_fan_in(rank))

    def stages_needed(self) -> list[int]:
        return list(range(0, self.layout.depth + 1, self.gap))

    def represent(self, tokens: torch.Tensor) -> torch.Tensor:
        k = self.num_configs
        u = tokens[:, 0].unsqueeze(0).expand(k, -1, -1, -1)
        for i in range(1, self.groups + 1):
            h = u + tokens[:, i]
            for j in range(self.depth):
                h = h + self._attend(h, f"lsa{i - 1}_{j}")
            u = h
        return u - tokens[:, :-1].sum(dim=1)

    def _attend(self, h: torch.Tensor, prefix: str) -> torch.Tensor:
        k, b, t, _ = h.shape
        p = lambda name: getattr(self, f"{prefix}_{name}")
        x = layer_norm_stacked(h, p("norm_weight"), p("norm_bias"))
        # One (K, B*T, D) x (K, D, 3r) product reads x once for q, k and v (1.4x faster on CPU
        # than three products); the parameters stay separate so states keep their names.
        w_qkv = torch.cat([p("w_q"), p("w_k"), p("w_v")], dim=-1)
        qkv = torch.bmm(x.reshape(k, b * t, -1), w_qkv).view(k * b, t, 3, self.heads, self.rank // self.heads)
        q, key, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, key, v)  # (K*B, heads, T, r/heads)
        attended = attended.transpose(1, 2).reshape(k, b * t, self.rank)
        return torch.bmm(attended, p("w_o")).view(k, b, t, -1)
