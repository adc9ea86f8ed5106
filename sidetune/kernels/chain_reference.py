"""The chain of low-rank attention modules (LAST, MIST) in torch: the reference the Triton
kernels are checked against, and the implementation on the CPU and wherever they are not used.

What the chain computes, per configuration and image, for modules m = 0..M-1 (module m is
module p of group g = m // P, reading the group's running sum X_g; see sidetune/sidenets/last.py
for why this equals LayerNorm and attention of the D-wide side state):

    mean_m = mean(X_g) + sum_{j<m} a_j w1_j / D
    msq_m  = msq(X_g) + (2 sum_{j<m} <U_{g,j}, a_j> + sum_{j,l<m} a_j G_jl a_l) / D
    rstd_m = 1 / sqrt(max(msq_m - mean_m^2, 0) + eps)
    qkv_m  = rstd_m (S_m + sum_{j<m} a_j Z_jm - mean_m c_m) + b_m
    a_m    = MHA(q_m, k_m, v_m)                      (heads over the r columns of each of q, k, v)

with the shared products S_m = X_g (γ_m ⊙ W_m) and U_{g,j} = X_g W_o,jᵀ, and the small matrices
w1_j = W_o,j 1, G_jl = W_o,j W_o,lᵀ, Z_jm = W_o,j (γ_m ⊙ W_m), c_m = 1ᵀ(γ_m ⊙ W_m), b_m = β_m W_m,
all computed once per step outside the chain. Layouts (all float32 but S and U):

    s       (G, B, T, P, K, 3r)   X_g (γ⊙W) for module g*P + p: one batched GEMM's output
    u       (G, B, T, K, M, r)    X_g W_Oᵀ for every module's W_o: one GEMM's output
    x_mean, x_msq (G, B, T)       the running sums' own moments over D
    c, bias (K, M, 3r);  w1 (K, M, r);  gram (K, M, r, M, r);  z (K, M, r, M, 3r)

The forward returns the attention outputs a (K, B, T, M, r) and what the backward reads
(q, k, v (K, B, M, 3, T, r), the statistics mean and var (K, B, M, T) and the softmax
log-sum-exp (K, B, M, H, T)); the backward turns the gradient of a into those of the
projections (d_proj, in s's layout) and of each module's statistics (d_mean, d_msq), from which
sidetune/kernels/chain.py forms every input's gradient."""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula


def computed_dtype(x: torch.Tensor) -> torch.dtype:
    """The chain computes in float32, or in float64 when given it (the exactness tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def groups_reading(groups: int, modules: int, depth: int) -> list[tuple[int, int]]:
    """(group g, how many modules j its modules read U_{g,j} of: those before its last)."""
    return [(g, min((g + 1) * depth, modules) - 1) for g in range(groups)]


def chain_forward(s: torch.Tensor, u: torch.Tensor, x_mean: torch.Tensor, x_msq: torch.Tensor, c: torch.Tensor,
                  bias: torch.Tensor, w1: torch.Tensor, gram: torch.Tensor, z: torch.Tensor, heads: int, width: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, qkv, mean, var, lse) of the chain, every configuration and image at once."""
    groups, b, t, depth, k, three_r = s.shape
    r, modules = three_r // 3, groups * depth
    e = r // heads
    like = dict(device=s.device, dtype=computed_dtype(x_mean))
    a = torch.zeros(k, b, t, modules, r, **like)
    qkv_saved = torch.empty(k, b, modules, 3, t, r, **like)
    mean_saved = torch.empty(k, b, modules, t, **like)
    var_saved = torch.empty_like(mean_saved)
    lse_saved = torch.empty(k, b, modules, heads, t, **like)
    square_of_correction = torch.zeros(k, b * t, **like)  # |sum_{j<m} a_j W_o,j|^2 per token
    c, bias, w1, gram, z = (x.to(a.dtype) for x in (c, bias, w1, gram, z))
    for m in range(modules):
        g, p = divmod(m, depth)
        proj = s[g, :, :, p].permute(2, 0, 1, 3).to(a.dtype).reshape(k, b * t, three_r)
        mean = x_mean[g].reshape(1, b * t).expand(k, -1)
        msq = x_msq[g].reshape(1, b * t) + square_of_correction / width
        earlier = a[:, :, :, :m].reshape(k, b * t, m * r)
        if m:
            mean = mean + (earlier @ w1[:, :m].reshape(k, m * r, 1)).squeeze(-1) / width
            cross = (u[g, :, :, :, :m].to(a.dtype).permute(2, 0, 1, 3, 4).reshape(k, b * t, m * r) * earlier).sum(-1)
            msq = msq + 2 * cross / width
            proj = proj + earlier @ z[:, :m, :, m].reshape(k, m * r, three_r)
        var = msq - mean * mean
        rstd = torch.rsqrt(var.clamp_min(0) + eps)
        qkv = rstd[..., None] * (proj - mean[..., None] * c[:, m, None, :]) + bias[:, m, None, :]
        q, key, v = qkv.view(k * b, t, 3, heads, e).permute(2, 0, 3, 1, 4)  # (K B, H, T, e) each
        out, lse = attention(q, key, v)
        a[:, :, :, m] = out.transpose(1, 2).reshape(k, b, t, r)
        a_m = a[:, :, :, m].reshape(k, b * t, r)
        added = ((a_m @ gram[:, m, :, m]) * a_m).sum(-1)
        if m:
            added = added + 2 * ((earlier @ gram[:, :m, :, m].reshape(k, m * r, r)) * a_m).sum(-1)
        square_of_correction = square_of_correction + added
        qkv_saved[:, :, m] = qkv.view(k, b, t, 3, r).permute(0, 1, 3, 2, 4)
        mean_saved[:, :, m] = mean.view(k, b, t)
        var_saved[:, :, m] = var.view(k, b, t)
        lse_saved[:, :, m] = lse.view(k, b, heads, t)
    return a, qkv_saved, mean_saved, var_saved, lse_saved


def chain_backward(grad_a: torch.Tensor, a: torch.Tensor, qkv: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   lse: torch.Tensor, u: torch.Tensor, c: torch.Tensor, bias: torch.Tensor, w1: torch.Tensor,
                   gram: torch.Tensor, z: torch.Tensor, depth: int, width: int, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_proj (G, B, T, P, K, 3r), d_mean (K, B, M, T), d_msq (K, B, M, T)) from the gradient
    of a. Modules are visited last to first; what module m's gradient of a_m needs from later
    modules is kept as running sums (of their statistics' gradients, per group for the U term)
    and as their stored gradients, read as slices, so no step costs more than linear work."""
    k, b, t, modules, r = a.shape
    groups, heads = modules // depth, lse.shape[3]
    e, n = r // heads, b * t
    like = dict(device=a.device, dtype=a.dtype)
    d_proj = torch.zeros(k, n, modules, 3 * r, **like)
    d_mean = torch.zeros(k, b, modules, t, **like)
    d_msq = torch.zeros(k, b, modules, t, **like)
    mean_after = torch.zeros(k, n, 1, **like)  # sum_{l > m} d_mean_l
    msq_after = torch.zeros(k, n, 1, **like)  # sum_{l > m} d_msq_l / D
    msq_after_by_group = torch.zeros(groups, k, b, t, 1, **like)  # the same per group of the later modules
    weighted = torch.zeros(k, n, modules, r, **like)  # a_l sum_{i > l} d_msq_i / D, written as l is reached
    c, bias, w1, gram, z = (x.to(a.dtype) for x in (c, bias, w1, gram, z))
    a_flat = a.view(k, n, modules * r)
    for m in reversed(range(modules)):
        g, p = divmod(m, depth)
        after = slice(m + 1, modules)
        da = grad_a[:, :, :, m].to(a.dtype).reshape(k, n, r)
        # a_m feeds every later module's projections, mean and (through U) mean square ...
        if m + 1 < modules:
            da = da + d_proj[:, :, after].reshape(k, n, -1) @ z[:, m, :, after].reshape(k, r, -1).transpose(1, 2)
        da = da + mean_after / width * w1[:, m, None, :]
        first = (m + 1) // depth  # the first group with a module after m
        if first < groups:
            u_term = (msq_after_by_group[first:] * u[first:, :, :, :, m].permute(0, 3, 1, 2, 4)).sum(0)
            da = da + 2 * u_term.reshape(k, n, r)
        # ... and the |C|^2 term 2 sum_l a_l G_lm w(max(l, m)), w(i) = sum_{j > i} d_msq_j / D
        weighted[:, :, m] = a[:, :, :, m].reshape(k, n, r) * msq_after
        da = da + 2 * msq_after * (a_flat[:, :, :(m + 1) * r] @ gram[:, :m + 1, :, m].reshape(k, -1, r))
        if m + 1 < modules:
            da = da + 2 * weighted[:, :, after].reshape(k, n, -1) @ gram[:, after, :, m].reshape(k, -1, r)

        q, key, v = qkv[:, :, m].reshape(k * b, 3, t, heads, e).transpose(2, 3).unbind(1)  # (K B, H, T, e)
        out = a[:, :, :, m].reshape(k * b, t, heads, e).transpose(1, 2)
        d_out = da.view(k * b, t, heads, e).transpose(1, 2)
        d_q, d_k, d_v = attention_backward(d_out, q, key, v, out, lse[:, :, m].reshape(k * b, heads, t))
        d_qkv = torch.stack([d_q, d_k, d_v], 1).permute(0, 3, 1, 2, 4).reshape(k, n, 3 * r)

        qkv_m = qkv[:, :, m].permute(0, 1, 3, 2, 4).reshape(k, n, 3 * r)
        var_m, mean_m = var[:, :, m].reshape(k, n), mean[:, :, m].reshape(k, n)
        rstd = torch.rsqrt(var_m.clamp_min(0) + eps)
        d_rstd = (d_qkv * (qkv_m - bias[:, m, None, :])).sum(-1) / rstd
        d_var = torch.where(var_m >= 0, -0.5 * rstd ** 3 * d_rstd, 0.0)
        d_mean_m = -rstd * (d_qkv * c[:, m, None, :]).sum(-1) - 2 * mean_m * d_var
        d_mean[:, :, m], d_msq[:, :, m] = d_mean_m.view(k, b, t), d_var.view(k, b, t)
        d_proj[:, :, m] = rstd[..., None] * d_qkv
        mean_after += d_mean_m[..., None]
        msq_after += d_var[..., None] / width
        msq_after_by_group[g] += d_var.view(k, b, t, 1) / width
    d_proj = d_proj.view(k, b, t, groups, depth, 3 * r).permute(3, 1, 2, 4, 0, 5).contiguous()
    return d_proj, d_mean, d_msq


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of (N, H, T, e) queries, keys and values: the output and the
    log-sum-exp of each query's scaled scores (N, H, T). On the CPU, torch's flash attention
    (several times faster than the written products, which run elsewhere)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    lse = scores.logsumexp(-1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def attention_backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k and v from that of attention's output, with its saved log-sum-exp."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(d_out, q, k, v, out, lse, 0.0, False)
    scale = 1 / math.sqrt(q.shape[-1])
    probabilities = torch.exp(q @ k.transpose(-1, -2) * scale - lse[..., None])
    d_probabilities = d_out @ v.transpose(-1, -2)
    d_scores = probabilities * (d_probabilities - (d_out * out).sum(-1, keepdim=True)) * scale
    return d_scores @ k, d_scores.transpose(-1, -2) @ q, probabilities.transpose(-1, -2) @ d_out


def _cpu_attention_flops(q, k, v, *args, **kwargs) -> int:
    n, heads, t, e = q  # shapes, as FlopCounterMode passes them
    return 2 * 2 * n * heads * t * k[2] * e  # QKᵀ and PV


def _cpu_attention_backward_flops(d_out, q, k, v, *args, **kwargs) -> int:
    n, heads, t, e = q
    return 5 * 2 * n * heads * t * k[2] * e  # the scores again, dV, dP, dQ, dK


for _op, _formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, _cpu_attention_flops),
                      (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, _cpu_attention_backward_flops)):
    if _op not in flop_registry:  # torch counts its other attention kernels, not yet these
        register_flop_formula(_op)(_formula)


def chain_flops(groups: int, images: int, tokens: int, depth: int, configs: int, rank: int, heads: int
                ) -> tuple[int, int]:
    """(forward, backward) FLOPs of the chain's matrix products (2 per multiply-add; the U
    terms are elementwise products, not counted), as chain_forward and chain_backward with the
    gradients of the small matrices compute them;
    registered as the custom ops' FLOP formulas, so torch's FlopCounterMode counts the chain."""
    k, n, t, r, e = configs, images * tokens, tokens, rank, rank // heads
    modules = groups * depth
    attention = 2 * k * images * heads * t * t * e  # one (T, T, e) product of every head
    forward = backward = 0
    for m in range(modules):
        forward += 2 * k * n * m * r * (1 + 3 * r + r) + 2 * k * n * r * r + 2 * attention  # w1, Z, G; QKᵀ, PV
        backward += 2 * k * n * (modules - m - 1) * r * 3 * r + 2 * k * n * modules * r * r + 5 * attention
    backward += (2 * 2 * k * modules * n * 3 * r + 2 * k * n * modules * modules * (2 + groups)  # c, b; the masks
                 + 2 * k * modules * n * r + 2 * k * n * (modules * r) ** 2 + 2 * k * n * modules * r * modules * 3 * r)
    return forward, backward
