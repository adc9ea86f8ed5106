"""What an epoch did (`EpochStats`) and everything a stacked group needs to continue after an
interruption (`GroupState`), as the plain data checkpoints hold."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from sidetune.errors import SidetuneError
from sidetune.sidenets import SideNet
from sidetune.training.config import TrainConfig
from sidetune.training.optim import StackedAdamW


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


def configs_of(records: list[dict]) -> list[TrainConfig]:
    """Configurations from their descriptions; fields added since a record was written take
    their defaults, so a checkpoint from before them still resumes."""
    return [TrainConfig.from_record(record) for record in records]


def restore_group(net: SideNet, optimizer: StackedAdamW, fresh: GroupState, saved: GroupState) -> GroupState:
    if configs_of(saved.fingerprint) != configs_of(fresh.fingerprint):
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
