"""Reward model: one scalar per (prompt, response), the conversation being the prompt's turns followed by
the response as the assistant turn.

- Over HTTP (`model`): vLLM's pooling APIs through `ModelClient.reward` (cached, deduplicated, in the
  ledger as kind "reward"). `api: pooling` gives the model's raw output: value[label_index] of the
  sequence, or of the last token for a token-wise (per-token) output; `api: classify` gives the class
  probability probs[label_index]. The paths are at the server root (`.../v1` is dropped from base_url);
  see backends/quirks.py for the shapes.
- In process (`path`): a transformers sequence classifier on the CPU (backends/hf_reward.py), reward =
  logits[label_index]. It has no endpoints and records no model calls; `prepare` computes a chunk's
  rewards, batch_size at a time, off the event loop, and `score` hands them out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from prefsynth.backends import quirks
from prefsynth.backends.client import Endpoint
from prefsynth.backends.hf_reward import HFRewardModel, RewardResult, render_id
from prefsynth.schemas.config import RewardModelSpec
from prefsynth.schemas.records import Route, Score
from prefsynth.tasks.scorers.base import Clients, PointwiseScorer, ScoreItem, ScoreOutcome
from prefsynth.tasks.scorers.judging import placeholder_turns
from prefsynth.warehouse.ids import canonical_json, template_id


def conversation(item: ScoreItem) -> list[dict[str, str]]:
    return [*(m.model_dump() for m in item.messages), {"role": "assistant", "content": item.response}]


class RewardModelScorer(PointwiseScorer):
    def __init__(self, spec: RewardModelSpec, endpoint: Endpoint | None) -> None:
        """`endpoint` serves spec.model; without one, spec.path is loaded in process (ConfigError if unusable)."""
        super().__init__(spec.name, {"reward": endpoint} if endpoint is not None else {})
        self.spec = spec
        self.local = HFRewardModel(str(spec.path), spec.max_length) if endpoint is None else None
        self._ready: dict[str, RewardResult] = {}  # in process: score_id -> reward computed by prepare

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
