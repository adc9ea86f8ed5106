"""One training step of a stack: the per-config loss, the non-finite bookkeeping, backward and
the optimizer, on device tensors only, optionally captured in a CUDA graph."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from sidetune.errors import SidetuneError
from sidetune.sidenets import SideNet
from sidetune.training.optim import StackedAdamW


def training_autocast(device: torch.device) -> AbstractContextManager:
    """Side networks train under bf16 autocast on CUDA and in full precision on the CPU. The
    cast-weight cache is off: it must be for CUDA-graph capture, and stacked weights are cast
    once per step anyway."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


@dataclass
class EpochTotals:
    """What the device accumulated over an epoch, on the host: per config."""

    loss_sum: torch.Tensor  # sum over images of the training loss (active configs)
    correct: torch.Tensor  # training batches classified right
    active: torch.Tensor  # bool: still finite
    failed_step: torch.Tensor  # the step (from 1) at which a failed config's loss became non-finite
    failed_loss: torch.Tensor  # that loss


class StackedStep:
    """One training step of a stack: forward, per-config losses, the non-finite check,
    backward and the optimizer, with only device tensors (no host synchronisation).

    A config whose loss becomes non-finite is frozen from that step on (its loss is masked out
    of the backward pass and the optimizer leaves it unchanged); the step and loss are recorded
    on the device. With `cuda_graphs`, each batch size (the full one and the epoch's last,
    partial one) is captured once in a CUDA graph after two warm-up steps whose effects are
    undone, then replayed: batches are written into the static `inputs` buffers."""

    def __init__(self, net: SideNet, optimizer: StackedAdamW, smoothing: torch.Tensor, batch_size: int,
                 sample_shape: tuple[int, ...], dtype: torch.dtype, *, compile: bool = False, cuda_graphs: bool = False):
        device = optimizer.params.device
        k = net.num_configs
        self.net, self.optimizer = net, optimizer
        self.forward = torch.compile(net, dynamic=False) if compile else net
        self.device = device
        self.smoothing = smoothing.to(device)
        self.active = torch.ones(k, dtype=torch.bool, device=device)
        self.failed_step = torch.zeros(k, device=device)
        self.failed_loss = torch.zeros(k, device=device)
        self.loss_sum = torch.zeros(k, device=device)
        self.correct = torch.zeros(k, device=device)
        self.step_number = torch.ones((), device=device)  # for the optimizer's bias correction
        self.lr_scale = torch.ones((), device=device)
        self.autocast = training_autocast(device)
        self.cuda_graphs = cuda_graphs
        if cuda_graphs and device.type != "cuda":
            raise SidetuneError("CUDA graphs need a CUDA device; train on --device cuda or turn graphs off.")
        # Batches are gathered into these buffers: no fresh batch-sized allocation per step (on
        # the CPU a ViT-B batch of 32 is 126 MB of new pages each time), and static for graphs.
        self.inputs = (torch.zeros(batch_size, *sample_shape, dtype=dtype, device=device),
                       torch.zeros(batch_size, dtype=torch.long, device=device))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def start_epoch(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def epoch_totals(self) -> EpochTotals:
        values = [t.cpu() for t in (self.loss_sum, self.correct, self.active, self.failed_step, self.failed_loss)]
        return EpochTotals(*values)

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor, number: int, lr_scale: float) -> None:
        """Train on one batch as update `number` (from 1) with the learning rates times `lr_scale`."""
        self.step_number.fill_(number)
        self.lr_scale.fill_(lr_scale)
        if not self.cuda_graphs:
            self._compute(tokens, labels)
            return
        n = len(labels)
        static_tokens, static_labels = self.inputs[0][:n], self.inputs[1][:n]
        if tokens.data_ptr() != static_tokens.data_ptr():
            static_tokens.copy_(tokens)
        if labels.data_ptr() != static_labels.data_ptr():
            static_labels.copy_(labels)
        if n not in self.graphs:
            self.graphs[n] = self._capture(static_tokens, static_labels)
        self.graphs[n].replay()

    def _compute(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        with self.autocast:
            logits = self.forward(tokens)
        losses = cross_entropy_per_config(logits.float(), labels, self.smoothing)
        penalty = self.net.penalty()
        if penalty is not None:
            losses = losses + penalty
        # Written for few kernels (a GPU step is launch-bound): x - x is 0 exactly when x is finite,
        # and active > finite is active and not finite.
        finite = (losses.detach() - losses.detach()) == 0
        newly_failed = self.active > finite
        torch.where(newly_failed, self.step_number, self.failed_step, out=self.failed_step)
        torch.where(newly_failed, losses.detach(), self.failed_loss, out=self.failed_loss)
        self.active &= finite
        kept = torch.where(self.active, losses, 0.0)
        kept.sum().backward()
        self.optimizer.step(self.lr_scale, self.step_number, self.active)
        self.loss_sum.add_(kept.detach(), alpha=len(labels))
        self.correct.add_((logits.detach().argmax(-1) == labels).sum(dim=1))

    def _capture(self, tokens: torch.Tensor, labels: torch.Tensor) -> "torch.cuda.CUDAGraph":
        mutable = [*self.optimizer.buffers(), self.active, self.failed_step, self.failed_loss, self.loss_sum, self.correct]
        saved = [t.clone() for t in mutable]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: lazy initialisation must not happen during capture
            for _ in range(2):
                self._compute(tokens, labels)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for tensor, value in zip(mutable, saved):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._compute(tokens, labels)
        self.pool = graph.pool()
        return graph


def cross_entropy_per_config(logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """(K, B, C) logits -> (K,) mean cross-entropy per config, with per-config label smoothing."""
    log_probs = torch.log_softmax(logits, dim=-1)
    labelled = log_probs.gather(-1, labels.expand(logits.shape[0], -1).unsqueeze(-1)).mean(dim=(1, 2))
    # (1 - s) nll + s uniform, each averaged over the batch: a few kernels whatever K (launch-bound on a GPU)
    return -torch.lerp(labelled, log_probs.mean(dim=(1, 2)), smoothing)
