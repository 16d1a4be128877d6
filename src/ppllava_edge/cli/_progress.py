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
    """Prints `stage ... done in X s` lines. While a stage runs: a spinner, or - once the stage reports its amount
    of work through `progress(done, total)` - a progress bar with the time remaining (stderr is a terminal); in a
    log (not a terminal) a line at every 10 % step."""

    def __init__(self, title: str):
        self.title = title
        self.start = time.perf_counter()
        self.current: str | None = None
        self.t0 = self.start
        self.status = None
        self.bar = None
        self._task = None
        self._logged = -1
        self._first: tuple[float, float] | None = None
        self.done: list[tuple[str, float]] = []

    def __call__(self, stage: str) -> None:
        self._finish()
        self.current, self.t0 = stage, time.perf_counter()
        self._logged, self._first = -1, None
        if sys.stderr.isatty():
            self.status = err_console.status(f"{self.title}: {stage} ...")
            self.status.start()
        else:
            err_console.print(f"{self.title}: {stage} ...")

    def progress(self, done: float, total: float) -> None:
        """`done` of `total` units of the current stage are finished."""
        if total <= 0:
            return
        if not sys.stderr.isatty():
            now = time.perf_counter()
            if self._first is None:  # the rate is measured from the first report (set-up before it is not work)
                self._first = (now, done)
            tenth = int(10 * done / total)
            # a line per 10 % once the stage has run a few seconds, and always the last one
            if tenth > self._logged and (now - self.t0 >= 3.0 or done >= total):
                self._logged = tenth
                since, worked = now - self._first[0], done - self._first[1]
                left = f", ~{since * (total - done) / worked:.0f} s left" if worked > 0 else ""
                err_console.print(f"  {self.current}: {100 * done / total:.0f} % ({now - self.t0:.0f} s{left})")
            return
        if self.bar is None:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            if self.status is not None:
                self.status.stop()
                self.status = None
            self.bar = Progress(TextColumn(f"{self.title}: {self.current}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                                TimeRemainingColumn(), console=err_console, transient=True)
            self.bar.start()
            self._task = self.bar.add_task(self.current or "", total=total)
        self.bar.update(self._task, completed=done, total=total)

    def _finish(self, failed: bool = False) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.current is not None:
            dt = time.perf_counter() - self.t0
            if failed:  # the error line that follows says why
                err_console.print(f"  {self.current} stopped after {dt:.1f} s")
            else:
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
    except BaseException:
        log._finish(failed=True)
        raise
    finally:
        log.close()


def table(title: str, header: list[str], rows: list[list[str]], right: set[int] | None = None) -> Table:
    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="right" if right and i in right else "left")
    for r in rows:
        t.add_row(*r)
    return t
