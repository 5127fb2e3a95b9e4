"""Generate: N sampled responses per prompt from a policy model, each one a content-addressed row."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from prefsynth.backends.client import Cache, ClientPool, Endpoint, ModelClient
from prefsynth.schemas.config import SamplingParams
from prefsynth.schemas.records import Failure, Prompt, Response, StageResult, merge_results
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


async def generate_one(client: ModelClient, item: GenerationItem, sampling: SamplingParams) -> StageResult:
    """One sample: its response (or failure) and the call it took, unless the cache answered."""
    endpoint = client.endpoint
    body = client.request_body([m.model_dump() for m in item.prompt.messages], temperature=sampling.temperature,
                               top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                               seed=sampling.seed + item.sample_index)  # sample i uses seed + i
    outcome = await client.chat(body)
    result = StageResult(*([] if outcome.cached else [outcome.call]))
    call = outcome.call
    if outcome.ok:
        result.add(
            Response(
                response_id=item.response_id, prompt_id=item.prompt.prompt_id, model=endpoint.label,
                model_identity=endpoint.identity, sampling=canonical_json(sampling.model_dump()),
                sample_index=item.sample_index, seed=body["seed"], text=outcome.text or "",
                finish_reason=outcome.finish_reason, prompt_tokens=call.prompt_tokens,
                completion_tokens=call.completion_tokens, latency_ms=call.latency_ms, call_id=call.call_id,
            )
        )  # fmt: skip
    else:
        result.add(Failure(stage="generate", item_id=item.response_id, scorer_id=None,
                                       error=call.error or "unknown error", raw=None))  # fmt: skip
    return result


async def generate_items(
    endpoint: Endpoint, items: Sequence[GenerationItem], sampling: SamplingParams, cache: Cache | None = None
) -> StageResult:
    """A batch of samples from one endpoint, up to its concurrency at once (the pipeline streams instead)."""
    async with ClientPool([endpoint], cache) as pool:
        client = pool.client(endpoint)
        parts = await asyncio.gather(*(generate_one(client, item, sampling) for item in items))
    return merge_results(parts)
