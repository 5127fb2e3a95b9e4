"""The streaming engine's two parts: a bounded runner that starts a new job the moment one finishes, and a
writer that commits results in batches bounded by rows and seconds while requests are still in flight.

Nothing here waits in lock-step: a slow or retrying request holds one slot of its server's limiter (see
`backends.client.ClientPool`), never a batch. The writer runs in its own thread, so DuckDB never blocks
the event loop; a crash loses only the results of the last `max_seconds` (and the calls in flight).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from prefsynth.backends import budget
from prefsynth.flows.progress import StageProgress
from prefsynth.schemas.records import (
    Comparison,
    Failure,
    ModelCall,
    Response,
    Score,
    StageCounts,
    StageResult,
    merge_results,
)

ROWS_PER_COMMIT = 256
SECONDS_PER_COMMIT = 2.0


class Writer:
    """Commits added results from one thread: every `max_rows` rows or `max_seconds`, whichever comes first.

    `commit(batch)` does the write (the flow passes a Prefect task, so each batch is a task run). A failed
    commit stops the writer; the next `add` or `close` raises its error in the caller.
    """

    def __init__(
        self,
        commit: Callable[[StageResult], Any],
        max_rows: int = ROWS_PER_COMMIT,
        max_seconds: float = SECONDS_PER_COMMIT,
    ) -> None:
        self._commit, self.max_rows, self.max_seconds = commit, max_rows, max_seconds
        self._batch: list[StageResult] = []
        self._rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self.commits = 0
        self._context = contextvars.copy_context()  # the flow run's context: commits are its task runs
        self._thread = threading.Thread(target=self._loop, name="prefsynth-writer", daemon=True)
        self._thread.start()

    def attach(self, commit: Callable[[StageResult], Any]) -> None:
        """Commit through `commit`, in the caller's context, from the next batch on (a flow run adopting a run
        that started before it: flows/headstart.py)."""
        with self._cond:
            self._commit, self._context = commit, contextvars.copy_context()

    @property
    def pending(self) -> int:
        """Rows added but not committed yet."""
        return self._rows

    def add(self, result: StageResult) -> None:
        n = len(result)
        with self._cond:
            if self._error is not None:
                raise RuntimeError(f"warehouse write failed: {self._error}") from self._error
            if n:
                self._batch.append(result)
                self._rows += n
                if self._rows >= self.max_rows:
                    self._cond.notify()

    def close(self) -> None:
        """Commit what is left and stop; raises the writer's error, if any."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"warehouse write failed: {self._error}") from self._error

    def _loop(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self.max_seconds
                while not self._closed and self._rows < self.max_rows and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                batch, self._batch, self._rows = self._batch, [], 0
                closing, commit, context = self._closed, self._commit, self._context
            if batch:
                try:
                    context.run(commit, merge_results(batch))
                    self.commits += 1
                except BaseException as err:  # reported to the event loop's next add() or close()
                    with self._cond:
                        self._error = err
                    return
            if closing:
                return


class Stage:
    """One stage's counts and progress; `record` hands its results to the writer."""

    def __init__(self, name: str, total: int, writer: Writer) -> None:
        self.counts = StageCounts(stage=name, total=total)
        self.progress = StageProgress(name, total)
        self._writer = writer

    def reuse(self, n: int) -> None:
        self.counts.reused += n
        if n:
            self.progress.advance(n)

    def record(self, result: StageResult, written: StageResult | None = None) -> None:
        """Count `result` and commit it (or `written`, what of it belongs in the warehouse); its calls are
        marked with this stage (their costs are shown per stage)."""
        calls = result.of(ModelCall)
        for call in [*calls, *(written.of(ModelCall) if written is not None else [])]:
            call.stage = call.stage or self.counts.stage
        self._writer.add(result if written is None else written)
        c = self.counts
        c.new += len(result.of(Response)) + len(result.of(Score)) + len(result.of(Comparison))
        c.failed += len(result.of(Failure))
        c.model_calls += len(calls)
        c.tokens += sum((x.prompt_tokens or 0) + (x.completion_tokens or 0) for x in calls)
        self.progress.advance(1)


async def run_bounded(jobs: AsyncIterator[Coroutine[Any, Any, None]], window: int) -> None:
    """Run the jobs with at most `window` at once, starting the next the moment any finishes.

    A job that raises (a bug, not a failed model call: those are results) cancels the rest and re-raises.
    Once the run's budget is spent, no new job starts; those running finish (their unsent calls are refused).
    """
    spent = budget.active()
    slots = asyncio.Semaphore(window)
    running: set[asyncio.Task[None]] = set()
    failed: list[BaseException] = []

    def finished(task: asyncio.Task[None]) -> None:
        running.discard(task)
        slots.release()
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())  # type: ignore[arg-type]

    try:
        async for job in jobs:
            try:
                await slots.acquire()
            except BaseException:  # cancelled while waiting for a slot: this job never starts
                job.close()
                raise
            if failed or (spent is not None and spent.refusal() is not None):
                job.close()
                break
            task = asyncio.create_task(job)
            running.add(task)
            task.add_done_callback(finished)
        while running and not failed:
            await asyncio.wait(set(running), return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in list(running):
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    if failed:
        raise failed[0]


async def report_progress(stages: list[Stage], log: Callable[[str], None], every_s: float = 10.0) -> None:
    """Log every stage's line every `every_s` seconds until cancelled (Prefect's log shows the run moving)."""
    while True:
        await asyncio.sleep(every_s)
        for stage in stages:
            if stage.progress.done < stage.progress.total:
                log(stage.progress.line())
