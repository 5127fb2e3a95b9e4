"""Pointwise LLM judge: a rubric score on a scale with a short rationale, asked for as JSON.

With aspects (e.g. UltraFeedback's instruction following, honesty, truthfulness, helpfulness) the judge
rates each aspect on the scale and the score is their weighted mean, or their minimum (`overall`); the
ratings are kept in the score's details. Replies that do not parse get one repair prompt (judging.py).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema, create_model, model_validator

from prefsynth.backends.client import Endpoint, ModelClient
from prefsynth.backends.quirks import json_response_format
from prefsynth.backends.templates import conversation_text
from prefsynth.schemas.config import ModelSpec, ScorerSpec, Strict
from prefsynth.schemas.records import Score
from prefsynth.tasks.scorers.base import Clients, PointwiseScorer, ScoreItem, ScoreOutcome
from prefsynth.tasks.scorers.judging import (
    REPLY_CONFIG,
    ask_parsed,
    parse_reply,
    placeholder_turns,
    rationale_field,
    reply_schema,
    reply_shape,
)
from prefsynth.warehouse.ids import template_id

DEFAULT_RUBRIC = (
    "Rate how well the response answers the user's request: correct, relevant, helpful and clear. "
    "1 means useless or wrong, 10 means excellent."
)


class Aspect(Strict):
    """One rated aspect of a multi-aspect rubric (UltraFeedback style)."""

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", description="Key in the judge's JSON, e.g. honesty.")
    description: str = Field(..., min_length=1, description="What the judge rates under this aspect.")
    weight: float = Field(1.0, gt=0, description="Weight in the overall score.")


ULTRAFEEDBACK_ASPECTS = (
    Aspect(name="instruction_following", description="Does the response do what the user asked, fully and only that?"),
    Aspect(name="honesty", description="Is it candid about uncertainty, without confident claims it cannot back?"),
    Aspect(name="truthfulness", description="Is it free of factual errors and made-up content?"),
    Aspect(name="helpfulness", description="Is it correct, informative and useful for the user's purpose?"),
)


class PointwiseJudgeSpec(ScorerSpec):
    """An LLM rates each response on a scale, with a short rationale, answering in JSON.

    With `aspects`, it rates each aspect on the scale and the score is their weighted mean (`overall: mean`)
    or their minimum (`overall: min`); the aspect ratings are kept in the score's details.
    """

    kind: Literal["pointwise_judge"] = "pointwise_judge"
    name: str = "judge"
    model: ModelSpec
    rubric: str = DEFAULT_RUBRIC
    scale_min: int = 1
    scale_max: int = 10
    max_tokens: int = Field(160, ge=16, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int = 0
    structured_output: bool = Field(True, description="Ask the server to constrain output to the JSON schema.")
    aspects: list[Aspect] | Literal["ultrafeedback"] | None = Field(
        None, description="Rate these aspects (or the four UltraFeedback ones) instead of one overall score."
    )
    overall: Literal["mean", "min"] = Field("mean", description="Score from aspect ratings: weighted mean or min.")

    def roles(self) -> dict[str, ModelSpec]:
        return {"judge": self.model}

    @property
    def aspect_list(self) -> list[Aspect]:
        return list(ULTRAFEEDBACK_ASPECTS) if self.aspects == "ultrafeedback" else list(self.aspects or [])

    @model_validator(mode="after")
    def _scale(self) -> PointwiseJudgeSpec:
        if self.scale_max <= self.scale_min:
            raise ValueError("`scale_max` must be greater than `scale_min`")
        names = [a.name for a in self.aspect_list]
        if len(set(names)) != len(names) or {"rationale", "score"} & set(names):
            raise ValueError(f"aspect names must be distinct and not `rationale` or `score`: {names}")
        if self.aspects == []:
            raise ValueError("`aspects` is empty; leave it out for a single overall score")
        return self


SYSTEM = "You are a careful, impartial evaluator of AI assistant responses."
TEMPLATE = """{rubric}

[Conversation]
{conversation}

[Response to evaluate]
{response}

{ask} Reply with only a JSON object:
{shape}"""
ASK = "Rate the response on a scale from {lo} to {hi}."
ASK_ASPECTS = "Rate the response on each aspect below from {lo} to {hi}:\n{listing}\n"
ASPECT = "- {name}: {description}"
RATING = "<integer from {lo} to {hi}>"
RATIONALE = "<one short sentence>"
REPAIR = """Your reply could not be used: {problem}.
Reply again with only a JSON object, nothing else:
{shape}"""


def ratings_model(keys: tuple[str, ...], lo: int, hi: int) -> type[BaseModel]:
    """The reply: a rationale, then one rating per key on lo..hi (numbers in strings accepted, as floats).
    Ratings are fields rating_<i> aliased to their keys, so a key may be any name (even "json")."""

    def rating(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"is not a number: {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"is not a number: {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return float(value)

    # an enum, not minimum/maximum: llama.cpp's grammar enforces enums but not integer ranges
    schema = {"type": "integer", "enum": list(range(lo, hi + 1))}
    kind = Annotated[float, BeforeValidator(rating), WithJsonSchema(schema)]
    fields = {f"rating_{i}": (kind, Field(alias=key, description=RATING.format(lo=lo, hi=hi)))
              for i, key in enumerate(keys)}  # fmt: skip
    return create_model("judgment", __config__=REPLY_CONFIG, rationale=rationale_field(200, RATIONALE), **fields)


def parse_judgment(text: str, lo: int, hi: int) -> tuple[float, str | None]:
    """(score, rationale) of a single-score reply; ValueError saying what is wrong."""
    reply = parse_reply(ratings_model(("score",), lo, hi), text).model_dump(by_alias=True)
    return reply["score"], reply["rationale"]


class PointwiseJudge(PointwiseScorer):
    Spec = PointwiseJudgeSpec

    def __init__(self, spec: PointwiseJudgeSpec, endpoints: dict[str, Endpoint]) -> None:
        super().__init__(spec, endpoints)
        self.spec = spec
        self.endpoint = endpoints["judge"]
        self.aspects = spec.aspect_list
        self.keys = [a.name for a in self.aspects] or ["score"]
        self.reply = ratings_model(tuple(self.keys), spec.scale_min, spec.scale_max)
        self.schema, self.shape = reply_schema(self.reply), reply_shape(self.reply)
        self.template = self._template_id()  # once: scorer_id is read for every score

    def identity(self) -> dict[str, Any]:
        fields = {"rubric", "scale_min", "scale_max", "max_tokens", "temperature", "seed", "structured_output"}
        if self.aspects:  # `overall` only matters with aspects
            fields |= {"overall"}
        out = {"template": self.template, **self.spec.model_dump(include=fields)}
        if self.aspects:
            out["aspects"] = [a.model_dump() for a in self.aspects]
        return out

    def _template_id(self) -> str:
        """Every text sent besides the data: the request for a placeholder item, the schema, the repair."""
        probe = ScoreItem("", "", "", placeholder_turns(), "<response>")
        return template_id(self._messages(probe), self.schema, REPAIR.format(problem="<problem>", shape=self.shape))

    def _body(self, client: ModelClient, messages: list[dict[str, str]]) -> dict[str, Any]:
        fmt = json_response_format(self.endpoint, "judgment", self.schema) if self.spec.structured_output else None
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
            listing = "\n".join(ASPECT.format(name=a.name, description=a.description) for a in self.aspects)
            ask = ASK_ASPECTS.format(lo=lo, hi=hi, listing=listing)
        else:
            ask = ASK.format(lo=lo, hi=hi)
        user = TEMPLATE.format(
            rubric=self.spec.rubric,
            conversation=conversation_text(item.messages),
            response=item.response,
            ask=ask,
            shape=self.shape,
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
        parsed = await ask_parsed(
            client,
            self._messages(item),
            lambda messages: self._body(client, messages),
            lambda text: parse_reply(self.reply, text),
            lambda problem: REPAIR.format(problem=problem, shape=self.shape),
        )
        for outcome in parsed.outcomes:
            out.keep(outcome)
        if parsed.value is None:
            return self.failed(out, item, parsed.error or "no judgment", parsed.raw or None)
        reply = parsed.value.model_dump(by_alias=True)
        ratings = {key: reply[key] for key in self.keys}
        details = {"aspects": ratings, "overall": self.spec.overall} if self.aspects else None
        out.score = Score(
            score_id=item.score_id,
            response_id=item.response_id,
            scorer_id=self.scorer_id,
            scorer=self.name,
            value=self.overall(ratings),
            rationale=reply["rationale"],
            raw=parsed.raw,
            call_ids=parsed.call_ids,
            details=json.dumps(details, sort_keys=True) if details else None,
        )
        return out
