"""LoSA, Low-rank Side Adaptation (Mercea et al., CVPR 2024), as reconstructed in
docs/methods.md: h_0 = 0; a = z_l + h_{l-1}; h_l = h_{l-1} + M_l(a), where M_l mixes tokens
then channels through low-rank residual MLPs; y = z_N + h_N.

On a video cache the token mixing is factorised, as the paper extends LoSA to video ("the token
dimension into spatial and temporal axes"; no code is public, so this is our reading): a
spatial low-rank mixing of the tokens within each frame, then a temporal one of the frames at
each token position, each a residual MLP with its own norm and a zero-initialised output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidetune.errors import SidetuneError
from sidetune.sidenets.base import FeatureLayout, SideNet, layer_norm_stacked, ones, uniform_fan_in, zeros


class LoSA(SideNet):
    name = "losa"
    summary = "LoSA: low-rank token- and channel-mixing side network"
    option_help = {"token_rank": "token-mixing rank (within each frame, on a video cache)",
                   "channel_rank": "channel-mixing rank",
                   "temporal_rank": "video caches: the rank of the mixing across frames at each token position"}
    norm_without_final_norm = True  # the final norm of y = x_N + side output, as on a ViT
    default_lr = 3e-4  # benchmarks/defaults.py
    default_epochs = 30

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto",
                 token_rank: int = 16, channel_rank: int = 16, standardize: bool = False, temporal_rank: int = 4):
        super().__init__(layout, num_configs, pool, standardize)
        if channel_rank > layout.width:  # (a token rank above the tokens is merely generous: caches of few tokens)
            raise SidetuneError(f"LoSA --channel-rank {channel_rank} exceeds the backbone's {layout.width} channels: a "
                                f"low-rank mixing's rank is at most that. Choose --channel-rank {layout.width} or less.")
        self.token_rank, self.channel_rank, self.temporal_rank = token_rank, channel_rank, temporal_rank
        self.build_stage_embeddings()
        d, t, frames = layout.width, layout.frame_tokens, layout.frames
        for layer in range(1, layout.depth + 1):
            prefix = f"mixer{layer}"
            for norm in ("token_norm", "channel_norm") + (("temporal_norm",) if frames > 1 else ()):
                self.stacked(f"{prefix}.{norm}_weight", (d,), ones, decay=False)
                self.stacked(f"{prefix}.{norm}_bias", (d,), zeros, decay=False)
            if frames > 1:
                self.stacked(f"{prefix}.w_f1", (frames, temporal_rank), uniform_fan_in(frames))
                self.stacked(f"{prefix}.b_f1", (temporal_rank,), uniform_fan_in(frames), decay=False)
                self.stacked(f"{prefix}.w_f2", (temporal_rank, frames), zeros)
                self.stacked(f"{prefix}.b_f2", (frames,), zeros, decay=False)
            self.stacked(f"{prefix}.w_t1", (t, token_rank), uniform_fan_in(t))
            self.stacked(f"{prefix}.b_t1", (token_rank,), uniform_fan_in(t), decay=False)
            self.stacked(f"{prefix}.w_t2", (token_rank, t), zeros)
            self.stacked(f"{prefix}.b_t2", (t,), zeros, decay=False)
            self.stacked(f"{prefix}.w_c1", (d, channel_rank), uniform_fan_in(d))
            self.stacked(f"{prefix}.b_c1", (channel_rank,), uniform_fan_in(d), decay=False)
            self.stacked(f"{prefix}.w_c2", (channel_rank, d), zeros)
            self.stacked(f"{prefix}.b_c2", (d,), zeros, decay=False)

    def stages_needed(self) -> list[int]:
        return list(range(1, self.layout.depth + 1))

    def represent(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.uniform_stages(tokens)
        k = self.num_configs
        h = torch.zeros(k, *tokens[:, 0].shape, device=tokens.device)  # float32: the stored 16-bit tokens add into it
        for layer in range(1, self.layout.depth + 1):
            a = tokens[:, layer - 1] + h
            h = h + self._mix(a, f"mixer{layer}") - a
        return tokens[:, -1] + h

    def _mix(self, a: torch.Tensor, prefix: str) -> torch.Tensor:
        """a (K, B, F·T, D) -> the mixed (K, B, F·T, D): tokens within each frame, frames at each
        token position (video only), then channels."""
        p = lambda name: getattr(self, f"{prefix}_{name}")
        k, b, tokens, d = a.shape
        frames = self.layout.frames
        a = a.reshape(k, b * frames, tokens // frames, d)  # a clip's frames mixed one by one
        x = layer_norm_stacked(a, p("token_norm_weight"), p("token_norm_bias")).transpose(2, 3)  # (K,B,D,T)
        x = F.gelu(torch.einsum("kbdt,ktr->kbdr", x, p("w_t1")) + p("b_t1")[:, None, None])
        x = torch.einsum("kbdr,krt->kbdt", x, p("w_t2")) + p("b_t2")[:, None, None]
        t = (a + x.transpose(2, 3)).reshape(k, b, tokens, d)
        if frames > 1:  # across frames, at each token position: (K, B, T, D, F)
            x = layer_norm_stacked(t, p("temporal_norm_weight"), p("temporal_norm_bias"))
            x = x.reshape(k, b, frames, tokens // frames, d).permute(0, 1, 3, 4, 2)
            x = F.gelu(torch.einsum("kbtdf,kfr->kbtdr", x, p("w_f1")) + p("b_f1")[:, None, None, None])
            x = torch.einsum("kbtdr,krf->kbtdf", x, p("w_f2")) + p("b_f2")[:, None, None, None]
            t = t + x.permute(0, 1, 4, 2, 3).reshape(k, b, tokens, d)
        x = layer_norm_stacked(t, p("channel_norm_weight"), p("channel_norm_bias"))
        x = F.gelu(torch.einsum("kbtd,kdr->kbtr", x, p("w_c1")) + p("b_c1")[:, None, None])
        return t + torch.einsum("kbtr,krd->kbtd", x, p("w_c2")) + p("b_c2")[:, None, None]
