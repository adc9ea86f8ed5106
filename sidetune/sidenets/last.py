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

with A = [a_1 .. a_J] and W_O = [W_o,1; ..; W_o,J] stacked. X_i (γ⊙W) and X_i W_Oᵀ depend on
the data and the parameters only, so a step computes them for every module up front, in two
GEMMs whose input is read once for the whole stack, and the small matrices once; the chain of
modules that remains is r-wide work per configuration, one custom op (sidetune/kernels/chain.py),
instead of a dozen passes over (K, B, T, D) tensors per module. The head needs only
y = x_m + A W_O at the CLS token, or the per-token LN statistics of y for the mean of patch
tokens. Exact in exact arithmetic; tested against the written formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidetune.errors import SidetuneError
from sidetune.kernels import compute_bound
from sidetune.kernels.chain import lowrank_chain
from sidetune.kernels.chain_reference import computed_dtype, groups_reading
from sidetune.sidenets.base import (
    FeatureLayout,
    Parts,
    SideNet,
    ones,
    per_config,
    shared_product,
    uniform_fan_in,
    zeros,
)

LN_EPS = 1e-6


class LowRankAttentionSide(SideNet):
    """What LAST and MIST share: `depth` residual low-rank attention modules after each of a
    sequence of inputs added into a running sum (shared by every configuration), and
    y = last + A W_O through the frozen final norm and pooling.

    The modules' parameters are stacked over modules (lsa_norm_weight, lsa_norm_bias (K, M, D),
    lsa_w_qkv (K, M, D, 3r), lsa_w_o (K, M, r, D)), so a step's work is a fixed number of
    operations whatever the depth: the shared products of every module in two GEMMs, the small
    matrices once, and the chain of modules as one op (sidetune/kernels/chain.py)."""

    norm_without_final_norm = True  # the final norm of y = x_N + side output, as on a ViT
    option_help = {"rank": "attention rank r", "depth": "attention modules per group",
                   "heads": "attention heads, dividing the rank",
                   "zero_init_out": "start every W_o at zero (the network then starts as the linear probe)"}

    def build_modules(self, groups: int, rank: int, depth: int, heads: int, zero_init_out: bool) -> None:
        """`depth` modules after each of `groups` inputs. Module m = i * depth + j starts as the
        module named lsa{i}_{j} did when each was a parameter of its own (same generators)."""
        if rank % heads:
            raise SidetuneError(f"{self.name.upper()} heads ({heads}) must divide the rank ({rank}).")
        if rank > self.layout.width:
            raise SidetuneError(f"{self.name.upper()} --rank {rank} is wider than the backbone's tokens ({self.layout.width}): "
                                f"a low-rank side network's rank is at most their width. Choose --rank {self.layout.width} "
                                "or less.")
        self.rank, self.depth, self.heads, self.groups = rank, depth, heads, groups
        d, names = self.layout.width, [f"lsa{i}_{j}" for i in range(groups) for j in range(depth)]
        modules = len(names)
        per_module = lambda part, init, columns=slice(None): Parts(tuple(  # noqa: E731
            ((m, Ellipsis, columns), f"{name}_{part}", init) for m, name in enumerate(names)))
        self.stacked("lsa.norm_weight", (modules, d), per_module("norm_weight", ones), decay=False)
        self.stacked("lsa.norm_bias", (modules, d), per_module("norm_bias", zeros), decay=False)
        self.stacked("lsa.w_qkv", (modules, d, 3 * rank), Parts(sum((per_module(
            f"w_{projection}", uniform_fan_in(d), slice(i * rank, (i + 1) * rank)).parts
            for i, projection in enumerate("qkv")), ())))
        self.stacked("lsa.w_o", (modules, rank, d), per_module("w_o", zeros if zero_init_out else uniform_fan_in(rank)))

    def upgrade_state(self, state: dict[str, torch.Tensor], stacked: bool) -> dict[str, torch.Tensor]:
        """A state saved when every module had parameters of its own (lsa{i}_{j}_w_q, ...)
        becomes the stacked one: model files and checkpoints written before still load."""
        if "lsa0_0_w_q" not in state:
            return state
        names = [f"lsa{i}_{j}" for i in range(self.groups) for j in range(self.depth)]
        axis = 1 if stacked else 0
        state = dict(state)
        pop = lambda part: [state.pop(f"{name}_{part}") for name in names]  # noqa: E731
        for part in ("norm_weight", "norm_bias", "w_o"):
            state[f"lsa_{part}"] = torch.stack(pop(part), axis)
        columns = [torch.stack(pop(f"w_{projection}"), axis) for projection in "qkv"]
        state["lsa_w_qkv"] = torch.cat(columns, -1)
        return state

    def side_features(self, running: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(K, B, D) pooled features of y = last + A W_O, where the modules of group g read the
        running sum running[g] plus every earlier module's output. `running` is (G, B, T, D) in
        float32 and `last` (B, T, D), both shared by every configuration."""
        groups, b, t, d = running.shape
        k, modules, r, depth = self.num_configs, self.groups * self.depth, self.rank, self.depth
        w_qkv, w_out = self.lsa_w_qkv, self.lsa_w_o
        scaled = w_qkv * self.lsa_norm_weight[..., None]  # γ ⊙ W, (K, M, D, 3r)
        weights = scaled.view(k, groups, depth, d, 3 * r).permute(1, 3, 2, 0, 4).reshape(groups, d, -1)
        s = torch.bmm(running.view(groups, b * t, d), weights).view(groups, b, t, depth, k, 3 * r)
        flat_out = w_out.reshape(k, modules * r, d)
        u = earlier_products(running, flat_out.view(k, modules, r, d), depth)
        mean = running.mean(-1)
        mean_square = torch.linalg.vector_norm(running, dim=-1).square_() / d  # var_mean is 40x slower on a CPU
        bias = torch.einsum("kmd,kmdc->kmc", self.lsa_norm_bias, w_qkv)  # βW
        z = torch.bmm(flat_out, scaled.permute(0, 2, 1, 3).reshape(k, d, modules * 3 * r))  # W_o,j (γ_m ⊙ W_m)
        with torch.autocast(running.device.type, enabled=False):  # statistics: float32
            gram = torch.bmm(flat_out, flat_out.transpose(1, 2)).view(k, modules, r, modules, r)
        a = lowrank_chain(s, u, mean, mean_square, scaled.sum(2), bias, w_out.sum(-1), gram,
                          z.view(k, modules, r, modules, 3 * r), self.heads, d, LN_EPS, self.fused)
        return self._head(last, a.view(k, b, t, modules * r), flat_out)

    def _head(self, last: torch.Tensor, a: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """The frozen final norm and pooling of y = x_m + A W_O: (K, B, D), or (K, B, 2D) for both.
        A clip's y is formed whole and pooled frame by frame, through the temporal step."""
        if self.layout.frames > 1:
            return self.head_features(last[None].to(a.dtype) + torch.einsum("kbtj,kjd->kbtd", a, w_out))
        if self.pool in ("cls", "both") and self.layout.num_prefix_tokens < 1:
            raise SidetuneError(f"pool '{self.pool}' needs a CLS token, but the backbone has none; use --pool mean.")
        parts = []
        if self.pool in ("cls", "both"):
            y = last[None, :, 0].to(a.dtype) + a[:, :, 0] @ w_out  # (K, B, D)
            norm = self.final_norm_weight
            parts.append(y if norm is None else F.layer_norm(y, (y.shape[-1],), norm, self.final_norm_bias, self.final_norm_eps))
        if self.pool in ("mean", "both"):
            parts.append(self._mean_head(last, a, w_out))
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def _mean_head(self, last: torch.Tensor, a: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """The frozen final norm of y = x_m + A W_O per token, averaged over the patch tokens."""
        norm = self.final_norm_weight
        first = self.layout.num_prefix_tokens
        last, a = last[:, first:].to(a.dtype), a[:, :, first:]
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
    temporal_head = True  # video: attention over every frame's tokens, then a temporal step over the frames
    name = "last"
    summary = "LAST: low-rank self-attention side network over every (g-th) stage"
    option_help = {"gap": "read every g-th stage"}
    default_grid = {"lr": [3e-4, 1e-3, 3e-3], "weight_decay": [1e-4, 1e-3], "rank": [8, 16]}

    def __init__(self, layout: FeatureLayout, num_configs: int, pool: str = "auto", rank: int = 16,
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
        running = running_sums(tokens.transpose(0, 1))[1:]  # X_i = x_0 + ... + x_{i+1}
        return self.side_features(running, tokens[:, -1])


def earlier_products(running: torch.Tensor, w_out: torch.Tensor, depth: int) -> torch.Tensor:
    """U = X_g W_o,jᵀ (G, B, T, K, M, r) for every group g and module j, from the running sums
    (G, B, T, D) and W_O (K, M, r, D). Only j < m for a module m of group g is ever read: where
    the step is compute-bound (a CPU) one product per group computes just those (about half the
    work) and the rest stay zero; elsewhere one GEMM computes them all (one launch, not G)."""
    groups, b, t, d = running.shape
    k, modules, r, _ = w_out.shape
    if not compute_bound(running.device):
        return (running.view(-1, d) @ w_out.reshape(-1, d).t()).view(groups, b, t, k, modules, r)
    return _EarlierProducts.apply(running, w_out, depth)


class _EarlierProducts(torch.autograd.Function):
    """earlier_products on a CPU: per group, the products with the modules it reads, written
    into one zero buffer (autograd's in-place slices would copy the whole gradient per group)."""

    @staticmethod
    def forward(ctx, running: torch.Tensor, w_out: torch.Tensor, depth: int) -> torch.Tensor:
        groups, b, t, d = running.shape
        k, modules, r, _ = w_out.shape
        ctx.save_for_backward(running, w_out)
        ctx.depth = depth
        u = running.new_empty(groups, b * t, k, modules, r, dtype=torch.promote_types(running.dtype, w_out.dtype))
        for g, needed in groups_reading(groups, modules, depth):
            u[g, :, :, needed:] = 0
            if needed:
                u[g, :, :, :needed] = (running[g].view(b * t, d) @ w_out[:, :needed].reshape(-1, d).t()).view(b * t, k, needed, r)
        return u.view(groups, b, t, k, modules, r)

    @staticmethod
    def backward(ctx, d_u: torch.Tensor):
        running, w_out = ctx.saved_tensors
        groups, b, t, d = running.shape
        k, modules, r, _ = w_out.shape
        d_u = d_u.reshape(groups, b * t, k, modules, r)
        d_running = torch.zeros_like(running) if ctx.needs_input_grad[0] else None
        d_w = torch.zeros_like(w_out) if ctx.needs_input_grad[1] else None
        for g, needed in groups_reading(groups, modules, ctx.depth):
            if not needed:
                continue
            grad = d_u[g, :, :, :needed].reshape(b * t, -1)
            if d_w is not None:
                d_w[:, :needed] += (grad.t() @ running[g].view(b * t, d).to(grad.dtype)).view(k, needed, r, d)
            if d_running is not None:
                d_running[g] += (grad @ w_out[:, :needed].reshape(-1, d).to(grad.dtype)).view(b, t, d)
        return d_running, d_w, None


def running_sums(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sums over the first axis of (S, B, T, D) inputs, in float32 (float64 given
    it), contiguous. Where the step is compute-bound (a CPU) and without gradients, one add per
    input into the result (a strided torch.cumsum there is 6x slower)."""
    dtype = computed_dtype(x)
    if x.requires_grad or not compute_bound(x.device):
        return torch.cumsum(x, 0, dtype=dtype).contiguous()
    sums = torch.empty(x.shape, dtype=dtype)
    sums[0].copy_(x[0])
    for i in range(1, len(x)):
        torch.add(sums[i - 1], x[i], out=sums[i])
    return sums


def _normalising(mean: torch.Tensor, mean_square: torch.Tensor, eps: float = LN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    return mean, torch.rsqrt((mean_square - mean * mean).clamp_min(0) + eps)


def _corrected_statistics(moments: tuple[torch.Tensor, torch.Tensor], x_out: torch.Tensor, a: torch.Tensor,
                          w_out: torch.Tensor, d: int, eps: float = LN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/std over D of h = x + A W_O per token, (K, B, T) each, from x's own moments
    (B, T), x W_Oᵀ (K, B, T, Jr), A (K, B, T, Jr) and W_O (K, Jr, D). In float32: the variance
    is a difference of moments."""
    with torch.autocast(a.device.type, enabled=False):
        dtype = computed_dtype(a)
        a, x_out, w_out = a.to(dtype), x_out.to(dtype), w_out.to(dtype)
        mean = moments[0] + (a * w_out.sum(-1)[:, None, None, :]).sum(-1) / d
        gram = w_out @ w_out.transpose(1, 2)  # (K, Jr, Jr)
        square = moments[1] + (2 * (x_out * a).sum(-1) + (per_config(a, gram) * a).sum(-1)) / d
        return _normalising(mean, square, eps)
