"""The stacked AdamW update (sidetune/kernels/adamw.py) as one Triton kernel: each program
updates a block of one configuration's entries of the flat buffers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sidetune.kernels.launch import launch

BLOCK = 1024


@triton.jit
def adamw_kernel(params_ptr, exp_avg_ptr, exp_avg_sq_ptr, grads_ptr, lr_ptr, weight_decay_ptr, decay_ptr, active_ptr,
                 lr_scale_ptr, step_ptr, size, beta1, beta2, eps, BLOCK: tl.constexpr):
    k = tl.program_id(1)
    entries = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = entries < size
    at = k.to(tl.int64) * size + entries
    grad = tl.load(grads_ptr + at, mask=inside, other=0.0)
    grad = tl.where((grad == grad) & (tl.abs(grad) < float("inf")), grad, 0.0)  # non-finite: 0
    exp_avg = beta1 * tl.load(exp_avg_ptr + at, mask=inside, other=0.0) + (1 - beta1) * grad
    exp_avg_sq = beta2 * tl.load(exp_avg_sq_ptr + at, mask=inside, other=0.0) + (1 - beta2) * grad * grad
    step = tl.load(step_ptr)
    active = tl.load(active_ptr + k) != 0
    lr = tl.where(active, tl.load(lr_ptr + k) * tl.load(lr_scale_ptr), 0.0)
    decay = tl.load(decay_ptr + entries, mask=inside, other=0.0)
    params = tl.load(params_ptr + at, mask=inside, other=0.0) * (1 - lr * tl.load(weight_decay_ptr + k) * decay)
    bias_correction1 = 1 - tl.exp(step * tl.log(beta1))
    bias_correction2 = 1 - tl.exp(step * tl.log(beta2))
    denominator = tl.sqrt(exp_avg_sq / bias_correction2) + eps
    params -= exp_avg * (lr / bias_correction1) / denominator
    tl.store(params_ptr + at, params, mask=inside)
    tl.store(exp_avg_ptr + at, exp_avg, mask=inside)
    tl.store(exp_avg_sq_ptr + at, exp_avg_sq, mask=inside)


def adamw_step(params: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grads: torch.Tensor,
               lr: torch.Tensor, weight_decay: torch.Tensor, decay: torch.Tensor, active: torch.Tensor,
               lr_scale: torch.Tensor, step: torch.Tensor, betas: tuple[float, float], eps: float) -> None:
    k, size = params.shape
    launch(adamw_kernel, (triton.cdiv(size, BLOCK), k), params, exp_avg, exp_avg_sq, grads.contiguous(), lr.contiguous(),
           weight_decay.contiguous(), decay.contiguous(), active, lr_scale, step.float(), size, betas[0], betas[1], eps,
           BLOCK=BLOCK)
