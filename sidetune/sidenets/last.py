"""LAST, Low-rank Attention Side-Tuning (Tang et al., arXiv 2402.04009), as reconstructed in
docs/methods.md: u_0 = x_0, u_i = F_i(u_{i-1} + x_i), y = u_m - sum_{i<m} x_i, where each F_i
is `depth` residual low-rank attention modules h + W_o MHA_r(LN(h)).

Computed without ever forming a configuration's (B, T, D) side state. Write X_i = x_0 + ... + x_i
(shared by every configuration) and a_j = MHA_r(LN(h)) of module j (rank r). Then every module's
input is h = X_i + c with c = sum_j a_j W_o,j, a rank-(J r) correction, and everything LN(h)
needs follows from low-rank products:

    mean(h)  = mean(X_i) + A (W_O 1) / D
    mean(h²) = mean(X_i²) + 2 <X_i W_Oᵀ, A> / D + <A W_O W_Oᵀ, A> / D
    LN(h) W  = rstd (X_i (γ⊙W) + A W_O (γ⊙W) - mean(h) 1ᵀ(γ⊙W)) + βW

with A = [a_1 .. a_J] and W_O = [W_o,1; ..; W_o,J] stacked. So a module costs one product of
the shared X_i with all configurations' (D, 3r + J r) matrices (tensor-core work whose input is
read once for the whole stack) and r-wide operations per configuration, instead of a dozen
passes over (K, B, T, D) tensors. The head needs only y = x_m + A W_O at the CLS token, or the
per-token LN statistics of y for the mean of patch tokens. Exact in exact arithmetic; tested
against the written formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidetune.errors import SidetuneError
from sidetune.sidenets.base import (FeatureLayout, SideNet, attention, ones, per_config, shared_product,
                                    uniform_fan_in, zeros)

LN_EPS = 1e-6


class LowRankAttentionSide(SideNet):
    """What LAST and MIST share: `depth` residual low-rank attention modules after each of a
    sequence of inputs added into a running sum (shared by every configuration), and
    y = last + A W_O through the frozen final norm and pooling."""

    norm_without_final_norm = True  # the final norm of y = x_N + side output, as on a ViT

    def build_modules(self, groups: int, rank: int, depth: int, heads: int, zero_init_out: bool) -> None:
        """`depth` modules after each of `groups` inputs, named lsa{group}_{module}."""
        if rank % heads:
            raise SidetuneError(f"{self.name.upper()} heads ({heads}) must divide the rank ({rank}).")
        self.rank, self.depth, self.heads, self.groups = rank, depth, heads, groups
        d = self.layout.width
        for i in range(groups):
            for j in range(depth):
                prefix = f"lsa{i}_{j}"
                self.stacked(f"{prefix}.norm_weight", (d,), ones, decay=False)
                self.stacked(f"{prefix}.norm_bias", (d,), zeros, decay=False)
                for projection in ("q", "k", "v"):
                    self.stacked(f"{prefix}.w_{projection}", (d, rank), uniform_fan_in(d))
                self.stacked(f"{prefix}.w_o", (rank, d), zeros if zero_init_out else uniform_fan_in(rank))

    def side_features(self, inputs: list[torch.Tensor], last: torch.Tensor) -> torch.Tensor:
        """(K, B, D) pooled features of y = last + A W_O, where the modules after input i read
        the running sum inputs[0] + ... + inputs[i] plus every earlier module's output. `inputs`
        and `last` are (B, T, D), shared by every configuration."""
        running = inputs[0]
        attended: list[torch.Tensor] = []  # a_j, (K, B, T, r) each
        outputs: list[torch.Tensor] = []  # W_o,j, (K, r, D) each
        for i in range(self.groups):
            if i:
                running = running + inputs[i]
            moments = running.mean(-1), running.square().mean(-1)  # (B, T) each, shared
            for j in range(self.depth):
                attended.append(self._attend(running, moments, attended, outputs, f"lsa{i}_{j}"))
                outputs.append(getattr(self, f"lsa{i}_{j}_w_o"))
        return self._head(last, torch.cat(attended, -1), torch.cat(outputs, 1))

    def _attend(self, x: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor], attended: list[torch.Tensor],
                outputs: list[torch.Tensor], prefix: str) -> torch.Tensor:
        """a = MHA_r(LN(x + sum_j a_j W_o,j)) for every configuration, (K, B, T, r)."""
        k, (b, t, d), r = self.num_configs, x.shape, self.rank
        p = lambda name: getattr(self, f"{prefix}_{name}")
        w = torch.cat([p("w_q"), p("w_k"), p("w_v")], dim=-1)  # (K, D, 3r)
        scaled = p("norm_weight")[:, :, None] * w  # γ ⊙ W
        bias = torch.einsum("kd,kdr->kr", p("norm_bias"), w)  # βW
        if not attended:  # the first module: h = x_0 + x_1, no correction yet
            mean, rstd = _normalising(*moments)
            projected = shared_product(x, scaled)
            qkv = rstd[None, ..., None] * (projected - mean[None, ..., None] * scaled.sum(1)[:, None, None, :])
        else:
            a, w_out = torch.cat(attended, -1), torch.cat(outputs, 1)  # (K, B, T, Jr), (K, Jr, D)
            projected = shared_product(x, torch.cat([scaled, w_out.transpose(1, 2)], -1))  # (K, B, T, 3r + Jr)
            x_scaled, x_out = projected[..., :3 * r], projected[..., 3 * r:]
            mean, rstd = _corrected_statistics(moments, x_out, a, w_out, d)
            projected = x_scaled + per_config(a, w_out @ scaled)  # h (γ⊙W)
            qkv = rstd[..., None] * (projected - mean[..., None] * scaled.sum(1)[:, None, None, :])
        qkv = qkv + bias[:, None, None, :]
        q, key, v = qkv.reshape(k * b, t, 3, self.heads, r // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return attention(q, key, v).transpose(1, 2).reshape(k, b, t, r)  # from (K*B, heads, T, r/heads)

    def _head(self, last: torch.Tensor, a: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """The frozen final norm and pooling of y = x_m + A W_O: (K, B, D), or (K, B, 2D) for both."""
        if self.pool in ("cls", "both") and self.layout.num_prefix_tokens < 1:
            raise SidetuneError(f"pool '{self.pool}' needs a CLS token, but the backbone has none; use --pool mean.")
        parts = []
        if self.pool in ("cls", "both"):
            y = last[None, :, 0] + a[:, :, 0] @ w_out  # (K, B, D)
            norm = self.final_norm_weight
            parts.append(y if norm is None else F.layer_norm(y, (y.shape[-1],), norm, self.final_norm_bias, self.final_norm_eps))
        if self.pool in ("mean", "both"):
            parts.append(self._mean_head(last, a, w_out))
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def _mean_head(self, last: torch.Tensor, a: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """The frozen final norm of y = x_m + A W_O per token, averaged over the patch tokens."""
        norm = self.final_norm_weight
        first = self.layout.num_prefix_tokens
        last, a = last[:, first:], a[:, :, first:]
        if norm is None:
            return last.mean(1)[None] + a.mean(2) @ w_out
        d = last.shape[-1]
        x_out = shared_product(last, w_out.transpose(1, 2))
        moments = last.mean(-1), last.square().mean(-1)
        mean, rstd = _corrected_statistics(moments, x_out, a, w_out, d, self.final_norm_eps)
        weighted = torch.einsum("kbt,btd->kbd", rstd, last) + torch.einsum("kbt,kbtj->kbj", rstd, a) @ w_out
        centred = (weighted - (rstd * mean).sum(-1, keepdim=True)) / last.shape[1]
        return centred * norm + self.final_norm_bias


class LAST(LowRankAttentionSide):
    name = "last"
    default_grid = {"lr": [3e-4, 1e-3, 3e-3], "weight_decay": [1e-4, 1e-3], "rank": [8, 16]}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "cls", rank: int = 16,
                 gap: int = 1, depth: int = 1, heads: int = 1, zero_init_out: bool = True,
                 standardize: bool = False):
        super().__init__(layout, num_configs, pool, standardize)
        if layout.depth % gap:
            raise SidetuneError(f"LAST gap {gap} must divide the backbone depth {layout.depth}; choose a divisor.")
        self.gap = gap
        self.build_stage_embeddings()
        self.build_modules(len(self.stages_needed()) - 1, rank, depth, heads, zero_init_out)

    def stages_needed(self) -> list[int]:
        """Stage 0 (the tokens entering block 1), then every `gap`-th block's output; a backbone
        without stage 0 (read through forward_intermediates) starts from its first such stage."""
        return [stage for stage in range(0, self.layout.depth + 1, self.gap) if stage >= self.layout.first_stage]

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.uniform_stages(tokens)  # u_0 = x_0; the first modules read x_0 + x_1
        inputs = [tokens[:, 0].float() + tokens[:, 1]] + [tokens[:, i] for i in range(2, tokens.shape[1])]
        return self.side_features(inputs, tokens[:, -1].float())


def _normalising(mean: torch.Tensor, mean_square: torch.Tensor, eps: float = LN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    return mean, torch.rsqrt((mean_square - mean * mean).clamp_min(0) + eps)


def _corrected_statistics(moments: tuple[torch.Tensor, torch.Tensor], x_out: torch.Tensor, a: torch.Tensor,
                          w_out: torch.Tensor, d: int, eps: float = LN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/std over D of h = x + A W_O per token, (K, B, T) each, from x's own moments
    (B, T), x W_Oᵀ (K, B, T, Jr), A (K, B, T, Jr) and W_O (K, Jr, D). In float32: the variance
    is a difference of moments."""
    with torch.autocast(a.device.type, enabled=False):
        a, x_out, w_out = a.float(), x_out.float(), w_out.float()
        mean = moments[0] + (a * w_out.sum(-1)[:, None, None, :]).sum(-1) / d
        gram = w_out @ w_out.transpose(1, 2)  # (K, Jr, Jr)
        square = moments[1] + (2 * (x_out * a).sum(-1) + (per_config(a, gram) * a).sum(-1)) / d
        return _normalising(mean, square, eps)
