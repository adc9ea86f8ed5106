"""The low-rank attention chain as one torch custom op with its own backward
(`sidetune::lowrank_chain`, `sidetune::lowrank_chain_backward`).

Autograd, CUDA graphs and torch.compile see one op forward and one backward, whatever the
number of modules. Each runs either the torch reference (sidetune/kernels/chain_reference.py:
the CPU's implementation, and the GPU's unless asked otherwise) or, with `fused`, the Triton
kernels (sidetune/kernels/chain_triton.py: one launch for the forward chain, one for its
backward). Both produce the same saved tensors, so either backward follows either forward.

Each implementation's backward returns the gradients of each module's projections and
statistics; the gradients of the small matrices and of U are formed from them inside the
backward op with a few batched products (sums over every image and token), the same for both."""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import register_flop_formula

from sidetune.kernels import chain_reference, compute_bound
from sidetune.kernels.chain_reference import groups_reading

Tensors5 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _implementation(fused: bool):
    if not fused:
        return chain_reference
    from sidetune.kernels import chain_triton  # imports triton: only where the fused kernels run

    return chain_triton


@torch.library.custom_op("sidetune::lowrank_chain", mutates_args=())
def _chain(s: torch.Tensor, u: torch.Tensor, x_mean: torch.Tensor, x_msq: torch.Tensor, c: torch.Tensor,
           bias: torch.Tensor, w1: torch.Tensor, gram: torch.Tensor, z: torch.Tensor, heads: int, width: int,
           eps: float, fused: bool) -> Tensors5:
    return _implementation(fused).chain_forward(s, u, x_mean, x_msq, c, bias, w1, gram, z, heads, width, eps)


@_chain.register_fake
def _(s, u, x_mean, x_msq, c, bias, w1, gram, z, heads, width, eps, fused):
    groups, b, t, depth, k, three_r = s.shape
    modules, r = groups * depth, three_r // 3
    new = lambda *shape: s.new_empty(shape, dtype=chain_reference.computed_dtype(x_mean))  # noqa: E731
    return (new(k, b, t, modules, r), new(k, b, modules, 3, t, r), new(k, b, modules, t), new(k, b, modules, t),
            new(k, b, modules, heads, t))


@torch.library.custom_op("sidetune::lowrank_chain_backward", mutates_args=())
def _chain_backward(grad_a: torch.Tensor, a: torch.Tensor, qkv: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    lse: torch.Tensor, u: torch.Tensor, c: torch.Tensor, bias: torch.Tensor, w1: torch.Tensor,
                    gram: torch.Tensor, z: torch.Tensor, depth: int, width: int, eps: float, fused: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    """The gradients of s, u, c, bias, w1, gram and z (float32, or float64 given it)."""
    d_proj, d_mean, d_msq = _implementation(fused).chain_backward(grad_a, a, qkv, mean, var, lse, u, c, bias, w1, gram,
                                                                  z, depth, width, eps)
    return (d_proj, *input_gradients(a, mean, var, d_proj, d_mean, d_msq, depth, width, eps))


@_chain_backward.register_fake
def _(grad_a, a, qkv, mean, var, lse, u, c, bias, w1, gram, z, depth, width, eps, fused):
    k, b, t, modules, r = a.shape
    new = a.new_empty
    return (new(modules // depth, b, t, depth, k, 3 * r), new(u.shape), new(c.shape), new(bias.shape), new(w1.shape),
            new(gram.shape), new(z.shape))


def _setup_context(ctx, inputs, output) -> None:
    s, u, x_mean, x_msq, c, bias, w1, gram, z, heads, width, eps, fused = inputs
    if x_mean.requires_grad or x_msq.requires_grad:
        raise ValueError("lowrank_chain treats the running sums' moments as data; they must not require grad")
    a, qkv, mean, var, lse = output
    ctx.set_materialize_grads(False)  # only a's gradient is ever used: no zeros launched for the others
    ctx.save_for_backward(a, qkv, mean, var, lse, u, c, bias, w1, gram, z)
    ctx.depth, ctx.width, ctx.eps, ctx.fused = s.shape[3], width, eps, fused
    ctx.dtypes = s.dtype, u.dtype


def _backward(ctx, grad_a, *unused):
    a, qkv, mean, var, lse, u, c, bias, w1, gram, z = ctx.saved_tensors
    d_s, d_u, d_c, d_bias, d_w1, d_gram, d_z = _chain_backward(grad_a.contiguous(), a, qkv, mean, var, lse, u, c, bias, w1,
                                                               gram, z, ctx.depth, ctx.width, ctx.eps, ctx.fused)
    s_dtype, u_dtype = ctx.dtypes
    return (d_s.to(s_dtype), d_u.to(u_dtype), None, None, d_c.to(c.dtype), d_bias.to(bias.dtype), d_w1.to(w1.dtype),
            d_gram.to(gram.dtype), d_z.to(z.dtype), None, None, None, None)


_chain.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.sidetune.lowrank_chain)
def _chain_flops(s, u, x_mean, x_msq, c, bias, w1, gram, z, heads, *args, **kwargs) -> int:
    groups, b, t, depth, k, three_r = s  # shapes, as FlopCounterMode passes them
    return chain_reference.chain_flops(groups, b, t, depth, k, three_r // 3, heads)[0]


@register_flop_formula(torch.ops.sidetune.lowrank_chain_backward)
def _chain_backward_flops(grad_a, a, qkv, mean, var, lse, u, c, bias, w1, gram, z, depth, *args, **kwargs) -> int:
    k, b, t, modules, r = a  # shapes, as FlopCounterMode passes them
    return chain_reference.chain_flops(modules // depth, b, t, depth, k, r, lse[3])[1]


def lowrank_chain(s: torch.Tensor, u: torch.Tensor, x_mean: torch.Tensor, x_msq: torch.Tensor, c: torch.Tensor,
                  bias: torch.Tensor, w1: torch.Tensor, gram: torch.Tensor, z: torch.Tensor, heads: int, width: int,
                  eps: float, fused: bool = False) -> torch.Tensor:
    """The attention outputs a (K, B, T, M, r) of the chain described in
    sidetune/kernels/chain_reference.py, differentiable in every input but the moments."""
    return _chain(s, u, x_mean, x_msq, c, bias, w1, gram, z, heads, width, eps, fused)[0]


@functools.lru_cache(maxsize=None)
def _masks(modules: int, depth: int, width: int, device: torch.device, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """later[m, j] = m > j; in_group_later[m, g, j] = module m is in group g and m > j, times
    2 / D; later / D; lower[j, l] = l <= j (bool). Made once per shape, with the gradients'
    constant factors folded in (a step launches nothing for them)."""
    index = torch.arange(modules, device=device)
    later = (index[:, None] > index[None, :]).to(dtype)
    groups = torch.arange(modules // depth, device=device)
    in_group = (index[:, None] // depth == groups[None, :]).to(dtype)
    in_group_later = in_group[:, :, None] * later[:, None, :] * (2 / width)
    return later, in_group_later, later / width, index[None, :] <= index[:, None]


def input_gradients(a: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, d_proj: torch.Tensor,
                    d_mean: torch.Tensor, d_msq: torch.Tensor, depth: int, width: int, eps: float
                    ) -> tuple[torch.Tensor, ...]:
    """The gradients of U, c, b, w1, G and Z from the chain's per-module gradients: each a sum
    over every image and token of products with the saved attention outputs and statistics."""
    k, b, t, modules, r = a.shape
    groups = modules // depth
    later, in_group_later, later_over_width, lower = _masks(modules, depth, width, a.device, a.dtype)
    # qkv = rstd (proj - mean c) + bias: d_c = -sum mean d_proj, d_bias = sum d_proj / rstd, in one product
    weights = torch.stack([-mean, torch.sqrt(var.clamp_min(0) + eps)]).view(2, k, b, groups, depth, t)
    d_c, d_bias = torch.einsum("skbgpt,gbtpkc->skgpc", weights, d_proj).reshape(2, k, modules, 3 * r)
    d_bias = d_bias.clone()  # a custom op's outputs may not share storage
    # mean_m = ... + sum_{j<m} a_j w1_j / D
    d_w1 = torch.einsum("kbtjr,kbtj->kjr", a, torch.einsum("kbmt,mj->kbtj", d_mean, later_over_width))
    # msq_m = ... + 2 sum_{j<m} <U_{g(m),j}, a_j> / D + sum_{j,l<m} a_j G_jl a_l / D
    msq_in_group = torch.einsum("kbmt,mgj->gbtkj", d_msq, in_group_later)[..., None]
    a_by_token = a.permute(1, 2, 0, 3, 4)[None]
    if compute_bound(a.device):  # only the entries a group reads (about half), one product per group
        d_u = a.new_empty(groups, b, t, k, modules, r)
        for g, needed in groups_reading(groups, modules, depth):
            torch.mul(msq_in_group[g, ..., :needed, :], a_by_token[0, ..., :needed, :], out=d_u[g, ..., :needed, :])
            d_u[g, ..., needed:, :] = 0
    else:
        d_u = msq_in_group * a_by_token  # in U's layout
    msq_after = torch.einsum("kbmt,mi->kbti", d_msq, later_over_width)  # [i]: sum_{m > i} d_msq_m / D
    weighted = torch.einsum("kbtjr,kbtj->kbtjr", a, msq_after)  # for l <= j the weight of pair (j, l)
    pairs = torch.bmm(weighted.reshape(k, b * t, -1).transpose(1, 2), a.reshape(k, b * t, -1)).view(k, modules, r, modules, r)
    d_gram = torch.where(lower[None, :, None, :, None], pairs, pairs.permute(0, 3, 4, 1, 2))
    # proj_m = S_m + sum_{j<m} a_j Z_jm
    d_z = torch.einsum("kbtjr,gbtpkc->kjrgpc", a, d_proj).reshape(k, modules, r, modules, 3 * r)
    d_z = d_z * later.t()[None, :, None, :, None]
    return tuple(x.contiguous() for x in (d_u, d_c, d_bias, d_w1, d_gram, d_z))  # the layouts the fake promises
