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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class ProgressBar:
    """A `progress(done, total)` callback: a rich bar with ETA on a terminal, else one line per 10 % with the ETA.

    `nbytes=True` shows sizes and speed (done/total are byte counts). Use as a context manager (closes the bar).
    """

    def __init__(self, label: str, nbytes: bool = False):
        self.label, self.nbytes = label, nbytes
        self.first: tuple[float, int] | None = None  # (time, done) at the first call: the rate ignores start-up
        self.bar = None
        self.task = None
        self.last_decile = -1

    def _amount(self, n: float) -> str:
        return f"{n / 1e9:.2f} GB" if self.nbytes and n >= 1e9 else f"{n / 1e6:.1f} MB" if self.nbytes else str(int(n))

    def __call__(self, done: int, total: int) -> None:
        if sys.stderr.isatty():
            if self.bar is None:
                from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn

                amount = [DownloadColumn(binary_units=False), TransferSpeedColumn()] if self.nbytes else [MofNCompleteColumn()]
                self.bar = Progress(TextColumn(self.label), BarColumn(), *amount, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                    console=err_console, transient=False)
                self.bar.start()
                self.task = self.bar.add_task(self.label, total=total)
            self.bar.update(self.task, completed=done, total=total)
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, done)
        decile = 10 * done // max(total, 1)
        if decile == self.last_decile:
            return
        self.last_decile = decile
        elapsed, since = now - self.first[0], done - self.first[1]
        eta = f", ETA {_duration(elapsed * (total - done) / since)}" if since > 0 and done < total else ""
        err_console.print(f"{self.label}: {100 * done // max(total, 1)}% ({self._amount(done)} of {self._amount(total)}), {_duration(elapsed)} elapsed{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def table(title: str, header: list[str], rows: list[list[str]], right: set[int] | None = None) -> Table:
    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="right" if right and i in right else "left")
    for r in rows:
        t.add_row(*r)
    return t
