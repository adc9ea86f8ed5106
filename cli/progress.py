"""Rich progress bars and the console shared by every command."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from sidetune.extract import ProgressSink

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second over the run so far (images/s for extraction)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("--" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


class RichProgress(ProgressSink):
    """A rich bar per split: done/total images, images/s, elapsed and remaining time."""

    def __init__(self):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            RateColumn("img"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
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
