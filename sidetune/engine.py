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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from sidetune.augment import BrightnessAugmentation, augmentation_generator, check_augmentation
from sidetune.cache.layout import TokenLayout
from sidetune.cache.loader import ResidentFeatures, StreamedFeatures
from sidetune.loading import LoadedSplits
from sidetune.cache.reader import Cache
from sidetune.cache.spec import specs_serving
from sidetune.errors import SidetuneError
from sidetune.kernels import check_fused
from sidetune.optim import StackedAdamW
from sidetune.sidenets import SIDENETS, FeatureLayout, SideNet, create_sidenet, resolve_options


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
    data_seed: int = 0  # batch order (and augmentation draws); shared by a stacked group
    augment: str = "none"  # feature-space augmentation of training batches (sidetune/augment.py)
    augment_magnitude: float = 0.5

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
        check_augmentation(fields.get("augment", cls.augment), fields.get("augment_magnitude", cls.augment_magnitude))
        return cls(method=method, options=options, **fields)

    def group_key(self) -> tuple:
        return (self.method, self.options, self.epochs, self.warmup_epochs, self.batch_size, self.data_seed,
                self.augment, self.augment_magnitude)

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
    backbone_stages = manifest["backbone"].get("stages")  # absent in caches written before any timm backbone
    return FeatureLayout(
        depth=manifest["backbone"]["depth"],
        width=layout["width"],
        num_tokens=layout["num_tokens"],
        num_prefix_tokens=layout["num_prefix_tokens"],
        num_classes=len(manifest["dataset"]["class_names"]),
        stages=tuple(layout["stages"]),
        token_selection=layout["token_selection"],
        stage_shapes=TokenLayout.from_manifest(manifest).shapes,
        first_stage=backbone_stages[0]["stage"] if backbone_stages else 0,
    )


def build_sidenet(cache: Cache, method: str, options: dict, num_configs: int) -> SideNet:
    """A side network for this cache, refusing caches that lack what it reads."""
    layout = feature_layout(cache.manifest)
    net = create_sidenet(method, layout, num_configs, **options)
    missing = [s for s in net.stages_needed() if s not in layout.stages]
    if missing or layout.token_selection not in net.token_selections:
        backbone_stages = cache.manifest["backbone"].get("stages") or [{"num_tokens": 0, "width": 0}]
        one_shape = len({(stage["num_tokens"], stage["width"]) for stage in backbone_stages}) == 1
        serving = specs_serving(layout.depth, net.stages_needed(), net.token_selections, layout.first_stage, one_shape,
                                net.reads_sums)
        fix = (f"Extract with --spec {serving[0]}" + (f" (or {', '.join(serving[1:3])})" if serving[1:] else "")
               if serving else "Extract with a spec that keeps them")
        readers = [name for name in SIDENETS if name != method and _reads(name, layout)]
        raise SidetuneError(
            f"Method {method} reads stages {net.stages_needed()} with {'/'.join(net.token_selections)} "
            f"tokens; cache {cache.path} stores {cache.token_layout.describe_stages()} with "
            f"'{layout.token_selection}' tokens. {fix}"
            + (f", or train a method that reads this cache: {', '.join(readers)}." if readers else ".")
        )
    norm = cache.final_norm()
    if norm is None:
        net.set_final_norm(None, None, 0.0)
    else:
        net.set_final_norm(torch.from_numpy(norm["weight"]), torch.from_numpy(norm["bias"]), norm["eps"])
    return net


def _reads(method: str, layout: FeatureLayout) -> bool:
    """Whether `method`, at its default options, finds what it reads in a cache of `layout`."""
    try:
        net = create_sidenet(method, layout, 1)
    except SidetuneError:
        return False
    return layout.token_selection in net.token_selections and set(net.stages_needed()) <= set(layout.stages)


def restore_sidenet(manifest: dict, config: TrainConfig, state: dict[str, torch.Tensor]) -> SideNet:
    """A one-config side network with a saved `config_state`, built from the cache's manifest
    alone (the state carries the frozen final norm)."""
    net = create_sidenet(config.method, feature_layout(manifest), 1, **dict(config.options))
    norm = manifest["backbone"].get("final_norm")
    if norm is None:
        net.set_final_norm(None, None, 0.0)
    else:
        width = manifest["layout"]["width"]
        net.set_final_norm(torch.empty(width), torch.empty(width), norm["eps"])  # values: from the state
    net.load_config_state(state)
    return net.eval()


def training_autocast(device: torch.device) -> AbstractContextManager:
    """Side networks train under bf16 autocast on CUDA and in full precision on the CPU. The
    cast-weight cache is off: it must be for CUDA-graph capture, and stacked weights are cast
    once per step anyway."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


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

    def select(self, keep: list[int]) -> "GroupState":
        """The state of the configurations at positions `keep` alone, to continue them as a
        smaller stack."""
        index = torch.tensor(keep)
        pick = lambda values: [values[j] for j in keep]  # noqa: E731
        history = [replace(stats, loss=pick(stats.loss), train_top1=pick(stats.train_top1),
                           eval_top1=None if stats.eval_top1 is None else pick(stats.eval_top1)) for stats in self.history]
        failures = {keep.index(j): reason for j, reason in self.failures.items() if j in keep}
        return GroupState(self.epoch, {name: p[index] for name, p in self.parameters.items()},
                          {name: (m[index], v[index]) for name, (m, v) in self.moments.items()}, self.active[index],
                          failures, history, pick(self.best), pick(self.fingerprint))

    def to_record(self) -> dict:
        """The state as plain data (dicts, lists, numbers, strings, tensors), as checkpoint files
        hold it: loadable with `torch.load(..., weights_only=True)` and independent of where
        this class lives."""
        return {"epoch": self.epoch, "parameters": self.parameters,
                "moments": {name: [m, v] for name, (m, v) in self.moments.items()}, "active": self.active,
                "failures": {str(j): reason for j, reason in self.failures.items()},
                "history": [asdict(stats) for stats in self.history],
                "best": [None if b is None else {"top1": b[0], "epoch": b[1], "state": b[2]} for b in self.best],
                "fingerprint": self.fingerprint}

    @classmethod
    def from_record(cls, record: "dict | GroupState") -> "GroupState":
        """The state from `to_record`'s plain data (a checkpoint written before checkpoints were
        plain data holds the GroupState itself, returned as it is)."""
        if isinstance(record, GroupState):
            return record
        return cls(record["epoch"], record["parameters"], {name: (m, v) for name, (m, v) in record["moments"].items()},
                   record["active"], {int(j): reason for j, reason in record["failures"].items()},
                   [EpochStats(**stats) for stats in record["history"]],
                   [None if b is None else (b["top1"], b["epoch"], b["state"]) for b in record["best"]],
                   record["fingerprint"])


Checkpointer = Callable[[GroupState], None]


def train_group(cache: Cache, configs: list[TrainConfig], train_split: str, eval_split: str,
                device: str | torch.device = "cpu", *, eval_every: int = 0, memory_budget: int | None = None,
                on_epoch: Callable[[EpochStats], None] | None = None, resume: GroupState | None = None,
                checkpoint: Checkpointer | None = None, compile: bool = False, cuda_graphs: bool | None = None,
                fused: bool = False, loaded: LoadedSplits | None = None, evaluate: bool = True,
                until_epoch: int | None = None) -> list[TrainResult]:
    """Train configs that share a group key, stacked along the leading axis, and evaluate
    them on `eval_split` after training (and every `eval_every` epochs, which also keeps the
    best state). `on_epoch` sees each epoch's stats; `checkpoint` receives the group's state
    after each epoch, and `resume` continues from such a state. `compile` runs the training
    forward through `torch.compile` (fused kernels; a one-off compile cost per shape).
    `cuda_graphs` captures each step (forward, backward, optimizer) in a CUDA graph and replays
    it: on by default on CUDA. `fused` runs the fused Triton kernels (sidetune/kernels/: LAST's and
    MIST's chain of modules, the optimizer) instead of their torch implementations. `loaded` shares the splits' features with other stacks (a sweep
    passes one to all its stacks). With `evaluate` False the final evaluation is left to the
    caller (`score`), whose results then have no top-1 yet. `until_epoch` stops after that
    epoch (the schedule stays that of the full run): with the state `checkpoint` received,
    `resume` continues it later, as successive halving does (sidetune/halving.py).

    Training reads only the cache. An evaluation split kept out of it (live) is scored through
    the backbone the cache records (sidetune/live.py).

    Nothing inside an epoch waits for the device: losses, accuracy and the failed-config mask
    stay on it and reach the host once per epoch."""
    keys = {c.group_key() for c in configs}
    if len(keys) != 1:
        raise ValueError("train_group needs configs with one group key; see TrainConfig.group_key")
    first = configs[0]
    device = torch.device(device)
    if cache.split(train_split).kind == "live":
        raise SidetuneError(f"Split {train_split} of {cache.path} is not in the cache (it is evaluated live, through "
                            "the backbone); training reads cached splits only. Train on another split, or extract "
                            f"{train_split} into the cache with --splits.")
    if eval_every and cache.split(eval_split).kind == "live":
        raise SidetuneError(f"--eval-every would run the backbone over the live split {eval_split} every "
                            f"{eval_every} epochs. Evaluate during training on a cached split (--eval-split val200), "
                            f"or extract {eval_split} into the cache with --splits.")
    if fused:
        check_fused(device)
    started = time.perf_counter()
    net = build_sidenet(cache, first.method, dict(first.options), len(configs))
    net.fused = fused
    net.reset_parameters([c.seed for c in configs])
    net.to(device)
    stages = net.stages_needed()
    loaded = loaded or LoadedSplits(cache, device, memory_budget)
    train_data = loaded.get(train_split, stages)
    eval_data = None
    if net.standardize:
        net.fit_standardizer(train_data.batches(256))
    augmentation = None
    if first.augment != "none" and first.augment_magnitude > 0:
        shapes = [net.layout.shape(stage) for stage in stages]
        augmentation = BrightnessAugmentation.fit(train_data.batches(256), shapes, net.layout.num_prefix_tokens,
                                                  first.augment_magnitude)

    k = len(configs)
    fingerprint = [c.describe() for c in configs]
    optimizer = StackedAdamW(net, torch.tensor([c.lr for c in configs]), torch.tensor([c.weight_decay for c in configs]),
                             fused=fused)
    state = GroupState(0, {}, {}, torch.ones(k, dtype=torch.bool), {}, [], [None] * k, fingerprint)
    if resume is not None:
        state = _restore(net, optimizer, state, resume)
    use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    step = StackedStep(net, optimizer, torch.tensor([c.label_smoothing for c in configs]), first.batch_size,
                       train_data.sample_shape, train_data.dtype, compile=compile, cuda_graphs=use_graphs)
    step.active.copy_(state.active)

    if net.closed_form:  # e.g. ridge: every configuration solved at once, no epochs
        net.fit(train_data.batches(256), torch.tensor([c.weight_decay for c in configs]))
        state.epoch = first.epochs
    num_images = train_data.num_images
    steps_per_epoch = math.ceil(num_images / first.batch_size)
    total_steps = steps_per_epoch * first.epochs
    warmup_steps = steps_per_epoch * first.warmup_epochs
    for epoch in range(state.epoch, until_epoch or first.epochs):
        epoch_started = time.perf_counter()
        number = epoch * steps_per_epoch
        step.start_epoch()
        shuffle = torch.Generator().manual_seed(first.data_seed * 100_003 + epoch)
        draws = augmentation_generator(first.data_seed, epoch, device) if augmentation else None
        net.train()
        for tokens, labels in train_data.batches(first.batch_size, shuffle, out=step.inputs):
            if augmentation is not None:
                tokens = augmentation(tokens, draws)
            step(tokens, labels, number + 1, lr_multiplier(number, total_steps, warmup_steps))
            number += 1
        totals = step.epoch_totals()  # the epoch's one wait for the device
        for j in range(k):
            if j not in state.failures and not totals.active[j]:
                at = int(totals.failed_step[j])
                state.failures[j] = (f"loss became {totals.failed_loss[j].item()} at epoch "
                                     f"{(at - 1) // steps_per_epoch + 1}, step {at}")
        state.active = totals.active
        eval_top1 = None
        if eval_every and ((epoch + 1) % eval_every == 0 or epoch + 1 == first.epochs):
            eval_data = eval_data or loaded.get(eval_split, stages)
            predictions, eval_labels = predicted_classes(net, eval_data, first.batch_size)
            eval_top1 = [math.nan if j in state.failures else float((predictions[j] == eval_labels).float().mean() * 100)
                         for j in range(k)]
            for j, top1 in enumerate(eval_top1):
                if j not in state.failures and (state.best[j] is None or top1 > state.best[j][0]):
                    state.best[j] = (top1, epoch + 1, net.config_state(j))
        mean_loss = torch.where(totals.active, totals.loss_sum / num_images, torch.full((k,), math.nan))
        stats = EpochStats(epoch + 1, mean_loss.tolist(), (totals.correct / num_images * 100).tolist(), eval_top1,
                           time.perf_counter() - started, num_images * k / (time.perf_counter() - epoch_started))
        state.history.append(stats)
        state.epoch = epoch + 1
        if checkpoint is not None:
            state.parameters = {name: p.detach().clone() for name, p in net.named_parameters()}
            state.moments = optimizer.moments()
            checkpoint(state)
        if on_epoch is not None:
            on_epoch(stats)

    if evaluate:
        eval_data = eval_data or loaded.get(eval_split, stages)
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
        top1, per_class = accuracy(predictions[j], eval_labels, len(cache.class_names)) if evaluate else (None, None)
        results.append(TrainResult(config, "ok", top1, per_class, **common))
    return results


def score(cache: Cache, results: list[TrainResult], split: str, device: str | torch.device,
          loaded: LoadedSplits | None = None, batch_size: int = 64) -> None:
    """Evaluate the final states of `results` (from any stacks) on `split` in one pass: every
    network sees each batch, so a live split goes through the backbone once. Fills in each
    successful result's top-1 and per-class accuracy."""
    trained = [r for r in results if r.status == "ok"]
    if not trained:
        return
    device = torch.device(device)
    nets = [restore_sidenet(cache.manifest, r.config, r.state).to(device) for r in trained]
    predictions, labels = predicted_classes_together(cache, nets, split, device, loaded, batch_size)
    for result, predicted in zip(trained, predictions):
        result.top1, result.per_class = accuracy(predicted, labels, len(cache.class_names))


@torch.no_grad()
def predicted_classes_together(cache: Cache, nets: list[SideNet], split: str, device: torch.device,
                               loaded: LoadedSplits | None = None, batch_size: int = 64
                               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each one-config network's (N,) predicted classes on `split`, every network scoring each
    batch of one pass over it, and the (N,) labels; on the CPU."""
    stages = sorted({stage for net in nets for stage in net.stages_needed()})
    data = (loaded or LoadedSplits(cache, device)).get(split, stages)
    positions = [[stages.index(stage) for stage in net.stages_needed()] for net in nets]
    predictions: list[list[torch.Tensor]] = [[] for _ in nets]
    for tokens, _ in data.batches(batch_size):
        for net, where, kept in zip(nets, positions, predictions):
            kept.append(net.eval()(tokens[:, where]).argmax(-1)[0].cpu())
    return [torch.cat(kept) for kept in predictions], data.labels.cpu()


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


def _configs(records: list[dict]) -> list[TrainConfig]:
    """Configurations from their descriptions; fields added since a record was written take
    their defaults, so a checkpoint from before them still resumes."""
    return [TrainConfig.from_record(record) for record in records]


def _restore(net: SideNet, optimizer: StackedAdamW, fresh: GroupState, saved: GroupState) -> GroupState:
    if _configs(saved.fingerprint) != _configs(fresh.fingerprint):
        raise SidetuneError("The checkpoint was written for other configurations than these; "
                            "start a new run directory (or pass the same settings to resume).")
    saved.parameters = net.upgrade_state(saved.parameters, stacked=True)
    first, second = (net.upgrade_state({name: pair[i] for name, pair in saved.moments.items()}, stacked=True) for i in (0, 1))
    saved.moments = {name: (first[name], second[name]) for name in first}
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            parameter.copy_(saved.parameters[name])
    optimizer.load_moments(saved.moments)
    saved.active = saved.active.cpu()
    return saved


def cross_entropy_per_config(logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """(K, B, C) logits -> (K,) mean cross-entropy per config, with per-config label smoothing."""
    log_probs = torch.log_softmax(logits, dim=-1)
    labelled = log_probs.gather(-1, labels.expand(logits.shape[0], -1).unsqueeze(-1)).mean(dim=(1, 2))
    # (1 - s) nll + s uniform, each averaged over the batch: a few kernels whatever K (launch-bound on a GPU)
    return -torch.lerp(labelled, log_probs.mean(dim=(1, 2)), smoothing)


@torch.no_grad()
def predicted_classes(net: SideNet, data: ResidentFeatures | StreamedFeatures, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N) predicted classes for a split in stored order, and its (N,) labels, on the CPU."""
    net.eval()
    predictions = [net(tokens).argmax(-1).cpu() for tokens, _ in data.batches(batch_size)]
    return torch.cat(predictions, dim=1), data.labels.cpu()


def accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Top-1 in percent and per-class accuracy in percent (NaN for classes absent from labels)."""
    correct = (predictions == labels).float()
    per_class = [float(correct[labels == c].mean() * 100) if (labels == c).any() else float("nan") for c in range(num_classes)]
    return float(correct.mean() * 100), per_class
