"""Pairwise LLM judge with position-bias controls: verdict A, B or tie, and a rationale.

Styles: `json` asks for {"rationale", "verdict"} (schema-constrained where the server can); `answer_tag`
lets the judge reason freely and end with <answer>A</answer>, as generative reward models do.

Calibration ("Large Language Models are not Fair Evaluators", Wang et al. 2023):
- Balanced Position Calibration judges order "ab" (a shown as A) and order "ba" (b shown as A).
- Multiple Evidence Calibration samples k judgments per order (seed + i).
Each judgment gives a a share (win 1, tie 0.5, loss 0); `score_a` is the mean of the per-order means.
A comparison *flips* when one order's majority prefers a and the other's prefers b; `on_flip` then makes
it a tie (score 0.5), drops it (no winner), or keeps the mean (`mean`). Otherwise the winner follows
`score_a`. Every judgment is stored with its order, raw text and rationale.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema, create_model, model_validator

from prefsynth.backends.client import Endpoint, ModelClient
from prefsynth.backends.quirks import json_response_format
from prefsynth.backends.templates import conversation_text
from prefsynth.schemas.config import ModelSpec, ScorerSpec
from prefsynth.schemas.records import Comparison, Judgment
from prefsynth.tasks.scorers.base import Clients, PairItem, PairwiseScorer, ScoreOutcome, by_prompt
from prefsynth.tasks.scorers.judging import (
    REPLY_CONFIG,
    ask_parsed,
    parse_reply,
    placeholder_turns,
    rationale_field,
    reply_schema,
    reply_shape,
)
from prefsynth.warehouse.ids import content_id, template_id

DEFAULT_CRITERIA = (
    "Which response better follows the user's instruction? Prefer the response that is correct, honest and "
    "helpful and does exactly what was asked; do not let the order of the responses, their length or their "
    "style influence you."
)


class PairwiseJudgeSpec(ScorerSpec):
    """An LLM compares two responses to one prompt: verdict A, B or tie, with a rationale.

    Balanced Position Calibration judges both orders; Multiple Evidence Calibration samples k judgments per
    order; all judgments of a comparison are averaged ("Large Language Models are not Fair Evaluators").
    """

    kind: Literal["pairwise_judge"] = "pairwise_judge"
    compares: ClassVar[bool] = True
    name: str = "pairwise"
    model: ModelSpec
    style: Literal["json", "answer_tag"] = Field(
        "json", description="json: a JSON verdict; answer_tag: free reasoning ending in <answer>A</answer>."
    )
    criteria: str = DEFAULT_CRITERIA
    allow_tie: bool = Field(True, description="Let the judge answer `tie`.")
    balanced_position: bool = Field(True, description="Judge both orders (A/B and B/A) and combine them.")
    on_flip: Literal["tie", "drop", "mean"] = Field(
        "tie",
        description="A comparison whose verdict reverses with the order: a tie, dropped (no winner), or decided "
        "by the mean of all judgments (useful with samples_per_order > 1).",
    )
    samples_per_order: int = Field(1, ge=1, le=16, description="Judgments sampled per order (k), averaged.")
    max_tokens: int = Field(256, ge=16, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int = 0
    structured_output: bool = Field(True, description="json style: constrain output to the JSON schema.")

    def roles(self) -> dict[str, ModelSpec]:
        return {"judge": self.model}

    @model_validator(mode="after")
    def _sampling(self) -> PairwiseJudgeSpec:
        if self.samples_per_order > 1 and self.temperature == 0:
            raise ValueError("`samples_per_order` > 1 needs `temperature` > 0 (greedy samples are all the same)")
        return self


SYSTEM = "You are a careful, impartial judge comparing two AI assistant responses."
TEMPLATE = """{criteria}

[Conversation]
{conversation}

[Response A]
{first}

[Response B]
{second}

{ask}"""
ASK = {
    "json": "Which response is better? Reply with only a JSON object:\n{shape}",
    "answer_tag": "Which response is better? Explain your reasoning briefly, then end with your verdict on the "
    "last line as {tags}.",
}
REPAIR = {
    "json": "Your reply could not be used: {problem}.\nReply again with only a JSON object, nothing else:\n{shape}",
    "answer_tag": "Your reply could not be used: {problem}.\nReply again, ending with exactly one of {tags}.",
}
RATIONALE = "<one or two short sentences>"
TAG = "<answer>{verdict}</answer>"
ORDERS = ("ab", "ba")
_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
SHARE = {"a": 1.0, "tie": 0.5, "b": 0.0}


def verdicts(allow_tie: bool) -> list[str]:
    return ["A", "B", *(["tie"] if allow_tie else [])]


def _verdict(value: Any, allow_tie: bool) -> str:
    """Normalize "A", "response b", "Tie" ...; raise ValueError (a phrase about the verdict) for anything else."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    word = re.sub(r"^(response|assistant|output)\s+", "", value.strip().strip(".\"'*").strip(), flags=re.I).lower()
    if word in ("a", "b"):
        return word.upper()
    if word in ("tie", "draw", "equal"):
        if not allow_tie:
            raise ValueError("must be A or B: a tie is not allowed here")
        return "tie"
    raise ValueError(f"must be {'A, B or tie' if allow_tie else 'A or B'}, got {value[:40]!r}")


def verdict_model(allow_tie: bool) -> type[BaseModel]:
    """The JSON reply: a rationale, then the verdict ("A", "B" or "tie", leniently normalized)."""
    choices = verdicts(allow_tie)
    verdict = Annotated[str, BeforeValidator(lambda v: _verdict(v, allow_tie)), WithJsonSchema({"enum": choices})]
    return create_model("verdict", __config__=REPLY_CONFIG, rationale=rationale_field(400, RATIONALE),
                        verdict=(verdict, Field(description=f'"{"|".join(choices)}"')))  # fmt: skip


def parse_verdict_json(
    text: str, allow_tie: bool = True, model: type[BaseModel] | None = None
) -> tuple[str, str | None]:
    """(verdict, rationale) from a JSON reply (`model`: verdict_model(allow_tie), built once by a judge)."""
    reply = parse_reply(model or verdict_model(allow_tie), text)
    return reply.verdict, reply.rationale  # type: ignore[attr-defined]


def parse_verdict_tag(text: str, allow_tie: bool = True) -> tuple[str, str | None]:
    """(verdict, rationale) from a reasoning reply ending in <answer>X</answer>; the last tag counts."""
    tags = list(_TAG.finditer(text))
    if not tags:
        raise ValueError("no <answer>...</answer> tag found")
    last = tags[-1]
    try:
        verdict = _verdict(last.group(1), allow_tie)
    except ValueError as err:
        raise ValueError(f"the verdict {err}") from None
    return verdict, text[: last.start()].strip() or None


def preferred(verdict: str, order: str) -> str:
    """A verdict about positions -> about the comparison's responses ("a", "b" or "tie")."""
    if verdict == "tie":
        return "tie"
    first, second = ("a", "b") if order == "ab" else ("b", "a")
    return first if verdict == "A" else second


def _majority(shares: list[float]) -> str:
    mean = sum(shares) / len(shares)
    return "a" if mean > 0.5 else "b" if mean < 0.5 else "tie"


def combine(
    judgments: Sequence[Judgment], orders: Sequence[str], on_flip: str
) -> tuple[str | None, float, bool | None, bool, int]:
    """(winner, score_a, consistent, flipped, judgments used) of a comparison's judgments.

    `orders` are the orders the verdict uses; judgments of other orders only inform `consistent`.
    """
    by_order = {o: [SHARE[j.preferred] for j in judgments if j.order == o] for o in ORDERS}
    used = [o for o in orders if by_order[o]]
    score_a = sum(sum(by_order[o]) / len(by_order[o]) for o in used) / len(used)
    both = all(by_order[o] for o in ORDERS)
    majorities = {_majority(by_order[o]) for o in ORDERS if by_order[o]}
    consistent = len(majorities) == 1 if both else None
    flipped = both and majorities == {"a", "b"}
    n = sum(len(by_order[o]) for o in used)
    if flipped and len(used) == 2 and on_flip != "mean":
        return ("tie", 0.5, consistent, True, n) if on_flip == "tie" else (None, score_a, consistent, True, n)
    winner = "a" if score_a > 0.5 else "b" if score_a < 0.5 else "tie"
    return winner, score_a, consistent, flipped, n


class PairwiseJudge(PairwiseScorer):
    Spec = PairwiseJudgeSpec

    def __init__(self, spec: PairwiseJudgeSpec, endpoints: dict[str, Endpoint]) -> None:
        super().__init__(spec, endpoints)
        self.spec = spec
        self.endpoint = endpoints["judge"]
        self.orders: tuple[str, ...] = ORDERS if spec.balanced_position else ("ab",)
        self.reply = verdict_model(spec.allow_tie)
        self.schema, self.shape = reply_schema(self.reply), reply_shape(self.reply)
        self.template = self._template_id()  # once: scorer_id is read for every comparison

    def identity(self) -> dict[str, Any]:
        return {
            "template": self.template,
            **self.spec.model_dump(include={"style", "criteria", "allow_tie", "balanced_position", "on_flip",
                                            "samples_per_order", "max_tokens", "temperature", "seed",
                                            "structured_output"}),
        }  # fmt: skip

    @property
    def calls_per_comparison(self) -> int:
        return len(self.orders) * self.spec.samples_per_order

    def _template_id(self) -> str:
        """Every text sent besides the data: the request for a placeholder pair, the schema, the repair."""
        probe = PairItem("", "", placeholder_turns(), ("", "<response A>"), ("", "<response B>"))
        schema = self.schema if self.spec.style == "json" else None
        return template_id(self._messages(probe, "ab"), schema, self._repair("<problem>"))

    def _format(self, text: str, **values: str) -> str:
        """`text` with this judge's reply shape (json) or answer tags (answer_tag) filled in."""
        tags = ", ".join(TAG.format(verdict=v) for v in verdicts(self.spec.allow_tie))
        return text.format(shape=self.shape, tags=tags, **values)

    def _parse(self, text: str) -> tuple[str, str | None]:
        if self.spec.style == "answer_tag":
            return parse_verdict_tag(text, self.spec.allow_tie)
        return parse_verdict_json(text, self.spec.allow_tie, self.reply)

    def _repair(self, problem: str) -> str:
        return self._format(REPAIR[self.spec.style], problem=problem)

    def _body(self, client: ModelClient, messages: list[dict[str, str]], sample: int) -> dict[str, Any]:
        structured = self.spec.style == "json" and self.spec.structured_output
        fmt = json_response_format(self.endpoint, "verdict", self.schema) if structured else None
        return client.request_body(
            messages,
            temperature=self.spec.temperature,
            max_tokens=self.spec.max_tokens,
            seed=self.spec.seed + sample,
            response_format=fmt,
        )

    def _messages(self, item: PairItem, order: str) -> list[dict[str, str]]:
        first, second = (item.a, item.b) if order == "ab" else (item.b, item.a)
        ask = self._format(ASK[self.spec.style])
        user = TEMPLATE.format(criteria=self.spec.criteria, conversation=conversation_text(item.messages),
                               first=first[1], second=second[1], ask=ask)  # fmt: skip
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    def _plan(self, item: PairItem) -> list[tuple[str, int]]:
        orders = ORDERS if item.diagnose else self.orders
        return [(o, k) for o in orders for k in range(self.spec.samples_per_order)]

    def schedule(self, items: Sequence[PairItem]) -> tuple[list[list[PairItem]], int]:
        """A prompt's comparisons go together and as many prompts as the server has slots are in flight, so
        a one-slot server judges both orders of a pair back to back and reuses the shared prefix it cached."""
        return by_prompt(items), max(1, self.endpoint.concurrency)

    async def score(self, clients: Clients, item: PairItem) -> ScoreOutcome:
        client = clients["judge"]
        out = ScoreOutcome()
        errors = []
        for order, sample in self._plan(item):
            parsed = await ask_parsed(
                client,
                self._messages(item, order),
                lambda messages, sample=sample: self._body(client, messages, sample),
                self._parse,
                self._repair,
            )
            for outcome in parsed.outcomes:
                out.keep(outcome)
            if parsed.value is None:
                if order in self.orders:  # a diagnostic-only order that fails just leaves `consistent` unknown
                    errors.append((f"order {order} sample {sample}: {parsed.error}", parsed.raw))
                continue
            verdict, rationale = parsed.value
            out.judgments.append(
                Judgment(
                    judgment_id=content_id("judgment", item.comparison_id, order, sample),
                    comparison_id=item.comparison_id, scorer_id=self.scorer_id, order=order, sample=sample,
                    verdict=verdict, preferred=preferred(verdict, order), rationale=rationale, raw=parsed.raw,
                    repaired=parsed.repaired, call_ids=parsed.call_ids,
                    prompt_tokens=parsed.tokens("prompt_tokens"), completion_tokens=parsed.tokens("completion_tokens"),
                )
            )  # fmt: skip
        if errors:
            raw = "\n=== next judgment ===\n".join(r for _, r in errors if r)
            return self.failed(out, item, "; ".join(e for e, _ in errors), raw or None)
        winner, score_a, consistent, flipped, used = combine(out.judgments, self.orders, self.spec.on_flip)
        if len(out.judgments) < len(self._plan(item)):  # a diagnostic judgment failed: the swap is unknown
            consistent, flipped = None, False
        out.comparison = Comparison(
            comparison_id=item.comparison_id, scorer_id=self.scorer_id, prompt_id=item.prompt_id,
            response_a_id=item.a[0], response_b_id=item.b[0], winner=winner, score_a=score_a,
            consistent=consistent, flipped=flipped, judgments=used,
        )  # fmt: skip
        return out
