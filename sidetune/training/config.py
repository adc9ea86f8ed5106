"""What one side-network configuration is (`TrainConfig`) and what training it gave (`TrainResult`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from sidetune.errors import SidetuneError
from sidetune.sidenets import SIDENETS, resolve_options
from sidetune.training.augment import check_augmentation


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
    augment: str = "none"  # feature-space augmentation of training batches (sidetune/training/augment.py)
    augment_magnitude: float = 0.5
    views: int | None = None  # augmented views drawn from (the first n stored; None: all the cache has; 0: none)

    @classmethod
    def create(cls, method: str, options: dict | None = None, **fields) -> "TrainConfig":
        """A config with every method option resolved (defaults filled in, unknown ones
        refused), the method's default learning rate, epochs and weight decay unless given, and
        a tenth of the epochs as warmup unless `warmup_epochs` is given."""
        options = resolve_options(method, options or {})  # refuses an unknown method first
        sidenet = SIDENETS[method]
        epochs = fields.setdefault("epochs", sidenet.default_epochs)
        fields.setdefault("lr", sidenet.default_lr)
        fields.setdefault("weight_decay", sidenet.default_weight_decay)
        fields.setdefault("warmup_epochs", epochs // 10)
        if fields["warmup_epochs"] > epochs:
            raise SidetuneError(f"Warmup ({fields['warmup_epochs']} epochs) is longer than training "
                                f"({epochs} epochs); lower --warmup-epochs.")
        check_augmentation(fields.get("augment", cls.augment), fields.get("augment_magnitude", cls.augment_magnitude))
        for name in ("lr", "weight_decay", "label_smoothing", "augment_magnitude"):
            value = fields.get(name)
            if isinstance(value, float) and not math.isfinite(value):
                flag = "--" + {"weight_decay": "wd"}.get(name, name).replace("_", "-")
                raise SidetuneError(f"{flag} got {value}; it must be a finite number.")
        return cls(method=method, options=options, **fields)

    def group_key(self) -> tuple:
        """What configurations stacked together share: all but lr, weight decay, label smoothing,
        seed and the method's stacked options (k-NN's neighbours and temperature)."""
        stacked = SIDENETS[self.method].stacked_options
        shaping = tuple((name, value) for name, value in self.options if name not in stacked)
        return (self.method, shaping, self.epochs, self.warmup_epochs, self.batch_size, self.data_seed,
                self.augment, self.augment_magnitude, self.views)

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
