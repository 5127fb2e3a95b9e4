"""Pointwise LLM judge: a rubric score on a scale with a short rationale, asked for as JSON.

With aspects (e.g. UltraFeedback's instruction following, honesty, truthfulness, helpfulness) the judge
rates each aspect on the scale and the score is their weighted mean, or their minimum (`overall`); the
ratings are kept in the score's details. Replies that do not parse get one repair prompt (judging.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from prefsynth.backends.client import Endpoint, ModelClient
from prefsynth.backends.quirks import json_response_format
from prefsynth.backends.templates import conversation_text
from prefsynth.schemas.config import PointwiseJudgeSpec
from prefsynth.schemas.records import Score
from prefsynth.tasks.scorers.base import Clients, PointwiseScorer, ScoreItem, ScoreOutcome
from prefsynth.tasks.scorers.judging import ask_parsed, json_object

TEMPLATE_VERSION = 1
SYSTEM = "You are a careful, impartial evaluator of AI assistant responses."
TEMPLATE = """{rubric}

[Conversation]
{conversation}

[Response to evaluate]
{response}

{ask} Reply with only a JSON object:
{shape}"""
REPAIR = """Your reply could not be used: {problem}.
Reply again with only a JSON object, nothing else:
{shape}"""


def parse_ratings(text: str, lo: int, hi: int, keys: Sequence[str] = ("score",)) -> tuple[dict[str, float], str | None]:
    """Return ({key: rating}, rationale) from a judge's reply; raise ValueError saying what is wrong."""
    data = json_object(text)
    ratings = {}
    for key in keys:
        if key not in data:
            raise ValueError(f'the JSON object has no "{key}"')
        value = data[key]
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f'"{key}" is not a number: {value!r}') from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f'"{key}" is not a number: {value!r}')
        if not lo <= value <= hi:
            raise ValueError(f'"{key}" {value} is outside {lo}..{hi}')
        ratings[key] = float(value)
    rationale = data.get("rationale")
    return ratings, rationale if isinstance(rationale, str) else None


def parse_judgment(text: str, lo: int, hi: int) -> tuple[float, str | None]:
    """(score, rationale) of a single-score reply."""
    ratings, rationale = parse_ratings(text, lo, hi)
    return ratings["score"], rationale


class PointwiseJudge(PointwiseScorer):
    def __init__(self, spec: PointwiseJudgeSpec, endpoint: Endpoint) -> None:
        super().__init__(spec.name, {"judge": endpoint})
        self.spec = spec
        self.endpoint = endpoint
        self.aspects = spec.aspect_list
        self.keys = [a.name for a in self.aspects] or ["score"]

    def identity(self) -> dict[str, Any]:
        fields = {"rubric", "scale_min", "scale_max", "max_tokens", "temperature", "seed", "structured_output"}
        if self.aspects:  # single-score judges keep the ids they had before aspects existed
            fields |= {"overall"}
        out = {"template": TEMPLATE_VERSION, **self.spec.model_dump(include=fields)}
        if self.aspects:
            out["aspects"] = [a.model_dump() for a in self.aspects]
        return out

    def _shape(self) -> str:
        lo, hi = self.spec.scale_min, self.spec.scale_max
        fields = ", ".join(f'"{k}": <integer from {lo} to {hi}>' for k in self.keys)
        return f'{{"rationale": "<one short sentence>", {fields}}}'

    def _schema(self) -> dict[str, Any]:
        # an enum, not minimum/maximum: llama.cpp's grammar enforces enums but not integer ranges
        rating = {"type": "integer", "enum": list(range(self.spec.scale_min, self.spec.scale_max + 1))}
        return {
            "type": "object",
            "properties": {"rationale": {"type": "string", "maxLength": 200}, **{k: rating for k in self.keys}},
            "required": ["rationale", *self.keys],
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
        lo, hi = self.spec.scale_min, self.spec.scale_max
        if self.aspects:
            listing = "\n".join(f"- {a.name}: {a.description}" for a in self.aspects)
            ask = f"Rate the response on each aspect below from {lo} to {hi}:\n{listing}\n"
        else:
            ask = f"Rate the response on a scale from {lo} to {hi}."
        user = TEMPLATE.format(
            rubric=self.spec.rubric,
            conversation=conversation_text(item.messages),
            response=item.response,
            ask=ask,
            shape=self._shape(),
        )
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    def overall(self, ratings: dict[str, float]) -> float:
        """The score from aspect ratings, by the configured rule (weighted mean or minimum)."""
        if not self.aspects:
            return ratings["score"]
        if self.spec.overall == "min":
            return min(ratings.values())
        total = sum(a.weight for a in self.aspects)
        return sum(ratings[a.name] * a.weight for a in self.aspects) / total

    async def score(self, clients: Clients, item: ScoreItem) -> ScoreOutcome:
        client = clients["judge"]
        out = ScoreOutcome()
        lo, hi = self.spec.scale_min, self.spec.scale_max
        parsed = await ask_parsed(
            client,
            self._messages(item),
            lambda messages: self._body(client, messages),
            lambda text: parse_ratings(text, lo, hi, self.keys),
            lambda problem: REPAIR.format(problem=problem, shape=self._shape()),
        )
        for outcome in parsed.outcomes:
            out.keep(outcome)
        if parsed.value is None:
            return self.failed(out, item, parsed.error or "no judgment", parsed.raw or None)
        ratings, rationale = parsed.value
        details = {"aspects": ratings, "overall": self.spec.overall} if self.aspects else None
        out.score = Score(
            score_id=item.score_id,
            response_id=item.response_id,
            scorer_id=self.scorer_id,
            scorer=self.name,
            value=self.overall(ratings),
            rationale=rationale,
            raw=parsed.raw,
            call_ids=parsed.call_ids,
            details=json.dumps(details, sort_keys=True) if details else None,
        )
        return out
