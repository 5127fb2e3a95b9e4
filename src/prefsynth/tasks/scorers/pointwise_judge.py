"""Pointwise LLM judge: a rubric score on a scale with a short rationale, asked for as JSON.

Output that does not parse gets one repair prompt; if that fails too, the item is recorded as a failed
judgment with the raw text (never a silent null score).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from prefsynth.backends.client import Cache, Endpoint, ModelClient
from prefsynth.backends.quirks import json_response_format
from prefsynth.schemas.config import PointwiseJudgeSpec
from prefsynth.schemas.records import Message, Route, Score
from prefsynth.tasks.scorers.base import Clients, PointwiseScorer, ScoreItem, ScoreOutcome

TEMPLATE_VERSION = 1
SYSTEM = "You are a careful, impartial evaluator of AI assistant responses."
TEMPLATE = """{rubric}

[Conversation]
{conversation}

[Response to evaluate]
{response}

Rate the response on a scale from {lo} to {hi}. Reply with only a JSON object:
{{"rationale": "<one short sentence>", "score": <integer from {lo} to {hi}>}}"""
REPAIR = """Your reply could not be used: {problem}.
Reply again with only a JSON object, nothing else:
{{"rationale": "<one short sentence>", "score": <integer from {lo} to {hi}>}}"""


def render_conversation(messages: list[Message]) -> str:
    return "\n".join(f"{m.role.capitalize()}: {m.content}" for m in messages)


def parse_judgment(text: str, lo: int, hi: int) -> tuple[float, str | None]:
    """Return (score, rationale) from a judge's reply; raise ValueError saying what is wrong."""
    cleaned = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    start = cleaned.find("{")
    if start < 0:
        raise ValueError("no JSON object found")
    try:
        data, _ = json.JSONDecoder().raw_decode(cleaned[start:])
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg})") from None
    if not isinstance(data, dict) or "score" not in data:
        raise ValueError('the JSON object has no "score"')
    score = data["score"]
    if isinstance(score, str):
        try:
            score = float(score.strip())
        except ValueError:
            raise ValueError(f'"score" is not a number: {score!r}') from None
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise ValueError(f'"score" is not a number: {score!r}')
    if not lo <= score <= hi:
        raise ValueError(f'"score" {score} is outside {lo}..{hi}')
    rationale = data.get("rationale")
    return float(score), rationale if isinstance(rationale, str) else None


class PointwiseJudge(PointwiseScorer):
    def __init__(self, spec: PointwiseJudgeSpec, endpoint: Endpoint) -> None:
        super().__init__(spec.name, {"judge": endpoint})
        self.spec = spec
        self.endpoint = endpoint

    def identity(self) -> dict[str, Any]:
        return {
            "template": TEMPLATE_VERSION,
            **self.spec.model_dump(include={"rubric", "scale_min", "scale_max", "max_tokens", "temperature",
                                            "seed", "structured_output"}),
        }  # fmt: skip

    def _schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "rationale": {"type": "string", "maxLength": 200},
                # an enum, not minimum/maximum: llama.cpp's grammar enforces enums but not integer ranges
                "score": {"type": "integer", "enum": list(range(self.spec.scale_min, self.spec.scale_max + 1))},
            },
            "required": ["rationale", "score"],
        }

    def _body(self, client: ModelClient, messages: list[dict[str, str]]) -> dict[str, Any]:
        fmt = json_response_format(self.endpoint, "judgment", self._schema()) if self.spec.structured_output else None
        return client.request_body(
            messages,
            temperature=self.spec.temperature,
            max_tokens=self.spec.max_tokens,
            seed=self.spec.seed,
            response_format=fmt,
        )

    def _messages(self, item: ScoreItem) -> list[dict[str, str]]:
        user = TEMPLATE.format(
            rubric=self.spec.rubric,
            conversation=render_conversation(item.messages),
            response=item.response,
            lo=self.spec.scale_min,
            hi=self.spec.scale_max,
        )
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    async def prepare(self, clients: Clients, items: Sequence[ScoreItem], cache: Cache | None) -> list[Route]:
        client = clients["judge"]
        client.prefetch("chat", [self._body(client, self._messages(item)) for item in items])
        return []

    async def score(self, clients: Clients, item: ScoreItem) -> ScoreOutcome:
        client = clients["judge"]
        out = ScoreOutcome()
        lo, hi = self.spec.scale_min, self.spec.scale_max
        messages = self._messages(item)
        first = await client.chat(self._body(client, messages))
        out.keep(first)
        if not first.ok:
            return self.failed(out, item, f"judge call failed: {first.call.error}", None)
        raw = first.text or ""
        try:
            value, rationale = parse_judgment(raw, lo, hi)
            calls = [first.call.call_id]
        except ValueError as problem:
            repair_messages = [
                *messages,
                {"role": "assistant", "content": raw},
                {"role": "user", "content": REPAIR.format(problem=problem, lo=lo, hi=hi)},
            ]
            second = await client.chat(self._body(client, repair_messages))
            out.keep(second)
            if not second.ok:
                return self.failed(out, item, f"repair call failed: {second.call.error}", raw)
            try:
                value, rationale = parse_judgment(second.text or "", lo, hi)
            except ValueError as again:
                both = f"{raw}\n--- repair ---\n{second.text}"
                return self.failed(out, item, f"unparsable judgment after repair: {again}", both)
            raw = second.text or ""
            calls = [first.call.call_id, second.call.call_id]
        out.score = Score(
            score_id=item.score_id,
            response_id=item.response_id,
            scorer_id=self.scorer_id,
            scorer=self.name,
            value=value,
            rationale=rationale,
            raw=raw,
            call_ids=calls,
        )
        return out
