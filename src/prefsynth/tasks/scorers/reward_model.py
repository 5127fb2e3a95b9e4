"""Reward model: one scalar per (prompt, response), the conversation being the prompt's turns followed by
the response as the assistant turn.

- Over HTTP (`model`): vLLM's pooling APIs through `ModelClient.reward` (cached, deduplicated, in the
  ledger as kind "reward"). `api: pooling` gives the model's raw output: value[label_index] of the
  sequence, or of the last token for a token-wise (per-token) output; `api: classify` gives the class
  probability probs[label_index]. The paths are at the server root (`.../v1` is dropped from base_url);
  see backends/quirks.py for the shapes.
- In process (`path`): a transformers sequence classifier on the CPU (backends/hf_reward.py), reward =
  logits[label_index]. It has no endpoints and records no model calls; `prepare` computes a chunk's
  rewards, batch_size at a time, off the event loop, and `score` hands them out. With `runner: ray` the
  flow sets `offload`: the conversations then go, in batches, to the `reward_batch` task on Ray workers
  (flows/runner.py), which take the spec and the conversations (plain data) and return the rewards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from prefsynth.backends import quirks
from prefsynth.backends.client import Endpoint
from prefsynth.backends.hf_reward import HFRewardModel, RewardResult, render_id
from prefsynth.schemas.config import ModelSpec, ScorerSpec
from prefsynth.schemas.records import Route, Score
from prefsynth.tasks.scorers.base import Clients, PointwiseScorer, ScoreItem, ScoreOutcome
from prefsynth.tasks.scorers.judging import placeholder_turns
from prefsynth.warehouse.ids import canonical_json, template_id


class RewardModelSpec(ScorerSpec):
    """A reward model: one scalar per (prompt, response), from an HTTP server or loaded in-process.

    `model` is an endpoint that scores (vLLM's pooling API: `api: pooling` for reward models, `classify`
    for sequence classifiers); `path` is a local Hugging Face folder loaded with transformers (extra
    `prefsynth[transformers]`). Nothing is downloaded.
    """

    kind: Literal["reward_model"] = "reward_model"
    name: str = "reward"
    model: ModelSpec | None = Field(None, description="HTTP endpoint serving the reward model (base_url + model).")
    api: Literal["pooling", "classify"] = Field("pooling", description="Which vLLM scoring API the endpoint has.")
    path: str | None = Field(None, description="Local folder of a transformers sequence-classification model.")
    label_index: int = Field(0, ge=0, description="Output used as the reward when the model has several labels.")
    max_length: int = Field(2048, ge=16, description="In-process: truncate inputs to this many tokens.")
    batch_size: int = Field(8, ge=1, le=1024, description="In-process: responses per forward pass.")

    def roles(self) -> dict[str, ModelSpec]:
        return {"reward": self.model} if self.model else {}

    @model_validator(mode="after")
    def _one_source(self) -> RewardModelSpec:
        if (self.model is None) == (self.path is None):
            raise ValueError("give exactly one of `model` (an HTTP endpoint) or `path` (a local model folder)")
        if self.model is not None and self.model.is_local:
            raise ValueError("a reward-model endpoint needs `base_url` + `model`; GGUF files are not reward models")
        return self


Conversation = list[dict[str, str]]


def conversation(item: ScoreItem) -> Conversation:
    return [*(m.model_dump() for m in item.messages), {"role": "assistant", "content": item.response}]


class RewardModelScorer(PointwiseScorer):
    Spec = RewardModelSpec

    def __init__(self, spec: RewardModelSpec, endpoints: dict[str, Endpoint]) -> None:
        """`endpoints["reward"]` serves spec.model; without it, spec.path is loaded in process (ConfigError if
        unusable)."""
        super().__init__(spec, endpoints)
        self.spec = spec
        self.local = HFRewardModel(str(spec.path), spec.max_length) if "reward" not in endpoints else None
        self._ready: dict[str, RewardResult] = {}  # in process: score_id -> reward computed by prepare
        # set by the flow to compute rewards elsewhere (Ray workers); default: a thread of this process
        self.offload: Callable[[list[Conversation]], Awaitable[list[RewardResult]]] | None = None

    def identity(self) -> dict[str, Any]:
        if self.local is None:  # the request for a placeholder item: its shape and every text it adds
            request = template_id(self._body(ScoreItem("", "", "", placeholder_turns(), "<response>")))
            return {"backend": "http", "api": self.spec.api, "label_index": self.spec.label_index, "request": request}
        return {"backend": "transformers", "model": self.local.identity, "label_index": self.spec.label_index,
                "max_length": self.spec.max_length, "render": render_id()}  # fmt: skip

    def _body(self, item: ScoreItem) -> dict[str, Any]:
        return quirks.reward_request(self.spec.api, conversation(item))

    async def prepare(self, clients: Clients, items: Sequence[ScoreItem]) -> list[Route]:
        if self.local is None:
            return []
        todo = [item for item in items if item.score_id not in self._ready]
        if todo:
            conversations = [conversation(item) for item in todo]
            if self.offload is not None:
                try:
                    results = await self.offload(conversations)
                except Exception as err:  # a batch lost on the way (Ray retries dead workers): its items fail, the
                    error = f"offloaded batch failed: {type(err).__name__}: {err}"  # run goes on, a rerun retries
                    results = [RewardResult(error=error) for _ in conversations]
            else:
                results = await asyncio.to_thread(
                    self.local.rewards, conversations, self.spec.label_index, self.spec.batch_size
                )
            self._ready.update(zip((item.score_id for item in todo), results, strict=True))
        return []

    async def score(self, clients: Clients, item: ScoreItem) -> ScoreOutcome:
        out = ScoreOutcome()
        if self.local is not None:
            if item.score_id not in self._ready:
                await self.prepare(clients, [item])
            result = self._ready.pop(item.score_id)
            if result.value is None:
                return self.failed(out, item, f"reward model: {result.error}", None)
            return self._scored(out, item, result.value, [], canonical_json(result.details))
        outcome = await clients["reward"].reward(self._body(item), self.spec.label_index)
        out.keep(outcome)
        if outcome.value is None:
            error = outcome.error or f"reward call failed: {outcome.call.error}"
            return self.failed(out, item, error, outcome.call.response)
        return self._scored(out, item, outcome.value, [outcome.call.call_id], None)

    def _scored(
        self, out: ScoreOutcome, item: ScoreItem, value: float, call_ids: list[str], details: str | None
    ) -> ScoreOutcome:
        out.score = Score(
            score_id=item.score_id,
            response_id=item.response_id,
            scorer_id=self.scorer_id,
            scorer=self.name,
            value=value,
            rationale=None,
            raw="",
            call_ids=call_ids,
            details=details,
        )
        return out
