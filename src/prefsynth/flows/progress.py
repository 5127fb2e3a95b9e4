"""Progress of long stages: the flow reports, the CLI draws bars, Prefect's log gets the same counts."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Protocol


class ProgressView(Protocol):
    def start(self, stage: str, total: int) -> None: ...
    def advance(self, stage: str, n: int = 1) -> None: ...


class _Nothing:
    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, n: int = 1) -> None:
        pass


_view: ProgressView = _Nothing()


@contextlib.contextmanager
def showing(view: ProgressView) -> Iterator[None]:
    """Send this process's stage progress to `view` (the CLI's progress bars) while inside."""
    global _view
    previous, _view = _view, view
    try:
        yield
    finally:
        _view = previous


class StageProgress:
    """Counts for one stage; `line()` is what the flow logs after each chunk."""

    def __init__(self, stage: str, total: int) -> None:
        self.stage, self.total, self.done = stage, total, 0
        self.started = time.monotonic()
        _view.start(stage, total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        _view.advance(self.stage, n)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 else "unknown (nothing done yet)"
        return f"{self.stage}: {self.done}/{self.total} done, {rate:.2f}/s, ETA {eta}"
