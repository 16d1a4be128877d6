"""Progress and table rendering on stderr (stdout carries results only)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

err_console = Console(stderr=True, highlight=False, markup=False, width=None if sys.stderr.isatty() else 160)
out_console = Console(highlight=False, soft_wrap=True)


class StageLog:
    """Prints `[i] stage ... done in X s` lines; a spinner while a stage runs when stderr is a terminal."""

    def __init__(self, title: str):
        self.title = title
        self.start = time.perf_counter()
        self.current: str | None = None
        self.t0 = self.start
        self.status = None
        self.done: list[tuple[str, float]] = []

    def __call__(self, stage: str) -> None:
        self._finish()
        self.current, self.t0 = stage, time.perf_counter()
        if sys.stderr.isatty():
            self.status = err_console.status(f"{self.title}: {stage} ...")
            self.status.start()
        else:
            err_console.print(f"{self.title}: {stage} ...")

    def _finish(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
        if self.current is not None:
            dt = time.perf_counter() - self.t0
            self.done.append((self.current, dt))
            err_console.print(f"  done {self.current} in {dt:.1f} s")
            self.current = None

    def close(self) -> float:
        self._finish()
        return time.perf_counter() - self.start


@contextmanager
def stages(title: str):
    log = StageLog(title)
    try:
        yield log
    finally:
        if log.status is not None:
            log.status.stop()
        log.close()


def table(title: str, header: list[str], rows: list[list[str]], right: set[int] | None = None) -> Table:
    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="right" if right and i in right else "left")
    for r in rows:
        t.add_row(*r)
    return t
