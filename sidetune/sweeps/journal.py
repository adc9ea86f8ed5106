"""A sweep's rows: what each configuration gave, journaled per rank as stacks finish so an
interrupted sweep trains only what is missing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from sidetune.errors import SidetuneError
from sidetune.training import TrainConfig, TrainResult


@dataclass
class SweepRow:
    """One line of results.jsonl / results.csv."""

    config_id: int
    phase: str  # "select" (scored on the selection split), "final" (retrained, reported) or "single"
    train_split: str
    eval_split: str
    status: str
    top1: float | None
    seconds: float
    params: int
    config: TrainConfig
    failure: str | None = None
    process_rank: int = 0  # the torchrun rank that trained it
    epochs_trained: int | None = None  # fewer than its epochs when successive halving pruned it

    def record(self) -> dict:
        return {"config_id": self.config_id, "phase": self.phase, "status": self.status, "top1": self.top1,
                "train_split": self.train_split, "eval_split": self.eval_split, "seconds": round(self.seconds, 3),
                "params": self.params, **self.config.hyperparameters(), "failure": self.failure, "process_rank": self.process_rank,
                "epochs_trained": self.epochs_trained}



def append_rows(path: Path, rows: list[SweepRow]) -> None:
    """Add finished rows to a rank's journal (ranks/rank-R.jsonl), one stack at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as journal:
        for row in rows:
            record = {f.name: getattr(row, f.name) for f in fields(row) if f.name != "config"}
            journal.write(json.dumps({**record, "config": row.config.describe()}, default=json_number) + "\n")


def finished_rows(out: Path, phase: str, configs: dict[int, TrainConfig], train_split: str,
                  eval_split: str) -> dict[int, SweepRow]:
    """The rows of `phase` that an earlier, interrupted run of this sweep finished (from every
    rank's journal), by config id; refuses a folder that holds another sweep."""
    done: dict[int, SweepRow] = {}
    for path in sorted((out / "ranks").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            if record["phase"] != phase or record["config_id"] not in configs:
                continue  # another phase, or a config this run does not ask for (e.g. a smaller --top-k)
            config = TrainConfig.from_record(record.pop("config"))
            row = SweepRow(**record, config=config)
            if configs[row.config_id] != config or (row.train_split, row.eval_split) != (train_split, eval_split):
                raise SidetuneError(f"{out} holds a sweep with other settings (config {row.config_id} differs). Rerun "
                                    "with its settings to resume it, or choose another --out.")
            done[row.config_id] = row
    return done



def result_row(config_id: int, phase: str, train_split: str, eval_split: str, result: TrainResult, rank: int) -> SweepRow:
    """The row of one trained configuration."""
    return SweepRow(config_id, phase, train_split, eval_split, result.status, result.top1, result.seconds,
                    result.params, result.config, result.failure, rank, len(result.history))



def write_rows(path: Path, rows: list[SweepRow]) -> None:
    """All rows as JSON lines (results.jsonl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row.record(), default=json_number) + "\n" for row in rows))


def json_number(value: object) -> object:
    """NaN as JSON null (json.dumps' `default` hook)."""
    return None if isinstance(value, float) and math.isnan(value) else value
