"""Score: run a scorer over a chunk of items (responses, or pairs of them), calls made concurrently up to each
endpoint's limit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl

from prefsynth.backends.client import Cache, ClientPool
from prefsynth.schemas.records import Message, StageResult, merge_results
from prefsynth.tasks.scorers import ScoreItem, Scorer
from prefsynth.tasks.scorers.base import Clients
from prefsynth.warehouse.ids import score_id


def plan_scores(responses: pl.DataFrame, scorer_id: str) -> list[ScoreItem]:
    """responses: response_id, prompt_id, messages (JSON), text -> one item per response."""
    messages = {pid: [Message(**m) for m in json.loads(raw)]
                for pid, raw in zip(responses["prompt_id"], responses["messages"], strict=True)}  # fmt: skip
    return [
        ScoreItem(score_id(rid, scorer_id), rid, pid, messages[pid], text)
        for rid, pid, text in zip(responses["response_id"], responses["prompt_id"], responses["text"], strict=True)
    ]


async def score_one(scorer: Scorer, clients: Clients, item: Any) -> StageResult:
    """One item (a response, or a pair of them) through one scorer: prepare, then score."""
    routes = await scorer.prepare(clients, [item])
    result = (await scorer.score(clients, item)).result()
    result.add(*routes)
    return result


async def score_items(
    scorer: Scorer,
    items: Sequence[Any],
    cache: Cache | None = None,
    on_done: Callable[[int], None] | None = None,
) -> StageResult:
    """A batch of items: `prepare` once over all of them (routing, in-process batches), then each item,
    grouped and windowed as the scorer's `schedule` says (the pipeline streams instead)."""
    async with ClientPool(scorer.endpoints.values(), cache) as pool:
        clients = pool.clients(scorer.endpoints)
        routes = await scorer.prepare(clients, items)
        groups, window = scorer.schedule(items)
        in_flight = asyncio.Semaphore(window)

        async def one(item: Any) -> StageResult:
            result = (await scorer.score(clients, item)).result()
            if on_done:
                on_done(1)
            return result

        async def group(members: list[Any]) -> list[StageResult]:
            async with in_flight:
                return list(await asyncio.gather(*(one(item) for item in members)))

        parts = await asyncio.gather(*(group(g) for g in groups))
    return merge_results([StageResult(*routes), *(r for g in parts for r in g)])
