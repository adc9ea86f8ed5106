"""An EVL-style temporal probe (after EVL, Lin et al., ECCV 2022: OpenGVLab/efficient-video-
recognition): a frozen image backbone's frame tokens read by a small decoder that knows time.
Our reconstruction, simpler than EVL's decoder (no MLPs, no temporal cross-attention):

    X_s   = LN_f(z_s) + P_f        the last `layers` stages' tokens of every frame f, through the
                                   frozen final norm, plus a learned temporal position embedding
                                   P (F, D) added to every token of frame f
    q    <- q + softmax(q K_sᵀ / √w) V_s,  K_s = X_s W_k,s + b_k,s,  V_s = X_s W_v,s + b_v,s
                                   one learned query (w wide) cross-attending to all frames' tokens,
                                   stage after stage (the earliest of the `layers` first)
    c_f   = pool(LN_f(z_last) of frame f);  c'_f = c_f + Σ_j w_j ⊙ c_(f+j-1)
                                   the frames' pooled features through a depthwise temporal
                                   convolution (kernel 3, zero-initialised residual)
    logits = [q ; mean_f c'_f] W + b

On an image cache (one frame) it is an attentive probe over the last `layers` stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidetune.errors import SidetuneError
from sidetune.sidenets.base import (
    TEMPORAL_KERNEL,
    FeatureLayout,
    SideNet,
    attention,
    auto_pool,
    small_normal,
    temporal_convolution,
    uniform_fan_in,
    zeros,
)


class EVLProbe(SideNet):
    name = "evl"
    summary = "EVL-style temporal probe: a query over the last stages' tokens of every frame, time-aware"
    option_help = {"layers": "the last k stages the query reads, earliest first",
                   "rank": "width of the query, keys and values"}
    token_selections = ("all", "cls", "mean")

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", layers: int = 4, rank: int = 64):
        if not layout.uniform:
            raise SidetuneError("evl reads stages of one shape (a ViT's); this cache's stages differ. Use attentive, "
                                "linear or head2toe.")
        if layers > len(layout.backbone_stages):
            raise SidetuneError(f"--layers {layers} asks for more stages than the cache stores "
                                f"({len(layout.backbone_stages)}).")
        width = layout.width * (2 if (auto_pool(layout) if pool == "auto" else pool) == "both" else 1)
        super().__init__(layout, num_configs, pool, standardize=False, feature_width=rank + width)
        self.layers, self.rank = layers, rank
        d = layout.width
        self.stacked("query", (rank,), small_normal, decay=False)
        self.stacked("position", (layout.frames, d), small_normal, decay=False)
        self.stacked("w_kv", (layers, d, 2 * rank), uniform_fan_in(d))
        self.stacked("b_kv", (layers, 2 * rank), zeros, decay=False)
        self.stacked("temporal_conv", (width, TEMPORAL_KERNEL), zeros)

    def stages_needed(self) -> list[int]:
        return list(self.layout.backbone_stages[-self.layers:])

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, layers, F·T, D) -> (K, B, rank + D): the query after every stage, beside the
        temporally convolved frame features averaged."""
        stages = [self._normed(x.float()) for x in self.stage_tokens(tokens)]
        k, (b, t, d), w, frames = self.num_configs, stages[0].shape, self.rank, self.layout.frames
        position = self.position.repeat_interleave(t // frames, dim=1)  # (K, F·T, D): frame f's embedding on its tokens
        q = self.query[:, None, None, :].expand(k, b, 1, w)  # (K, B, 1, w)
        for layer, x in enumerate(stages):
            x = x[None] + position[:, None]  # (K, B, F·T, D)
            kv = torch.einsum("kbtd,kde->kbte", x, self.w_kv[:, layer]) + self.b_kv[:, layer, None, None]
            keys, values = kv.split(w, -1)
            q = q + attention(q.reshape(k * b, 1, 1, w), keys.reshape(k * b, 1, t, w),
                              values.reshape(k * b, 1, t, w)).reshape(k, b, 1, w)
        frames_pooled = self.frame_features(stages[-1][None].expand(k, -1, -1, -1))  # (K, B, F, D')
        temporal = (frames_pooled + temporal_convolution(frames_pooled, self.temporal_conv)).mean(2)
        return torch.cat([q[:, :, 0], temporal], -1)

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_norm_weight is None:
            return F.layer_norm(x, (x.shape[-1],), eps=1e-6)
        return F.layer_norm(x, (x.shape[-1],), self.final_norm_weight, self.final_norm_bias, self.final_norm_eps)

