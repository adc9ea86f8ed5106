"""Stage two: train K stacked side-network configurations from the cache in one loop.

A split's features are loaded into device memory once when they fit the memory budget
(otherwise streamed by whole shards with prefetch, sidetune/cache/loader.py); batches are
gathered on the device.
All K configurations share every batch. Per-config learning rate and weight decay are
tensors; losses are summed over configs (never averaged across them), there is no gradient
clipping, and a configuration that goes non-finite is frozen and reported while the others
continue. `train` of one configuration is this loop with K = 1."""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from sidetune.cache.loader import LoadedSplits, ResidentFeatures, StreamedFeatures
from sidetune.cache.reader import Cache
from sidetune.compute import autocast
from sidetune.errors import SidetuneError
from sidetune.sidenets import SIDENETS, FeatureLayout, SideNet, create_sidenet, resolve_options

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

    @classmethod
    def create(cls, method: str, options: dict | None = None, **fields) -> "TrainConfig":
        """A config with every method option resolved (defaults filled in, unknown ones
        refused), the method's default learning rate unless `lr` is given, and a tenth of the
        epochs as warmup unless `warmup_epochs` is given."""
        options = resolve_options(method, options or {})  # refuses an unknown method first
        epochs = fields.setdefault("epochs", cls.epochs)
        fields.setdefault("lr", SIDENETS[method].default_lr)
        fields.setdefault("warmup_epochs", epochs // 10)
        if fields["warmup_epochs"] > epochs:
            raise SidetuneError(f"Warmup ({fields['warmup_epochs']} epochs) is longer than training "
                                f"({epochs} epochs); lower --warmup-epochs.")
        return cls(method=method, options=options, **fields)

    def group_key(self) -> tuple:
        return (self.method, self.options, self.epochs, self.warmup_epochs, self.batch_size, self.data_seed)

    def describe(self) -> dict:
        record = asdict(self)
        record["options"] = dict(self.options)
        return record

    @classmethod
    def from_record(cls, record: dict) -> "TrainConfig":
        """The inverse of `describe`."""
        return cls(**{**record, "options": tuple(sorted(record["options"].items()))})

    def hyperparameters(self) -> dict:
        """Every setting as one flat record: the training fields and the method's options."""
        record = {k: v for k, v in asdict(self).items() if k != "options"}
        return {**record, **dict(self.options)}


@dataclass
class TrainResult:
    """One configuration after training: final top-1 and per-class accuracy on the eval
    split, the per-epoch history, and its final (and, with evaluation during training, best)
    state, loadable with `SideNet.load_config_state`."""

    config: TrainConfig
    status: str  # "ok" or "failed"
    top1: float | None
    per_class: list[float] | None
    history: list[dict] = field(default_factory=list)  # EpochStats.row per epoch
    seconds: float = 0.0
    params: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None
    best_top1: float | None = None
    best_epoch: int | None = None
    failure: str | None = None

    @property
    def epoch_losses(self) -> list[float]:
        return [row["loss"] for row in self.history]


def feature_layout(manifest: dict) -> FeatureLayout:
    """What a side network needs to know about a cache's features, from its manifest."""
    layout = manifest["layout"]
    return FeatureLayout(
        depth=manifest["backbone"]["depth"],
        width=layout["width"],
        num_tokens=layout["num_tokens"],
        num_prefix_tokens=layout["num_prefix_tokens"],
        num_classes=len(manifest["dataset"]["class_names"]),
        stages=tuple(layout["stages"]),
        token_selection=layout["token_selection"],
    )


def build_sidenet(cache: Cache, method: str, options: dict, num_configs: int) -> SideNet:
    """A side network for this cache, refusing caches that lack what it reads."""
    layout = feature_layout(cache.manifest)
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


def restore_sidenet(manifest: dict, config: TrainConfig, state: dict[str, torch.Tensor]) -> SideNet:
    """A one-config side network with a saved `config_state`, built from the cache's manifest
    alone (the state carries the frozen final norm)."""
    net = create_sidenet(config.method, feature_layout(manifest), 1, **dict(config.options))
    norm = manifest["backbone"].get("final_norm")
    if norm is None:
        net.set_final_norm(None, None, 0.0)
    else:
        width = manifest["layout"]["width"]
        net.set_final_norm(torch.empty(width), torch.empty(width), norm["eps"])
    net.load_config_state(state)
    return net.eval()


def training_autocast(device: torch.device) -> AbstractContextManager:
    """Side networks train under bf16 autocast on CUDA and in full precision on the CPU."""
    return autocast(device, torch.bfloat16 if device.type == "cuda" else None)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class EpochStats:
    """What one epoch did, per configuration (index j of each list is config j)."""

    epoch: int  # 1-based
    loss: list[float]  # mean training loss; NaN for a failed config
    train_top1: list[float]  # accuracy on the training batches as they were seen
    eval_top1: list[float] | None  # on the eval split, when evaluated this epoch
    seconds: float  # since training started
    images_per_second: float  # this epoch's training throughput (images x configs / s)

    def row(self, index: int) -> dict:
        row = {"epoch": self.epoch, "loss": self.loss[index], "train_top1": self.train_top1[index],
               "seconds": round(self.seconds, 3)}
        if self.eval_top1 is not None:
            row["eval_top1"] = self.eval_top1[index]
        return row


@dataclass
class GroupState:
    """Everything a stacked group's training needs to continue after an interruption: saved
    at epoch boundaries, where the batch order depends only on (data_seed, epoch)."""

    epoch: int
    parameters: dict[str, torch.Tensor]
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]
    active: torch.Tensor
    failures: dict[int, str]
    history: list[EpochStats]
    best: list[tuple[float, int, dict[str, torch.Tensor]] | None]  # per config: (top1, epoch, state)
    fingerprint: list[dict]  # the configs' descriptions, to refuse resuming another group


Checkpointer = Callable[[GroupState], None]


def train_group(cache: Cache, configs: list[TrainConfig], train_split: str, eval_split: str,
                device: str | torch.device = "cpu", *, eval_every: int = 0, memory_budget: int | None = None,
                on_epoch: Callable[[EpochStats], None] | None = None, resume: GroupState | None = None,
                checkpoint: Checkpointer | None = None, compile: bool = False,
                loaded: LoadedSplits | None = None) -> list[TrainResult]:
    """Train configs that share a group key, stacked along the leading axis, and evaluate
    them on `eval_split` after training (and every `eval_every` epochs, which also keeps the
    best state). `on_epoch` sees each epoch's stats; `checkpoint` receives the group's state
    after each epoch, and `resume` continues from such a state. `compile` runs the training
    forward through `torch.compile` (fused kernels; a one-off compile cost per shape). `loaded`
    shares the splits' features with other stacks (a sweep passes one to all its stacks)."""
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
    loaded = loaded or LoadedSplits(cache, device, memory_budget)
    train_data = loaded.get(train_split, stages)
    eval_data = None
    if net.standardize:
        net.fit_standardizer(tokens[:, -1] for tokens, _ in train_data.batches(256))

    k = len(configs)
    lr = torch.tensor([c.lr for c in configs], device=device)
    weight_decay = torch.tensor([c.weight_decay for c in configs], device=device)
    smoothing = torch.tensor([c.label_smoothing for c in configs], device=device)
    fingerprint = [c.describe() for c in configs]
    state = GroupState(0, {}, {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in net.named_parameters()},
                       torch.ones(k, dtype=torch.bool, device=device), {}, [], [None] * k, fingerprint)
    if resume is not None:
        state = _restore(net, state, resume, device)

    num_images = train_data.num_images
    steps_per_epoch = math.ceil(num_images / first.batch_size)
    total_steps = steps_per_epoch * first.epochs
    warmup_steps = steps_per_epoch * first.warmup_epochs
    mixed_precision = training_autocast(device)
    forward = torch.compile(net, dynamic=False) if compile else net
    for epoch in range(state.epoch, first.epochs):
        epoch_started = time.perf_counter()
        step = epoch * steps_per_epoch
        loss_sum = torch.zeros(k, device=device)
        correct = torch.zeros(k, device=device)
        shuffle = torch.Generator().manual_seed(first.data_seed * 100_003 + epoch)
        net.train()
        for tokens, labels in train_data.batches(first.batch_size, shuffle):
            with mixed_precision:
                logits = forward(tokens.float())
            losses = cross_entropy_per_config(logits.float(), labels, smoothing)
            finite = torch.isfinite(losses)
            active = state.active
            if not bool(finite[active].all()):
                for j in torch.nonzero(active & ~finite).flatten().tolist():
                    state.failures[j] = f"loss became {losses[j].item()} at epoch {epoch + 1}, step {step + 1}"
                active &= finite
            net.zero_grad(set_to_none=True)
            torch.where(active, losses, torch.zeros_like(losses)).sum().backward()
            _adamw_step(net, state.moments, lr * lr_multiplier(step, total_steps, warmup_steps), weight_decay, active, step + 1)
            loss_sum += torch.where(active, losses.detach(), torch.zeros_like(losses)) * len(labels)
            correct += (logits.detach().argmax(-1) == labels).sum(dim=1)
            step += 1
        eval_top1 = None
        if eval_every and ((epoch + 1) % eval_every == 0 or epoch + 1 == first.epochs):
            eval_data = eval_data or loaded.get(eval_split, stages)
            predictions, eval_labels = predicted_classes(net, eval_data, first.batch_size)
            eval_top1 = [math.nan if j in state.failures else float((predictions[j] == eval_labels).float().mean() * 100)
                         for j in range(k)]
            for j, top1 in enumerate(eval_top1):
                if j not in state.failures and (state.best[j] is None or top1 > state.best[j][0]):
                    state.best[j] = (top1, epoch + 1, net.config_state(j))
        active_cpu = state.active.cpu()
        mean_loss = torch.where(active_cpu, (loss_sum / num_images).cpu(), torch.full((k,), math.nan))
        stats = EpochStats(epoch + 1, mean_loss.tolist(), (correct / num_images * 100).cpu().tolist(), eval_top1,
                           time.perf_counter() - started, num_images * k / (time.perf_counter() - epoch_started))
        state.history.append(stats)
        state.epoch = epoch + 1
        if checkpoint is not None:
            state.parameters = {name: p.detach() for name, p in net.named_parameters()}
            checkpoint(state)
        if on_epoch is not None:
            on_epoch(stats)

    if eval_data is None:
        eval_data = loaded.get(eval_split, stages)
    predictions, eval_labels = predicted_classes(net, eval_data, first.batch_size)
    seconds = time.perf_counter() - started
    params = net.trainable_parameters_per_config()
    results = []
    for j, config in enumerate(configs):
        history = [stats.row(j) for stats in state.history]
        best = state.best[j]
        common = dict(history=history, seconds=seconds, params=params, state=net.config_state(j),
                      best_state=best[2] if best else None, best_top1=best[0] if best else None,
                      best_epoch=best[1] if best else None)
        if j in state.failures:
            results.append(TrainResult(config, "failed", None, None, failure=state.failures[j], **common))
            continue
        top1, per_class = accuracy(predictions[j], eval_labels, len(cache.class_names))
        results.append(TrainResult(config, "ok", top1, per_class, **common))
    return results


def _restore(net: SideNet, fresh: GroupState, saved: GroupState, device: torch.device) -> GroupState:
    if saved.fingerprint != fresh.fingerprint:
        raise SidetuneError("The checkpoint was written for other configurations than these; "
                            "start a new run directory (or pass the same settings to resume).")
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            parameter.copy_(saved.parameters[name])
    saved.moments = {name: (m.to(device), v.to(device)) for name, (m, v) in saved.moments.items()}
    saved.active = saved.active.to(device)
    return saved


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
def predicted_classes(net: SideNet, data: ResidentFeatures | StreamedFeatures, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N) predicted classes for a split in stored order, and its (N,) labels, on the CPU."""
    net.eval()
    predictions = [net(tokens.float()).argmax(-1).cpu() for tokens, _ in data.batches(batch_size)]
    return torch.cat(predictions, dim=1), data.labels.cpu()


def accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Top-1 in percent and per-class accuracy in percent (NaN for classes absent from labels)."""
    correct = (predictions == labels).float()
    per_class = [float(correct[labels == c].mean() * 100) if (labels == c).any() else float("nan") for c in range(num_classes)]
    return float(correct.mean() * 100), per_class
