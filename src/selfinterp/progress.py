"""Progress bars that also work in log files.

On a terminal, a rich live bar (count, elapsed, ETA). When the output is not a terminal (nohup,
CI, a batch job) rich draws nothing until the end, so there the same calls print a plain line
at most every ``every`` seconds, and when a task finishes: long runs stay observable from their logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def bar(title: str = "{task.description}", console: Any = None, every: float = 30.0, disable: bool = False,
        info: bool = False):
    """A progress display with ``add_task / update / advance / remove_task`` and ``start / stop``
    (or ``with``). ``title`` is a rich format string; ``info=True`` adds a free text field per task."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = console or Console(stderr=True)
    if disable or console.is_terminal:
        columns = [TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn()]
        if info:
            columns.append(TextColumn("{task.fields[info]}"))
        return Progress(*columns, console=console, disable=disable)
    return LogProgress(title, console, every)


@dataclass
class _Task:
    description: str
    total: float
    completed: float
    fields: dict[str, Any]
    start: float = field(default_factory=time.time)
    last_print: float = 0.0


class LogProgress:
    """The subset of ``rich.progress.Progress`` used here, printing lines instead of redrawing."""

    def __init__(self, title: str, console: Any, every: float):
        self.title, self.console, self.every = title, console, every
        self.tasks: dict[int, _Task] = {}
        self._next = 0

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Nothing to start (rich's interface): lines are printed as the tasks move."""
        pass

    def stop(self) -> None:
        """Remove every task, with a last line for each that did not finish."""
        for tid in list(self.tasks):
            self.remove_task(tid)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        """The id of a new task with this description, total and fields."""
        tid, self._next = self._next, self._next + 1
        self.tasks[tid] = _Task(description, total or 0, completed, fields, last_print=time.time())
        return tid

    def update(self, tid: int, advance: float = 0, completed: float | None = None, **fields: Any) -> None:
        """Move a task on or set it; a line at most every ``every`` seconds, and one when it is complete."""
        t = self.tasks[tid]
        t.completed = completed if completed is not None else t.completed + advance
        t.fields.update(fields)
        now = time.time()
        if now - t.last_print >= self.every or (t.total and t.completed >= t.total):
            self._print(t, now)

    def advance(self, tid: int, advance: float = 1) -> None:
        """Move a task on by ``advance``."""
        self.update(tid, advance=advance)

    def remove_task(self, tid: int) -> None:
        """Remove a task, with a line saying where it stopped if it did not finish."""
        t = self.tasks.pop(tid)
        if t.completed < (t.total or 0):  # stopped early: say where
            self._print(t, time.time())

    def _print(self, t: _Task, now: float) -> None:
        t.last_print = now
        elapsed = now - t.start
        title = self.title.replace("{task.description}", t.description)
        line = f"{title} {t.completed:g}/{t.total:g}, {_clock(elapsed)} elapsed"
        if t.total and 0 < t.completed < t.total:
            line += f", eta {_clock(elapsed * (t.total - t.completed) / t.completed)}"
        if t.fields.get("info"):
            line += f", {t.fields['info']}"
        self.console.print(line.rstrip(), highlight=False, markup=False)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
