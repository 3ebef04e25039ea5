"""rich progress bars with ETA for the long loops, on stderr; when stderr is not a terminal (a log
file, CI), one plain line per LOG_EVERY_S seconds instead, so a long run's log still shows where it is."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

CONSOLE = Console(stderr=True)
LOG_EVERY_S = 60.0


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, note="")``; shows done/total, elapsed time and ETA."""
    if not CONSOLE.is_terminal:
        yield _plain_progress(description, total)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, console=CONSOLE) as bar:
        task = bar.add_task(description, total=total, note="")

        def advance(n: int = 1, note: str = "") -> None:
            bar.update(task, advance=n, note=note)

        yield advance


def _plain_progress(description: str, total: int) -> Callable[..., None]:
    """advance() that logs "description done/total, elapsed, ETA, note" at most every LOG_EVERY_S."""
    start = last = time.monotonic()
    done = 0

    def advance(n: int = 1, note: str = "") -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= LOG_EVERY_S or (done >= total and last > start):
            last = now
            eta = (now - start) / done * (total - done)
            log(f"{description} {done}/{total}, {_clock(now - start)} elapsed, ETA {_clock(eta)}"
                + (f", {note}" if note else ""))

    return advance


def log(message: str) -> None:
    """One status line on stderr (stdout stays clean for --json)."""
    CONSOLE.print(message, highlight=False, soft_wrap=True)
