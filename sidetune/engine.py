"""Stage two: train K stacked side-network configurations from the cache in one loop.

A split's features are loaded into device memory once; batches are gathered on the device.
All K configurations share every batch. Per-config learning rate and weight decay are
tensors; losses are summed over configs (never averaged across them), there is no gradient
clipping, and a configuration that goes non-finite is frozen and reported while the others
continue. `train` of one configuration is this loop with K = 1."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from sidetune.cache.reader import Cache
from sidetune.errors import SidetuneError
from sidetune.sidenets import SIDENETS, FeatureLayout, SideNet, create_sidenet

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class TrainConfig:
    """One side-network configuration. Configs that agree on everything but lr, weight decay,
    label smoothing and seed are stacked into one group and share every batch."""

    method: str = "last"
    options: tuple[tuple[str, object], ...] = ()  # method options, e.g. (("rank", 16),)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 64
    data_seed: int = 0  # batch order; shared by a stacked group

    def group_key(self) -> tuple:
        return (self.method, self.options, self.epochs, self.warmup_epochs, self.batch_size, self.data_seed)

    def describe(self) -> dict:
        record = asdict(self)
        record["options"] = dict(self.options)
        return record


@dataclass
class TrainResult:
    config: TrainConfig
    status: str  # "ok" or "failed"
    top1: float | None
    per_class: list[float] | None
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    params: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    failure: str | None = None


def feature_layout(cache: Cache) -> FeatureLayout:
    manifest = cache.manifest
    layout = manifest["layout"]
    return FeatureLayout(
        depth=manifest["backbone"]["depth"],
        width=layout["width"],
        num_tokens=layout["num_tokens"],
        num_prefix_tokens=layout["num_prefix_tokens"],
        num_classes=len(cache.class_names),
        stages=tuple(layout["stages"]),
        token_selection=layout["token_selection"],
    )


def build_sidenet(cache: Cache, method: str, options: dict, num_configs: int) -> SideNet:
    """A side network for this cache, refusing caches that lack what it reads."""
    layout = feature_layout(cache)
    if method not in SIDENETS:
        raise SidetuneError(f"Unknown method '{method}'. Choose one of: {', '.join(SIDENETS)}.")
    net = create_sidenet(method, layout, num_configs, **options)
    missing = [s for s in net.stages_needed() if s not in layout.stages]
    if missing or layout.token_selection not in net.token_selections:
        spec = "default" if method != "linear" else "final"
        raise SidetuneError(
            f"Method {method} reads stages {net.stages_needed()} with {'/'.join(net.token_selections)} "
            f"tokens; cache {cache.path} stores stages {list(layout.stages)} with "
            f"'{layout.token_selection}' tokens. Extract with --spec {spec} (or a spec that keeps them)."
        )
    norm = cache.final_norm()
    if norm is None:
        net.set_final_norm(None, None, 0.0)
    else:
        net.set_final_norm(torch.from_numpy(norm["weight"]), torch.from_numpy(norm["bias"]), norm["eps"])
    return net


def load_split(cache: Cache, split: str, stages: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's tokens (of the given stages) and labels, put on the device once."""
    cached = cache.split(split)
    tokens = torch.from_numpy(cached.load(stages)).to(device)
    labels = torch.from_numpy(cached.labels).to(device)
    return tokens, labels


def lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_group(cache: Cache, configs: list[TrainConfig], train_split: str, eval_split: str,
                device: str | torch.device = "cpu", on_epoch=None) -> list[TrainResult]:
    """Train configs that share a group key, stacked along the leading axis, and evaluate
    them on `eval_split`. `on_epoch(epoch, losses)` is called after every epoch."""
    keys = {c.group_key() for c in configs}
    if len(keys) != 1:
        raise ValueError("train_group needs configs with one group key; see TrainConfig.group_key")
    first = configs[0]
    device = torch.device(device)
    started = time.perf_counter()
    net = build_sidenet(cache, first.method, dict(first.options), len(configs))
    net.reset_parameters([c.seed for c in configs])
    net.to(device)
    stages = net.stages_needed()
    train_x, train_y = load_split(cache, train_split, stages, device)

    k = len(configs)
    lr = torch.tensor([c.lr for c in configs], device=device)
    weight_decay = torch.tensor([c.weight_decay for c in configs], device=device)
    smoothing = torch.tensor([c.label_smoothing for c in configs], device=device)
    active = torch.ones(k, dtype=torch.bool, device=device)
    failures: dict[int, str] = {}
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in net.named_parameters()}

    num_images = len(train_y)
    steps_per_epoch = math.ceil(num_images / first.batch_size)
    total_steps = steps_per_epoch * first.epochs
    warmup_steps = steps_per_epoch * first.warmup_epochs
    epoch_losses: list[np.ndarray] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    step = 0
    for epoch in range(first.epochs):
        order = torch.randperm(num_images, generator=torch.Generator().manual_seed(first.data_seed * 100_003 + epoch))
        loss_sum = torch.zeros(k, device=device)
        for begin in range(0, num_images, first.batch_size):
            index = order[begin:begin + first.batch_size].to(device)
            with autocast:
                logits = net(train_x[index].float())
            losses = cross_entropy_per_config(logits.float(), train_y[index], smoothing)
            finite = torch.isfinite(losses)
            if not bool(finite[active].all()):
                for j in torch.nonzero(active & ~finite).flatten().tolist():
                    failures[j] = f"loss became {losses[j].item()} at epoch {epoch + 1}, step {step + 1}"
                active &= finite
            net.zero_grad(set_to_none=True)
            torch.where(active, losses, torch.zeros_like(losses)).sum().backward()
            _adamw_step(net, moments, lr * lr_multiplier(step, total_steps, warmup_steps), weight_decay, active, step + 1)
            loss_sum += torch.where(active, losses.detach(), torch.zeros_like(losses)) * len(index)
            step += 1
        epoch_losses.append((loss_sum / num_images).cpu().numpy())
        if on_epoch is not None:
            on_epoch(epoch, epoch_losses[-1])

    predictions, eval_y = predict_split(net, cache, eval_split, device, first.batch_size)
    seconds = time.perf_counter() - started
    results = []
    params = net.trainable_parameters_per_config()
    for j, config in enumerate(configs):
        state = {name: p[j].detach().cpu().clone() for name, p in net.named_parameters()}
        history = [float(losses[j]) for losses in epoch_losses]
        if j in failures:
            results.append(TrainResult(config, "failed", None, None, history, seconds, params, state, failures[j]))
            continue
        top1, per_class = accuracy(predictions[j], eval_y, len(cache.class_names))
        results.append(TrainResult(config, "ok", top1, per_class, history, seconds, params, state))
    return results


def cross_entropy_per_config(logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """(K, B, C) logits -> (K,) mean cross-entropy per config, with per-config label smoothing."""
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, labels.expand(logits.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    uniform = -log_probs.mean(dim=-1)
    return ((1 - smoothing[:, None]) * nll + smoothing[:, None] * uniform).mean(dim=1)


@torch.no_grad()
def _adamw_step(net: SideNet, moments: dict, lr: torch.Tensor, weight_decay: torch.Tensor,
                active: torch.Tensor, step: int) -> None:
    """AdamW with per-config lr and weight decay (no decay on norms and biases); inactive
    (failed) configs are not updated."""
    beta1, beta2 = ADAM_BETAS
    lr = torch.where(active, lr, torch.zeros_like(lr))
    for name, parameter in net.named_parameters():
        if parameter.grad is None:
            continue
        grad = torch.nan_to_num(parameter.grad, nan=0.0, posinf=0.0, neginf=0.0)
        shape = (-1,) + (1,) * (parameter.dim() - 1)
        exp_avg, exp_avg_sq = moments[name]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_lr = lr.view(shape)
        if net.decay_mask(name):
            parameter.mul_(1 - step_lr * weight_decay.view(shape))
        denominator = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(ADAM_EPS)
        parameter.addcdiv_(exp_avg * (step_lr / (1 - beta1 ** step)), denominator, value=-1.0)


@torch.no_grad()
def predict_split(net: SideNet, cache: Cache, split: str, device: torch.device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N) predicted classes for a split, and its (N,) labels."""
    tokens, labels = load_split(cache, split, net.stages_needed(), device)
    predictions = [net(tokens[i:i + batch_size].float()).argmax(-1) for i in range(0, len(labels), batch_size)]
    return torch.cat(predictions, dim=1).cpu(), labels.cpu()


def accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Top-1 in percent and per-class accuracy in percent (NaN for classes absent from labels)."""
    correct = (predictions == labels).float()
    per_class = [float(correct[labels == c].mean() * 100) if (labels == c).any() else float("nan") for c in range(num_classes)]
    return float(correct.mean() * 100), per_class
