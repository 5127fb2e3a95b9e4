"""Score: run a scorer over a chunk of responses, calls made concurrently up to the endpoint's limit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from prefsynth.backends.client import CacheLookup, ModelClient
from prefsynth.schemas.records import StageResult
from prefsynth.tasks._async import run_async
from prefsynth.tasks.scorers import PointwiseScorer, ScoreItem


async def score_items(
    scorer: PointwiseScorer,
    items: Sequence[ScoreItem],
    cache: CacheLookup | None = None,
    on_done: Callable[[int], None] | None = None,
) -> StageResult:
    result = StageResult()
    async with ModelClient(scorer.endpoint, cache) as client:
        known = client.cached([scorer.first_request(client, item) for item in items])

        async def one(item: ScoreItem) -> None:
            outcome = await scorer.score(client, item, known)
            result.calls.extend(outcome.calls)
            if outcome.score is not None:
                result.scores.append(outcome.score)
            if outcome.failure is not None:
                result.failures.append(outcome.failure)
            if on_done:
                on_done(1)

        await asyncio.gather(*(one(item) for item in items))
    return result


@task(name="score", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def score_chunk(
    scorer: PointwiseScorer,
    items: list[ScoreItem],
    cache: CacheLookup | None = None,
    on_done: Callable[[int], None] | None = None,
) -> StageResult:
    """Prefect task: one chunk of one scorer's items."""
    return run_async(score_items(scorer, items, cache, on_done))
