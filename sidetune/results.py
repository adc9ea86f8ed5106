"""Result records as files people read: learning curves (PNG) now; tables and sweep plots
build on the same helpers."""

from __future__ import annotations

import math
from pathlib import Path

from sidetune.runs import write_atomically


def save_figure(figure, path: Path) -> None:
    """Write a matplotlib figure as a PNG, atomically (a full disk leaves the old file and no
    temporary one), and close it."""
    from matplotlib import pyplot as plt

    try:
        write_atomically(Path(path), lambda target: figure.savefig(target, format="png"))
    finally:
        plt.close(figure)


def plot_learning_curve(history: list[dict], path: Path, title: str, eval_split: str = "eval") -> None:
    """Training loss (left axis) and accuracy (right axis: training, and the eval split where
    it was measured) per epoch, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=120)
    loss_axis.plot(epochs, [row["loss"] for row in history], color="tab:blue", label="training loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss", color="tab:blue")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot(epochs, [row["train_top1"] for row in history], color="tab:orange", label="training top-1")
    evaluated = [(row["epoch"], row["eval_top1"]) for row in history if not math.isnan(row.get("eval_top1", math.nan))]
    if evaluated:
        accuracy_axis.plot(*zip(*evaluated), "o-", color="tab:green", label=f"{eval_split} top-1")
    accuracy_axis.set_ylabel("top-1 (%)")
    accuracy_axis.set_ylim(0, 100)
    handles = loss_axis.get_legend_handles_labels()[0] + accuracy_axis.get_legend_handles_labels()[0]
    figure.legend(handles, [h.get_label() for h in handles], loc="lower center", ncols=len(handles), frameon=False)
    loss_axis.set_title(title)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(figure, path)


def plot_penalty_path(path: list[tuple[float, float]], chosen: float, file: Path, title: str, eval_split: str) -> None:
    """A closed-form method's eval top-1 against its L2 strength λ (log scale), the run's own λ
    marked, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot(*zip(*sorted(path)), "o-", color="tab:blue", label=f"{eval_split} top-1")
    axis.axvline(chosen, color="tab:orange", linestyle="--", label=f"this run: λ = {chosen:g}")
    axis.set_xscale("log")
    axis.set_xlabel("L2 strength λ (--wd)")
    axis.set_ylabel("top-1 (%)")
    axis.set_title(title)
    axis.legend(fontsize="small")
    figure.tight_layout()
    save_figure(figure, file)


RESULT_FIELDS = {"config_id", "phase", "status", "top1", "seconds", "params", "failure", "train_split", "eval_split",
                 "process_rank"}


def varying_settings(records: list[dict]) -> list[str]:
    """The settings (hyperparameters, options) that take more than one value across records."""
    return [key for key in records[0] if key not in RESULT_FIELDS and len({str(r.get(key)) for r in records}) > 1]


def plot_sweep(records: list[dict], path: Path, title: str) -> None:
    """Score against the learning rate (or the first other setting that varies), one line per
    combination of the remaining varying settings (e.g. one per rank), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    varying = varying_settings(records)
    x_key = "lr" if "lr" in varying else (varying[0] if varying else "config_id")
    line_keys = [key for key in varying if key != x_key]
    lines: dict[tuple, list[tuple[float, float]]] = {}
    for record in records:
        if record["status"] == "ok":
            lines.setdefault(tuple(record[k] for k in line_keys), []).append((record[x_key], record["top1"]))
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    for key, points in lines.items():
        points.sort(key=lambda point: point[0])
        label = ", ".join(f"{name}={value}" for name, value in zip(line_keys, key)) or None
        axis.plot(*zip(*points), "o-", label=label)
    numeric = all(isinstance(r[x_key], (int, float)) and not isinstance(r[x_key], bool) for r in records)
    if numeric and x_key in ("lr", "weight_decay") and min(r[x_key] for r in records) > 0:
        axis.set_xscale("log")
    axis.set_xlabel(x_key)
    axis.set_ylabel("top-1 (%)")
    axis.set_title(title)
    if any(key for key in lines if key):
        axis.legend(fontsize="small")
    figure.tight_layout()
    save_figure(figure, path)


def plot_task_scores(rows: list[dict], path: Path, title: str) -> None:
    """Top-1 per task as bars, beside the published number where there is one, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    positions = range(len(rows))
    has_published = any(row["published"] is not None for row in rows)
    width = 0.4 if has_published else 0.8
    figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4), dpi=120)
    axis.bar([x - width / 2 * has_published for x in positions], [row["top1"] for row in rows], width, label="sidetune")
    if has_published:
        axis.bar([x + width / 2 for x in positions], [row["published"] or 0 for row in rows], width, label="published")
        axis.legend(fontsize="small")
    axis.set_xticks(list(positions), [row["task"] for row in rows], rotation=45, ha="right")
    axis.set_ylabel("top-1 (%)")
    axis.set_ylim(0, 100)
    axis.set_title(title)
    figure.tight_layout()
    save_figure(figure, path)
