"""Attentive probing: a few learned queries cross-attend to the frozen, final-normed last-stage
tokens, then a linear classifier (V-JEPA's attentive pooler and "efficient probing" reduced to
their common core; docs/methods.md says what is kept and what is not).

    X = LN_f(z_N)                     (B, T, D), shared by every configuration (LN_f: the backbone's
                                      final norm, or LayerNorm without affine where it has none)
    K = X W_k + b_k,  V = X W_v + b_v (B, T, w): w = `rank`, or D with `full_width`
    a = MHA(Q, K, V)                  Q: `queries` learned vectors of width w, `heads` heads
    logits = flatten(a) W + b         (queries · w) -> classes"""

from __future__ import annotations

import torch

from sidetune.errors import SidetuneError
from sidetune.sidenets.base import (
    FeatureLayout,
    SideNet,
    attention,
    shared_product,
    small_normal,
    uniform_fan_in,
    zeros,
)


class AttentiveProbe(SideNet):
    name = "attentive"
    summary = "attentive probe: learned queries cross-attend the last stage's tokens"
    option_help = {"queries": "learned queries", "rank": "width of the queries, keys and values",
                   "heads": "attention heads, dividing the rank",
                   "full_width": "keys and values of the backbone's width instead of the rank"}
    norm_without_final_norm = True  # keys from unnormalised CNN features saturate the softmax
    default_lr = 0.01  # benchmarks/defaults.py
    default_epochs = 30
    default_grid = {"lr": [3e-3, 1e-2, 3e-2], "weight_decay": [1e-4, 1e-3]}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", queries: int = 1, rank: int = 64,
                 heads: int = 1, full_width: bool = False):
        width = layout.width if full_width else rank
        if width % heads:
            raise SidetuneError(f"Attentive probing: heads ({heads}) must divide the key/value width ({width}).")
        super().__init__(layout, num_configs, pool, standardize=False, feature_width=queries * width)
        self.num_queries, self.width, self.heads = queries, width, heads
        d = layout.width
        self.stacked("query", (queries, width), small_normal, decay=False)  # V-JEPA's query initialisation
        self.stacked("w_kv", (d, 2 * width), uniform_fan_in(d))
        self.stacked("b_kv", (2 * width,), zeros, decay=False)

    def stages_needed(self) -> list[int]:
        return [self.layout.depth]

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, D) last-stage tokens -> (K, B, queries · width): what the queries read."""
        x = self.stage_tokens(tokens)[-1].float()
        x = torch.nn.functional.layer_norm(x, (x.shape[-1],), self.final_norm_weight, self.final_norm_bias,
                                           self.final_norm_eps)
        k, (b, t, _), w, h = self.num_configs, x.shape, self.width, self.heads
        kv = shared_product(x, self.w_kv) + self.b_kv[:, None, None, :]  # (K, B, T, 2w)
        keys, values = (part.reshape(k * b, t, h, w // h).transpose(1, 2) for part in kv.split(w, -1))
        q = self.query[:, None].expand(k, b, self.num_queries, w).reshape(k * b, -1, h, w // h).transpose(1, 2)
        attended = attention(q.to(keys.dtype), keys, values)  # (K*B, heads, queries, w/heads)
        return attended.transpose(1, 2).reshape(k, b, -1)
