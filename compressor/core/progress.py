"""Progress: one callback type for every long computation, and the bars that show it on stderr.

A stage reports ``progress(done, total, detail)``: ``done`` units of ``total`` (None: not known
yet), with an optional phrase saying what it is doing now ("fine-tuning step 300/1500"). The
:class:`Reporter` turns that into one rich progress bar per stage and records the stage's wall
time; library code that is not shown anything gets :func:`no_progress`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bars


class Progress(Protocol):
    """How far a computation got: ``done`` of ``total`` units, and what it is doing now."""

    def __call__(self, done: int, total: int | None = None, detail: str = "") -> None: ...


def no_progress(done: int, total: int | None = None, detail: str = "") -> None:
    """A :class:`Progress` that shows nothing."""


def shifted(progress: Progress, offset: int, total: int | None) -> Progress:
    """``progress`` for a part of a larger count: ``done`` becomes ``offset + done`` of the
    whole ``total`` (a candidate's evaluations after its fine-tuning, say)."""

    whole = total

    def part(done: int, total: int | None = None, detail: str = "") -> None:
        progress(offset + done, whole, detail)

    return part


class Reporter:
    """Shows one progress bar per stage on stderr and records each stage's wall time.

    :param enabled: show bars and notes (False: record timings only).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Progress]:
        """Context for a stage: yields its :class:`Progress`; the stage's time (by the part of
        ``name`` before any colon) is added to ``timings``."""
        t0 = time.perf_counter()
        if not self.enabled:
            yield no_progress
        else:
            columns = (TextColumn("[bold blue]{task.description}"), BarColumn())
            more = (MofNCompleteColumn(), TimeElapsedColumn())
            with Bars(*columns, *more, console=self.console, transient=False) as bars:
                task = bars.add_task(escape(name), total=total)

                def update(done: int, total: int | None = total, detail: str = "") -> None:
                    label = escape(f"{name}: {detail}" if detail else name)
                    bars.update(task, completed=done, total=total, description=label)

                yield update
                final = total if total is not None else 1
                bars.update(task, completed=final, total=final, description=escape(name))
        key = name.split(":")[0]
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def info(self, message: str) -> None:
        """A one-line note on stderr (rich markup allowed; escape user text)."""
        if self.enabled:
            self.console.print(message)

    def note(self, message: str) -> None:
        """A one-line note on stderr, printed literally (a warning from a stage)."""
        if self.enabled:
            self.console.print(f"[yellow]{escape(message)}[/yellow]", highlight=False)
