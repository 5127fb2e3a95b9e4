"""A run's commits as Prefect task runs of its flow run (the writer itself is in engine.py, free of Prefect so
that a run can start streaming before Prefect is imported: headstart.py), and scoring a list of items as
the pipeline scores them (`prefsynth eval`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from prefsynth.backends.client import ClientPool
from prefsynth.flows.engine import Stage, Writer, run_bounded
from prefsynth.schemas.records import Score, StageResult, merge_results
from prefsynth.tasks._async import run_async
from prefsynth.tasks.score import score_one
from prefsynth.tasks.scorers import Scorer
from prefsynth.warehouse.store import Store


@task(name="commit", cache_policy=NO_CACHE)
def commit(store: Store, run_id: str, batch: StageResult) -> dict[str, int]:
    """Prefect task: one batch of finished results into the warehouse, in one transaction."""
    return store.write(run_id, batch)


def committer(store: Store, run_id: str) -> Callable[[StageResult], Any]:
    """Commits as Prefect task runs of the current flow run."""
    # quoted: Prefect would otherwise walk every record of the batch looking for futures to resolve
    return lambda batch: commit(quote(store), run_id, quote(batch))


def writer_for(store: Store, run_id: str) -> Writer:
    """A writer whose commits are Prefect task runs of this flow run."""
    return Writer(committer(store, run_id))


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
