"""The low-rank attention chain in Triton: one launch forward and one backward, whatever the
number of modules and configurations (sidetune/kernels/chain_reference.py is the maths, in
torch, and the layouts).

One program per (image, configuration) walks the modules in order (forward) or in reverse
(backward). A module's r-wide quantities live in small token tiles: its statistics and
projections are gathered from the earlier modules' outputs, its attention runs
flash-attention style over key tiles (the T x T scores are never stored), and what later
modules read (a, and in the backward the gradients of each module's projections and
statistics) is written to global memory, which stays in the L1/L2 caches at these sizes, with a
barrier between phases. The backward recomputes attention probabilities from the saved
log-sum-exp instead of storing them.

The rank is padded to R = max(16, next power of two) columns (tl.dot needs 16 on every side);
padded columns are masked on every load and store. With TRITON_INTERPRET=1 the same kernels
run on CPU tensors through Triton's interpreter, which is how the CPU tests check them."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sidetune.kernels.launch import launch

BLOCK_T = 32  # query tokens per tile
BLOCK_N = 32  # key tokens per tile
NUM_WARPS = 4


def padded_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


@triton.jit
def _tile(base, rows, row_stride, cols, mask):
    """A (rows, cols) tile at base + row * row_stride + col, in float32, zero outside mask."""
    return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _block(base, row_stride, cols, cmask):
    """An (R, R) block of a small matrix: rows and columns `cols`, rows row_stride apart."""
    return tl.load(base + cols[:, None] * row_stride + cols[None, :], mask=cmask[:, None] & cmask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def chain_forward_kernel(s_ptr, u_ptr, x_mean_ptr, x_msq_ptr, c_ptr, bias_ptr, w1_ptr, gram_ptr, z_ptr,
                         a_ptr, qkv_ptr, mean_ptr, var_ptr, lse_ptr, cc_ptr,
                         T, M, P, K, B, r, e, width, eps, scale,
                         R: tl.constexpr, HEADS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    k = tl.program_id(1)
    cols = tl.arange(0, R)
    cmask = cols < r
    three_r = 3 * r
    kb = (k * B + b).to(tl.int64)
    a_base = a_ptr + kb * T * M * r  # a[k, b]: (T, M, r)
    qkv_base = qkv_ptr + kb * M * 3 * T * r  # qkv[k, b]: (M, 3, T, r)
    stat_base = kb * M * T  # mean, var [k, b]: (M, T)
    lse_base = lse_ptr + kb * M * HEADS * T  # lse[k, b]: (M, H, T)
    cc_base = cc_ptr + kb * T  # |sum_{j<m} a_j W_o,j|^2 per token, before module m
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        tl.store(cc_base + rows, tl.zeros([BLOCK_T], tl.float32), mask=rows < T)
    tl.debug_barrier()
    for m in range(M):
        g = m // P
        p = m % P
        small = (k * M + m) * three_r
        c_q = tl.load(c_ptr + small + cols, mask=cmask, other=0.0).to(tl.float32)
        c_k = tl.load(c_ptr + small + r + cols, mask=cmask, other=0.0).to(tl.float32)
        c_v = tl.load(c_ptr + small + 2 * r + cols, mask=cmask, other=0.0).to(tl.float32)
        b_q = tl.load(bias_ptr + small + cols, mask=cmask, other=0.0).to(tl.float32)
        b_k = tl.load(bias_ptr + small + r + cols, mask=cmask, other=0.0).to(tl.float32)
        b_v = tl.load(bias_ptr + small + 2 * r + cols, mask=cmask, other=0.0).to(tl.float32)
        # 1. statistics and q, k, v of every token
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            rmask = rows < T
            tile_mask = rmask[:, None] & cmask[None, :]
            gbt = (g * B + b).to(tl.int64) * T + rows  # index into (G, B, T)
            mean = tl.load(x_mean_ptr + gbt, mask=rmask, other=0.0)
            msq = tl.load(x_msq_ptr + gbt, mask=rmask, other=0.0)
            s_row = s_ptr + ((gbt * P + p) * K + k) * three_r  # s[g, b, t, p, k, :]
            proj_q = tl.load(s_row[:, None] + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            proj_k = tl.load(s_row[:, None] + r + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            proj_v = tl.load(s_row[:, None] + 2 * r + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            cross = tl.zeros([BLOCK_T], tl.float32)
            for j in range(m):
                a_j = _tile(a_base + j * r, rows, M * r, cols, tile_mask)
                w1_j = tl.load(w1_ptr + (k * M + j) * r + cols, mask=cmask, other=0.0).to(tl.float32)
                mean += tl.sum(a_j * w1_j[None, :], 1) / width
                u_row = u_ptr + ((gbt * K + k) * M + j) * r  # u[g, b, t, k, j, :]
                u_j = tl.load(u_row[:, None] + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
                cross += tl.sum(u_j * a_j, 1)
                z_base = z_ptr + (((k * M + j) * r) * M + m).to(tl.int64) * three_r  # z[k, j, :, m, :]
                proj_q += tl.dot(a_j, _block(z_base, M * three_r, cols, cmask))
                proj_k += tl.dot(a_j, _block(z_base + r, M * three_r, cols, cmask))
                proj_v += tl.dot(a_j, _block(z_base + 2 * r, M * three_r, cols, cmask))
            cc = tl.load(cc_base + rows, mask=rmask, other=0.0)
            msq = msq + (2.0 * cross + cc) / width
            var = msq - mean * mean
            rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
            q = rstd[:, None] * (proj_q - mean[:, None] * c_q[None, :]) + b_q[None, :]
            key = rstd[:, None] * (proj_k - mean[:, None] * c_k[None, :]) + b_k[None, :]
            v = rstd[:, None] * (proj_v - mean[:, None] * c_v[None, :]) + b_v[None, :]
            qkv_m = qkv_base + m * 3 * T * r
            tl.store(qkv_m + rows[:, None] * r + cols[None, :], q, mask=tile_mask)
            tl.store(qkv_m + T * r + rows[:, None] * r + cols[None, :], key, mask=tile_mask)
            tl.store(qkv_m + 2 * T * r + rows[:, None] * r + cols[None, :], v, mask=tile_mask)
            tl.store(mean_ptr + stat_base + m * T + rows, mean, mask=rmask)
            tl.store(var_ptr + stat_base + m * T + rows, var, mask=rmask)
        tl.debug_barrier()
        # 2. attention, flash style: online softmax over key tiles, head by head
        qkv_m = qkv_base + m * 3 * T * r
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            rmask = rows < T
            q = _tile(qkv_m, rows, r, cols, rmask[:, None] & cmask[None, :])
            out = tl.zeros([BLOCK_T, R], tl.float32)
            for h in tl.static_range(HEADS):
                in_head = (cols >= h * e) & (cols < h * e + e)
                q_h = tl.where(in_head[None, :], q, 0.0) * scale
                row_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
                row_sum = tl.zeros([BLOCK_T], tl.float32)
                acc = tl.zeros([BLOCK_T, R], tl.float32)
                for n0 in range(0, T, BLOCK_N):
                    keys = n0 + tl.arange(0, BLOCK_N)
                    kmask = keys < T
                    key_tile = _tile(qkv_m + T * r, keys, r, cols, kmask[:, None] & cmask[None, :])
                    value_tile = _tile(qkv_m + 2 * T * r, keys, r, cols, kmask[:, None] & cmask[None, :])
                    scores = tl.dot(q_h, tl.trans(key_tile))
                    scores = tl.where(kmask[None, :], scores, float("-inf"))
                    new_max = tl.maximum(row_max, tl.max(scores, 1))
                    alpha = tl.exp(row_max - new_max)
                    weights = tl.exp(scores - new_max[:, None])
                    row_sum = row_sum * alpha + tl.sum(weights, 1)
                    acc = acc * alpha[:, None] + tl.dot(weights, value_tile)
                    row_max = new_max
                out += tl.where(in_head[None, :], acc / row_sum[:, None], 0.0)
                tl.store(lse_base + (m * HEADS + h) * T + rows, row_max + tl.log(row_sum), mask=rmask)
            tl.store(a_base + m * r + rows[:, None] * (M * r) + cols[None, :], out, mask=rmask[:, None] & cmask[None, :])
        tl.debug_barrier()
        # 3. |C|^2 for the next module: + a_m G_mm a_m + 2 sum_{j<m} a_j G_jm a_m
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            rmask = rows < T
            tile_mask = rmask[:, None] & cmask[None, :]
            a_m = _tile(a_base + m * r, rows, M * r, cols, tile_mask)
            gram_m = gram_ptr + (((k * M) * r) * M + m).to(tl.int64) * r  # gram[k, 0, :, m, :]
            added = tl.sum(tl.dot(a_m, _block(gram_m + m * r * M * r, M * r, cols, cmask), input_precision="ieee") * a_m, 1)
            for j in range(m):
                a_j = _tile(a_base + j * r, rows, M * r, cols, tile_mask)
                g_jm = _block(gram_m + j * r * M * r, M * r, cols, cmask)
                added += 2.0 * tl.sum(tl.dot(a_j, g_jm, input_precision="ieee") * a_m, 1)
            cc = tl.load(cc_base + rows, mask=rmask, other=0.0)
            tl.store(cc_base + rows, cc + added, mask=rmask)
        tl.debug_barrier()


@triton.jit
def chain_backward_kernel(grad_a_ptr, a_ptr, qkv_ptr, mean_ptr, var_ptr, lse_ptr, u_ptr, c_ptr, bias_ptr, w1_ptr,
                          gram_ptr, z_ptr, d_proj_ptr, d_mean_ptr, d_msq_ptr, da_ptr, d_qkv_ptr, later_ptr,
                          T, M, P, K, B, r, e, width, eps, scale,
                          R: tl.constexpr, HEADS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    k = tl.program_id(1)
    cols = tl.arange(0, R)
    cmask = cols < r
    three_r = 3 * r
    kb = (k * B + b).to(tl.int64)
    a_base = a_ptr + kb * T * M * r
    grad_base = grad_a_ptr + kb * T * M * r
    qkv_base = qkv_ptr + kb * M * 3 * T * r
    stat_base = kb * M * T
    lse_base = lse_ptr + kb * M * HEADS * T
    da_base = da_ptr + kb * T * R  # this module's gradient of a, (T, R)
    d_qkv_base = d_qkv_ptr + kb * 3 * T * R  # this module's gradients of q, k, v, (3, T, R)
    later_base = later_ptr + kb * M * T  # [i, t]: sum_{m > i} d_msq_m / D
    for i in range(M):
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            tl.store(later_base + i * T + rows, tl.zeros([BLOCK_T], tl.float32), mask=rows < T)
    tl.debug_barrier()
    for step in range(M):
        m = M - 1 - step
        g = m // P
        p = m % P
        # 1. the full gradient of a_m, gathered from every later module
        w1_m = tl.load(w1_ptr + (k * M + m) * r + cols, mask=cmask, other=0.0).to(tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            rmask = rows < T
            tile_mask = rmask[:, None] & cmask[None, :]
            da = _tile(grad_base + m * r, rows, M * r, cols, tile_mask)
            mean_after = tl.zeros([BLOCK_T], tl.float32)
            for later_module in range(m + 1, M):
                g2 = later_module // P
                p2 = later_module % P
                gbt = (g2 * B + b).to(tl.int64) * T + rows
                proj_row = d_proj_ptr + ((gbt * P + p2) * K + k) * three_r
                z_base = z_ptr + (((k * M + m) * r) * M + later_module).to(tl.int64) * three_r  # z[k, m, :, m2, :]
                for part in tl.static_range(3):
                    d_part = tl.load(proj_row[:, None] + part * r + cols[None, :], mask=tile_mask, other=0.0)
                    da += tl.dot(d_part, tl.trans(_block(z_base + part * r, M * three_r, cols, cmask)))
                mean_after += tl.load(d_mean_ptr + stat_base + later_module * T + rows, mask=rmask, other=0.0)
                msq_later = tl.load(d_msq_ptr + stat_base + later_module * T + rows, mask=rmask, other=0.0)
                u_row = u_ptr + ((gbt * K + k) * M + m) * r  # u[g2, b, t, k, m, :]
                u_m = tl.load(u_row[:, None] + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
                da += (2.0 / width) * msq_later[:, None] * u_m
            da += (mean_after / width)[:, None] * w1_m[None, :]
            # the |C|^2 term: 2 sum_l a_l G_lm later[max(l, m)]
            later_m = tl.load(later_base + m * T + rows, mask=rmask, other=0.0)
            gram_m = gram_ptr + (((k * M) * r) * M + m).to(tl.int64) * r  # gram[k, 0, :, m, :]
            for l in range(M):
                weight = later_m
                if l > m:
                    weight = tl.load(later_base + l * T + rows, mask=rmask, other=0.0)
                a_l = _tile(a_base + l * r, rows, M * r, cols, tile_mask) * weight[:, None]
                da += 2.0 * tl.dot(a_l, _block(gram_m + l * r * M * r, M * r, cols, cmask), input_precision="ieee")
            tl.store(da_base + rows[:, None] * R + cols[None, :], da, mask=rmask[:, None])
        tl.debug_barrier()
        # 2. attention backward, head by head: dk and dv by key tile, then dq by query tile
        qkv_m = qkv_base + m * 3 * T * r
        for h in tl.static_range(HEADS):
            in_head = (cols >= h * e) & (cols < h * e + e)
            for n0 in range(0, T, BLOCK_N):
                keys = n0 + tl.arange(0, BLOCK_N)
                kmask = keys < T
                key_tile = _tile(qkv_m + T * r, keys, r, cols, kmask[:, None] & cmask[None, :])
                value_tile = _tile(qkv_m + 2 * T * r, keys, r, cols, kmask[:, None] & cmask[None, :])
                d_key = tl.zeros([BLOCK_N, R], tl.float32)
                d_value = tl.zeros([BLOCK_N, R], tl.float32)
                for t0 in range(0, T, BLOCK_T):
                    rows = t0 + tl.arange(0, BLOCK_T)
                    rmask = rows < T
                    tile_mask = rmask[:, None] & cmask[None, :]
                    q_h = tl.where(in_head[None, :], _tile(qkv_m, rows, r, cols, tile_mask), 0.0) * scale
                    d_out = tl.where(in_head[None, :], _tile(da_base, rows, R, cols, tile_mask), 0.0)
                    delta = tl.sum(d_out * _tile(a_base + m * r, rows, M * r, cols, tile_mask), 1)
                    lse = tl.load(lse_base + (m * HEADS + h) * T + rows, mask=rmask, other=0.0)
                    probabilities = tl.exp(tl.dot(q_h, tl.trans(key_tile)) - lse[:, None])
                    probabilities = tl.where(rmask[:, None] & kmask[None, :], probabilities, 0.0)
                    d_value += tl.dot(tl.trans(probabilities), d_out)
                    d_scores = probabilities * (tl.dot(d_out, tl.trans(value_tile)) - delta[:, None])
                    d_key += tl.dot(tl.trans(d_scores), q_h)
                head_mask = kmask[:, None] & in_head[None, :]
                tl.store(d_qkv_base + T * R + keys[:, None] * R + cols[None, :], d_key, mask=head_mask)
                tl.store(d_qkv_base + 2 * T * R + keys[:, None] * R + cols[None, :], d_value, mask=head_mask)
            for t0 in range(0, T, BLOCK_T):
                rows = t0 + tl.arange(0, BLOCK_T)
                rmask = rows < T
                tile_mask = rmask[:, None] & cmask[None, :]
                q_h = tl.where(in_head[None, :], _tile(qkv_m, rows, r, cols, tile_mask), 0.0) * scale
                d_out = tl.where(in_head[None, :], _tile(da_base, rows, R, cols, tile_mask), 0.0)
                delta = tl.sum(d_out * _tile(a_base + m * r, rows, M * r, cols, tile_mask), 1)
                lse = tl.load(lse_base + (m * HEADS + h) * T + rows, mask=rmask, other=0.0)
                d_query = tl.zeros([BLOCK_T, R], tl.float32)
                for n0 in range(0, T, BLOCK_N):
                    keys = n0 + tl.arange(0, BLOCK_N)
                    kmask = keys < T
                    key_tile = _tile(qkv_m + T * r, keys, r, cols, kmask[:, None] & cmask[None, :])
                    value_tile = _tile(qkv_m + 2 * T * r, keys, r, cols, kmask[:, None] & cmask[None, :])
                    probabilities = tl.exp(tl.dot(q_h, tl.trans(key_tile)) - lse[:, None])
                    probabilities = tl.where(rmask[:, None] & kmask[None, :], probabilities, 0.0)
                    d_scores = probabilities * (tl.dot(d_out, tl.trans(value_tile)) - delta[:, None])
                    d_query += tl.dot(d_scores, tl.where(in_head[None, :], key_tile, 0.0))
                tl.store(d_qkv_base + rows[:, None] * R + cols[None, :], d_query * scale,
                         mask=rmask[:, None] & in_head[None, :])
        tl.debug_barrier()
        # 3. through the normalisation: the gradients of the projections and statistics
        small = (k * M + m) * three_r
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            rmask = rows < T
            tile_mask = rmask[:, None] & cmask[None, :]
            var = tl.load(var_ptr + stat_base + m * T + rows, mask=rmask, other=0.0)
            mean = tl.load(mean_ptr + stat_base + m * T + rows, mask=rmask, other=0.0)
            rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
            d_rstd = tl.zeros([BLOCK_T], tl.float32)
            d_mean = tl.zeros([BLOCK_T], tl.float32)
            gbt = (g * B + b).to(tl.int64) * T + rows
            proj_row = d_proj_ptr + ((gbt * P + p) * K + k) * three_r
            for part in tl.static_range(3):
                d_part = _tile(d_qkv_base + part * T * R, rows, R, cols, tile_mask)
                value = _tile(qkv_m + part * T * r, rows, r, cols, tile_mask)
                bias = tl.load(bias_ptr + small + part * r + cols, mask=cmask, other=0.0).to(tl.float32)
                c = tl.load(c_ptr + small + part * r + cols, mask=cmask, other=0.0).to(tl.float32)
                d_rstd += tl.sum(d_part * (value - bias[None, :]), 1)
                d_mean -= tl.sum(d_part * c[None, :], 1)
                tl.store(proj_row[:, None] + part * r + cols[None, :], rstd[:, None] * d_part, mask=tile_mask)
            d_var = tl.where(var >= 0.0, -0.5 * rstd * rstd * rstd * (d_rstd / rstd), 0.0)
            tl.store(d_mean_ptr + stat_base + m * T + rows, rstd * d_mean - 2.0 * mean * d_var, mask=rmask)
            tl.store(d_msq_ptr + stat_base + m * T + rows, d_var, mask=rmask)
            for i in range(m):
                held = tl.load(later_base + i * T + rows, mask=rmask, other=0.0)
                tl.store(later_base + i * T + rows, held + d_var / width, mask=rmask)
        tl.debug_barrier()


def _arguments(t: int, modules: int, depth: int, k: int, b: int, r: int, heads: int, width: int, eps: float) -> tuple:
    e = r // heads
    return t, modules, depth, k, b, r, e, float(width), float(eps), 1.0 / math.sqrt(e)


def chain_forward(s: torch.Tensor, u: torch.Tensor, x_mean: torch.Tensor, x_msq: torch.Tensor, c: torch.Tensor,
                  bias: torch.Tensor, w1: torch.Tensor, gram: torch.Tensor, z: torch.Tensor, heads: int, width: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As chain_reference.chain_forward, in one launch."""
    groups, b, t, depth, k, three_r = s.shape
    r, modules = three_r // 3, groups * depth
    new = lambda *shape: torch.empty(shape, device=s.device, dtype=torch.float32)  # noqa: E731
    a, qkv, mean, var = new(k, b, t, modules, r), new(k, b, modules, 3, t, r), new(k, b, modules, t), new(k, b, modules, t)
    lse, cc = new(k, b, modules, heads, t), new(k, b, t)
    inputs = [x.contiguous() for x in (s, u, x_mean.float(), x_msq.float(), c, bias, w1, gram, z)]
    launch(chain_forward_kernel, (b, k), *inputs, a, qkv, mean, var, lse, cc,
           *_arguments(t, modules, depth, k, b, r, heads, width, eps),
           R=padded_rank(r), HEADS=heads, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return a, qkv, mean, var, lse


def chain_backward(grad_a: torch.Tensor, a: torch.Tensor, qkv: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   lse: torch.Tensor, u: torch.Tensor, c: torch.Tensor, bias: torch.Tensor, w1: torch.Tensor,
                   gram: torch.Tensor, z: torch.Tensor, depth: int, width: int, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As chain_reference.chain_backward, in one launch."""
    k, b, t, modules, r = a.shape
    heads, big_r = lse.shape[3], padded_rank(r)
    new = lambda *shape: torch.empty(shape, device=a.device, dtype=torch.float32)  # noqa: E731
    d_proj, d_mean, d_msq = new(modules // depth, b, t, depth, k, 3 * r), new(k, b, modules, t), new(k, b, modules, t)
    da, d_qkv, later = new(k, b, t, big_r), new(k, b, 3, t, big_r), new(k, b, modules, t)
    inputs = [x.contiguous() for x in (grad_a.float(), a, qkv, mean, var, lse, u, c, bias, w1, gram, z)]
    launch(chain_backward_kernel, (b, k), *inputs, d_proj, d_mean, d_msq, da, d_qkv, later,
           *_arguments(t, modules, depth, k, b, r, heads, width, eps),
           R=big_r, HEADS=heads, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return d_proj, d_mean, d_msq
