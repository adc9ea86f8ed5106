"""AdamW for a stack of configurations, in a handful of kernels whatever the parameter count.

Every parameter of a stacked side network becomes a view into one (K, P) buffer and the
gradients are gathered into one (K, P) tensor by a single concatenation, so one step is a few
whole-buffer operations instead of ~8 small kernels per parameter: what keeps a stage-two step
from being launch-bound on a GPU.
Learning rate and weight decay are per configuration; norms and biases are not decayed; a
configuration that is not active (it failed) is left untouched."""

from __future__ import annotations

import torch

from sidetune.sidenets import SideNet

BETAS = (0.9, 0.999)
EPS = 1e-8


class StackedAdamW:
    """AdamW (decoupled weight decay, bias-corrected moments) over all of `net`'s parameters.

    After construction the parameters alias one flat buffer: do not move the network to another
    device afterwards."""

    def __init__(self, net: SideNet, lr: torch.Tensor, weight_decay: torch.Tensor):
        named = list(net.named_parameters())
        k = net.num_configs
        device = named[0][1].device
        sizes = [parameter[0].numel() for _, parameter in named]
        self.params = torch.empty(k, sum(sizes), device=device)
        self.parameters = [parameter for _, parameter in named]
        self.exp_avg = torch.zeros_like(self.params)
        self.exp_avg_sq = torch.zeros_like(self.params)
        decay = torch.empty(sum(sizes))
        self.slices: dict[str, tuple[int, int]] = {}
        self.shapes: dict[str, torch.Size] = {}
        offset = 0
        for (name, parameter), size in zip(named, sizes):
            self.slices[name], self.shapes[name] = (offset, offset + size), parameter.shape
            decay[offset:offset + size] = float(net.decay_mask(name))
            self.params[:, offset:offset + size].copy_(parameter.detach().reshape(k, size))
            parameter.data = self.params[:, offset:offset + size].view(parameter.shape)
            offset += size
        self.decay = decay.to(device)[None, :]
        self.lr = lr[:, None].to(device)
        self.weight_decay = weight_decay[:, None].to(device)

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def gathered_gradients(self) -> torch.Tensor:
        """(K, P): every parameter's gradient (zero where it has none), non-finite values zeroed."""
        k = len(self.params)
        grads = torch.cat([torch.zeros(k, p[0].numel(), device=p.device) if p.grad is None else p.grad.reshape(k, -1)
                           for p in self.parameters], dim=1)
        return torch.nan_to_num_(grads, nan=0.0, posinf=0.0, neginf=0.0)

    @torch.no_grad()
    def step(self, lr_scale: torch.Tensor, step: torch.Tensor, active: torch.Tensor) -> None:
        """One update with every configuration's lr times `lr_scale` (a scalar tensor), bias
        correction for update number `step` (a scalar tensor, from 1), inactive configs unchanged.
        Takes only device tensors: no host synchronisation, capturable in a CUDA graph."""
        beta1, beta2 = BETAS
        grads = self.gathered_gradients()
        self.exp_avg.mul_(beta1).add_(grads, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        lr = torch.where(active[:, None], self.lr * lr_scale, 0.0)
        self.params.mul_(1 - lr * self.weight_decay * self.decay)
        denominator = (self.exp_avg_sq / (1 - torch.pow(beta2, step))).sqrt_().add_(EPS)
        self.params.addcdiv_(self.exp_avg * (lr / (1 - torch.pow(beta1, step))), denominator, value=-1.0)

    def moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Both moments of each parameter by name (copies, for a checkpoint)."""
        return {name: (self.exp_avg[:, a:b].reshape(self.shapes[name]).clone(),
                       self.exp_avg_sq[:, a:b].reshape(self.shapes[name]).clone()) for name, (a, b) in self.slices.items()}

    def load_moments(self, moments: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (a, b) in self.slices.items():
            exp_avg, exp_avg_sq = moments[name]
            self.exp_avg[:, a:b].copy_(exp_avg.reshape(len(self.params), -1))
            self.exp_avg_sq[:, a:b].copy_(exp_avg_sq.reshape(len(self.params), -1))

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a step changes (for a snapshot around CUDA-graph warm-up)."""
        return [self.params, self.exp_avg, self.exp_avg_sq]
