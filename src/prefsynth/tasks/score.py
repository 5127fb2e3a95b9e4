"""Score: run a scorer over a chunk of items (responses, or pairs of them), calls made concurrently up to each
endpoint's limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from prefsynth.backends.client import Cache, ModelClient
from prefsynth.schemas.records import Message, StageResult
from prefsynth.tasks._async import run_async
from prefsynth.tasks.scorers import ScoreItem, Scorer
from prefsynth.warehouse.ids import score_id


def plan_scores(responses: pl.DataFrame, scorer_id: str) -> list[ScoreItem]:
    """responses: response_id, prompt_id, messages (JSON), text -> one item per response."""
    messages = {pid: [Message(**m) for m in json.loads(raw)]
                for pid, raw in zip(responses["prompt_id"], responses["messages"], strict=True)}  # fmt: skip
    return [
        ScoreItem(score_id(rid, scorer_id), rid, pid, messages[pid], text)
        for rid, pid, text in zip(responses["response_id"], responses["prompt_id"], responses["text"], strict=True)
    ]


async def score_items(
    scorer: Scorer,
    items: Sequence[Any],
    cache: Cache | None = None,
    on_done: Callable[[int], None] | None = None,
) -> StageResult:
    result = StageResult()
    async with contextlib.AsyncExitStack() as stack:
        by_url: dict[str, ModelClient] = {}  # roles served by one endpoint share its client and limit
        for ep in scorer.endpoints.values():
            if ep.base_url not in by_url:
                by_url[ep.base_url] = await stack.enter_async_context(ModelClient(ep, cache))
        clients = {role: by_url[ep.base_url] for role, ep in scorer.endpoints.items()}
        result.routes.extend(await scorer.prepare(clients, items, cache))

        async def one(item: Any) -> None:
            outcome = await scorer.score(clients, item)
            result.calls.extend(outcome.calls)
            result.logprobs.extend(outcome.logprobs)
            if outcome.score is not None:
                result.scores.append(outcome.score)
            if outcome.failure is not None:
                result.failures.append(outcome.failure)
            result.judgments.extend(outcome.judgments)
            if outcome.comparison is not None:
                result.comparisons.append(outcome.comparison)
            if on_done:
                on_done(1)

        groups, window = scorer.schedule(items)
        in_flight = asyncio.Semaphore(window)

        async def group(members: list[Any]) -> None:
            async with in_flight:
                await asyncio.gather(*(one(item) for item in members))

        await asyncio.gather(*(group(g) for g in groups))
    return result


@task(name="score", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def score_chunk(
    scorer: Scorer,
    items: list[Any],
    cache: Cache | None = None,
    on_done: Callable[[int], None] | None = None,
) -> StageResult:
    """Prefect task: one chunk of one scorer's items."""
    return run_async(score_items(scorer, items, cache, on_done))
