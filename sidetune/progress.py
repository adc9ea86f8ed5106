"""Progress events from long work (extraction, live evaluation, training): the CLI plugs a
rich progress bar in, the API stays quiet."""

from __future__ import annotations


class ProgressSink:
    """Receives progress events; the CLI plugs a rich progress bar in, the API stays quiet."""

    def start_split(self, name: str, total_images: int, done_images: int) -> None: ...
    def advance(self, images: int) -> None: ...
