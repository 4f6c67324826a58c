"""Progress bars on stderr for long stages (rich), silent when asked to be."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """Shows one progress bar per stage on stderr and records each stage's wall time.

    :param enabled: show bars (False: record timings only).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Context for a stage: yields ``update(completed)``; the time is added to ``timings``."""
        t0 = time.perf_counter()
        if not self.enabled:
            yield lambda _n: None
        else:
            with Progress(
                TextColumn("[bold blue]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            ) as bar:
                task = bar.add_task(name, total=total)
                yield lambda n: bar.update(task, completed=n)
                bar.update(task, completed=total if total is not None else 1, total=total or 1)
        self.timings[name.split(":")[0]] = self.timings.get(name.split(":")[0], 0.0) + (
            time.perf_counter() - t0
        )

    def info(self, message: str) -> None:
        """A one-line note on stderr."""
        if self.enabled:
            self.console.print(message)
