"""AdamW over a stack's flat (K, P) buffers as one torch custom op (`sidetune::stacked_adamw_`):
the torch implementation (a dozen whole-buffer operations) everywhere, or with `fused` one
Triton kernel (sidetune/kernels/adamw_triton.py) that also zeroes non-finite gradients.

Per configuration k and parameter entry j, with g the gradient (non-finite values zeroed):

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2;   lr_k = active_k ? lr_k * lr_scale : 0
    p = p (1 - lr_k wd_k decay_j) - lr_k / (1 - b1^step) * m / (sqrt(v / (1 - b2^step)) + eps)

`lr_scale` and `step` are one-element device tensors, so a step never waits for the host and
can be captured in a CUDA graph."""

from __future__ import annotations

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8


@torch.library.custom_op("sidetune::stacked_adamw_", mutates_args=("params", "exp_avg", "exp_avg_sq", "grads"))
def stacked_adamw_(params: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grads: torch.Tensor,
                   lr: torch.Tensor, weight_decay: torch.Tensor, decay: torch.Tensor, active: torch.Tensor,
                   lr_scale: torch.Tensor, step: torch.Tensor, fused: bool) -> None:
    """One update in place. params, moments and grads (K, P); lr, weight_decay (K, 1); decay
    (1, P) (1 where weight decay applies); active (K,) bool; lr_scale, step scalars. `grads`
    is used as scratch."""
    if fused:
        from sidetune.kernels import adamw_triton  # imports triton: only where the fused kernels run

        adamw_triton.adamw_step(params, exp_avg, exp_avg_sq, grads, lr, weight_decay, decay, active, lr_scale, step,
                                BETAS, EPS)
        return
    beta1, beta2 = BETAS
    grads = torch.nan_to_num_(grads, nan=0.0, posinf=0.0, neginf=0.0)
    exp_avg.mul_(beta1).add_(grads, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
    step_lr = torch.where(active[:, None], lr * lr_scale, 0.0)
    params.mul_(1 - step_lr * weight_decay * decay)
    denominator = (exp_avg_sq / (1 - torch.pow(beta2, step))).sqrt_().add_(EPS)
    params.addcdiv_(exp_avg * (step_lr / (1 - torch.pow(beta1, step))), denominator, value=-1.0)
