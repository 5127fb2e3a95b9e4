"""Generate: N sampled responses per prompt from a policy model, each one a content-addressed row."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from prefsynth.backends.client import Cache, Endpoint, ModelClient
from prefsynth.schemas.config import SamplingParams
from prefsynth.schemas.records import Failure, Prompt, Response, StageResult
from prefsynth.tasks._async import run_async
from prefsynth.warehouse.ids import canonical_json, response_id


@dataclass(frozen=True)
class GenerationItem:
    response_id: str
    prompt: Prompt
    sample_index: int


def plan_generation(
    prompts: Sequence[Prompt], endpoint: Endpoint, sampling: SamplingParams, samples: int
) -> list[GenerationItem]:
    """Every (prompt, sample) this model must answer, with the id its response will have."""
    params = sampling.model_dump()
    return [
        GenerationItem(response_id(p.prompt_id, endpoint.identity, params, i), p, i)
        for p in prompts
        for i in range(samples)
    ]


async def generate_items(
    endpoint: Endpoint,
    items: Sequence[GenerationItem],
    sampling: SamplingParams,
    cache: Cache | None = None,
    on_done: Callable[[int], None] | None = None,
) -> StageResult:
    result = StageResult()
    sampling_json = canonical_json(sampling.model_dump())
    async with ModelClient(endpoint, cache) as client:
        bodies = [
            client.request_body(
                [m.model_dump() for m in item.prompt.messages],
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed + item.sample_index,
            )
            for item in items
        ]
        client.prefetch("chat", bodies)

        async def one(item: GenerationItem, body: dict) -> None:
            outcome = await client.chat(body)
            if not outcome.cached:
                result.calls.append(outcome.call)
            if outcome.ok:
                call = outcome.call
                result.responses.append(
                    Response(
                        response_id=item.response_id,
                        prompt_id=item.prompt.prompt_id,
                        model=endpoint.label,
                        model_identity=endpoint.identity,
                        sampling=sampling_json,
                        sample_index=item.sample_index,
                        seed=body["seed"],
                        text=outcome.text or "",
                        finish_reason=outcome.finish_reason,
                        prompt_tokens=call.prompt_tokens,
                        completion_tokens=call.completion_tokens,
                        latency_ms=call.latency_ms,
                        call_id=call.call_id,
                    )
                )
            else:
                result.failures.append(
                    Failure(stage="generate", item_id=item.response_id, scorer_id=None,
                            error=outcome.call.error or "unknown error", raw=None)
                )  # fmt: skip
            if on_done:
                on_done(1)

        await asyncio.gather(*(one(item, body) for item, body in zip(items, bodies, strict=True)))
    return result


@task(name="generate", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def generate_chunk(
    endpoint: Endpoint,
    items: list[GenerationItem],
    sampling: SamplingParams,
    cache: Cache | None = None,
    on_done: Callable[[int], None] | None = None,
) -> StageResult:
    """Prefect task: one chunk of generations, calls made concurrently up to the endpoint's limit."""
    return run_async(generate_items(endpoint, items, sampling, cache, on_done))
