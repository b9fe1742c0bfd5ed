"""The updater's progress bar: rich on stderr when it is a terminal, nothing otherwise (logs still say
what happened)."""

from __future__ import annotations

from types import TracebackType
from typing import Any


class ProgressDisplay:
    """``advance(samples, text)`` moves a bar of new-task samples and shows the latest status text."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total = total
        self._progress: Any = None
        self._bar: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]adapt"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,} samples"),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> ProgressDisplay:
        if self._progress is not None:
            self._progress.start()
            self._bar = self._progress.add_task("", total=self.total)
        return self

    def advance(self, samples: int, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._bar, advance=samples, description=text)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
