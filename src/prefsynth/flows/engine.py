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

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from prefsynth.backends import budget
from prefsynth.backends.client import ClientPool
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
from prefsynth.tasks._async import run_async
from prefsynth.tasks.score import score_one
from prefsynth.tasks.scorers import Scorer
from prefsynth.warehouse.store import Store

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
        context = contextvars.copy_context()  # the flow run's context: commits are its task runs
        self._thread = threading.Thread(target=context.run, args=(self._loop,), name="prefsynth-writer", daemon=True)
        self._thread.start()

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
                closing = self._closed
            if batch:
                try:
                    self._commit(merge_results(batch))
                    self.commits += 1
                except BaseException as err:  # reported to the event loop's next add() or close()
                    with self._cond:
                        self._error = err
                    return
            if closing:
                return


@task(name="commit", cache_policy=NO_CACHE)
def commit(store: Store, run_id: str, batch: StageResult) -> dict[str, int]:
    """Prefect task: one batch of finished results into the warehouse, in one transaction."""
    return store.write(run_id, batch)


def writer_for(store: Store, run_id: str) -> Writer:
    """A writer whose commits are Prefect task runs of this flow run."""
    # quoted: Prefect would otherwise walk every record of the batch looking for futures to resolve
    return Writer(lambda batch: commit(quote(store), run_id, quote(batch)))


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
            await slots.acquire()
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


def score_stream(name: str, scorer: Scorer, items: list[Any], store: Store, run_id: str, keep_scores: bool = True
                 ) -> StageResult:  # fmt: skip
    """Score items as the pipeline does (each starts the moment its server has a free slot, results are
    committed as they finish) and return all results. `keep_scores=False` writes everything but the scores."""
    results: list[StageResult] = []
    writer = writer_for(store, run_id)
    stage = Stage(name, len(items), writer)

    async def one(pool: ClientPool, item: Any) -> None:
        result = await score_one(scorer, pool.clients(scorer.endpoints), item)
        results.append(result)
        stage.record(result, None if keep_scores else result.without(Score))

    async def jobs(pool: ClientPool) -> AsyncIterator[Coroutine[Any, Any, None]]:
        for item in items:
            yield one(pool, item)

    async def run() -> None:
        async with ClientPool(scorer.endpoints.values(), store) as pool:
            slots = sum({e.base_url: e.concurrency for e in scorer.endpoints.values()}.values())
            await run_bounded(jobs(pool), 2 * slots + 2)

    try:
        run_async(run())
    finally:
        writer.close()
    return merge_results(results)
