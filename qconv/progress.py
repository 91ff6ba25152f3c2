"""Progress display: rich bars on a terminal, plain lines in logs, nothing with --quiet. All on stderr, so
stdout stays clean for --json."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal and not quiet
        self._progress: Progress | None = None
        self._t0 = time.perf_counter()

    def log(self, msg: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(msg, highlight=False)
        else:
            self.console.print(msg, highlight=False)

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = ""):
        """A progress bar (terminal) or start/finish lines (log); yields advance(n=1, detail="")."""
        if self.quiet:
            yield lambda n=1, detail="": None
            return
        if not self.live:
            t0 = time.perf_counter()
            self.console.print(f"{description} …", highlight=False)
            state = {"done": 0, "last": t0}

            def advance(n: int = 1, detail: str = "") -> None:
                state["done"] += n
                now = time.perf_counter()
                if now - state["last"] > 30:  # a heartbeat in long runs, not a line per step
                    self.console.print(f"  {description}: {state['done']}/{total} {detail}", highlight=False)
                    state["last"] = now

            yield advance
            self.console.print(f"{description}: done in {time.perf_counter() - t0:.1f} s", highlight=False)
            return
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress = progress
        with progress:
            tid = progress.add_task(description, total=total, detail="")

            def advance(n: int = 1, detail: str = "") -> None:
                progress.update(tid, advance=n, detail=detail)

            yield advance
        self._progress = None

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0


def is_tty() -> bool:
    return sys.stderr.isatty()
