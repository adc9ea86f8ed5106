"""Rich progress bars and the console shared by every command."""

from __future__ import annotations

import time

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from sidetune.progress import ProgressSink

console = Console(stderr=True)


def folding_table(*headers: str, whole: tuple[str, ...] = (), **options) -> Table:
    """A rich table whose cells wrap (and a word too long for its column folds) when the terminal
    is narrow, never cut with an ellipsis: train800 and train800val200 stay tell-apart at 80
    columns. The columns named in `whole` (short names and numbers) keep their width: the narrowing
    goes to the others, so a split name is never broken. Borders are light (a head rule only),
    leaving the text the room."""
    made = Table(*headers, **{"box": box.SIMPLE_HEAD, "collapse_padding": True, "pad_edge": False, **options})
    for column in made.columns:
        column.overflow = "fold"
        column.no_wrap = column.header in whole
    return made


class RateColumn(ProgressColumn):
    """Items per second over the run so far (images/s for extraction)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("--" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


class RichProgress(ProgressSink):
    """A rich bar per split: done/total images, images/s, elapsed and remaining time (under
    torchrun, rank 0's bar counts every rank's written shards)."""

    def __init__(self, quiet: bool = False):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            RateColumn("img"), TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet,
        )
        self.task = None

    def __enter__(self) -> "RichProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start_split(self, name: str, total_images: int, done_images: int) -> None:
        if done_images:
            console.print(f"[dim]{name}: resuming, {done_images} of {total_images} images already cached")
        self.task = self.progress.add_task(name, total=total_images - done_images)

    def advance(self, images: int) -> None:
        self.progress.advance(self.task, images)


class TrainProgress(ProgressSink):
    """A rich bar over epochs: loss, training accuracy, eval accuracy when measured, and
    throughput in images per second (x configurations); the mean over stacked configurations.
    A sweep adds one bar per stack (`stack_started`). A live split's pass through the backbone
    (the test split, scored at the end) gets a bar of images and images per second."""

    def __init__(self, quiet: bool = False):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[unit]} {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("train {task.fields[train]}"),
            TextColumn("eval {task.fields[eval]}"), TextColumn("{task.fields[rate]} img/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet,
        )
        self.task = None

    def __enter__(self) -> "TrainProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def add(self, description: str, epochs: int, completed: int = 0) -> None:
        """A bar over `epochs`, from `completed` (a resumed run's); added once training starts,
        so nothing is drawn before the options are checked."""
        self.task = self.progress.add_task(description, total=epochs, completed=completed, unit="epoch", loss="-",
                                           train="-", eval="-", rate="-")

    def start_split(self, name: str, total_images: int, done_images: int) -> None:
        self.live = self.progress.add_task(name, total=total_images, completed=done_images, unit="images", loss="-",
                                           train="-", eval="-", rate="-")
        self.live_started, self.live_done = time.perf_counter(), 0

    def advance(self, images: int) -> None:
        self.live_done += images
        rate = self.live_done / max(time.perf_counter() - self.live_started, 1e-9)
        self.progress.update(self.live, advance=images, rate=f"{rate:,.0f}")

    def stack_started(self, number: int, total: int, configs: list) -> None:
        self.add(f"{configs[0].method} stack {number + 1}/{total} ({len(configs)} config{'s' if len(configs) > 1 else ''})", configs[0].epochs)

    def epoch_done(self, stats) -> None:
        fields = {"loss": _mean(stats.loss, "{:.4f}"), "train": _mean(stats.train_top1, "{:.1f}%"),
                  "rate": f"{stats.images_per_second:,.0f}"}
        if stats.eval_top1 is not None:
            fields["eval"] = _mean(stats.eval_top1, "{:.1f}%")
        self.progress.update(self.task, completed=stats.epoch, **fields)


def _mean(values: list[float], fmt: str) -> str:
    finite = [v for v in values if v == v]
    return fmt.format(sum(finite) / len(finite)) if finite else "-"
