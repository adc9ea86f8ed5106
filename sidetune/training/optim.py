"""AdamW for a stack of configurations, in a handful of kernels whatever the parameter count.

Every parameter of a stacked side network becomes a view into one (K, P) buffer and the
gradients are gathered into one (K, P) tensor by a single concatenation, so one step is a few
whole-buffer operations instead of ~8 small kernels per parameter: what keeps a stage-two step
from being launch-bound on a GPU.
Learning rate and weight decay are per configuration; norms and biases are not decayed; a
configuration that is not active (it failed) is left untouched."""

from __future__ import annotations

import torch

from sidetune.kernels.adamw import stacked_adamw_
from sidetune.sidenets import SideNet


class StackedAdamW:
    """AdamW (decoupled weight decay, bias-corrected moments) over all of `net`'s parameters.

    After construction the parameters alias one flat buffer: do not move the network to another
    device afterwards."""

    def __init__(self, net: SideNet, lr: torch.Tensor, weight_decay: torch.Tensor, fused: bool = False):
        self.fused = fused
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
        """(K, P): every parameter's gradient (zero where it has none), in one concatenation."""
        k = len(self.params)
        return torch.cat([torch.zeros(k, p[0].numel(), device=p.device) if p.grad is None else p.grad.reshape(k, -1)
                          for p in self.parameters], dim=1)

    @torch.no_grad()
    def step(self, lr_scale: torch.Tensor, step: torch.Tensor, active: torch.Tensor) -> None:
        """One update with every configuration's lr times `lr_scale` (a scalar tensor), bias
        correction for update number `step` (a scalar tensor, from 1), inactive configs unchanged.
        Takes only device tensors: no host synchronisation, capturable in a CUDA graph. With
        `fused`, the update is one Triton kernel (sidetune/kernels/adamw.py)."""
        stacked_adamw_(self.params, self.exp_avg, self.exp_avg_sq, self.gathered_gradients(), self.lr,
                       self.weight_decay, self.decay, active, lr_scale, step, self.fused)

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
