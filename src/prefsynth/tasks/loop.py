"""The synthesis loop's two judges (Anyprefer, arXiv 2504.19276): the pair-quality check and the optimizer.

- **Check.** Shown a prompt, a pair's chosen and rejected responses and the judge's scores and rationales,
  a model scores on 1-10 whether the pair is useful for preference training (JSON: rationale, score).
- **Optimizer.** Shown the current target system prompt, judge rubric and the rejected pairs with the
  judge's and the check's rationales, a model writes both prompts anew (JSON).
Both ask through the cached client with one repair prompt (judging.ask_parsed); a reply that does not
parse after its repair is a failure with its raw text. Their templates are in their ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from prefsynth.backends.client import Endpoint, ModelClient
from prefsynth.backends.quirks import json_response_format
from prefsynth.schemas.config import LoopSpec
from prefsynth.schemas.records import LoopPair, StageResult
from prefsynth.tasks.scorers.judging import REPLY_CONFIG, Parsed, ask_parsed, parse_reply, reply_schema, reply_shape
from prefsynth.tasks.scorers.pointwise_judge import ratings_model
from prefsynth.warehouse.ids import content_id, template_id

DEFAULT_TARGET = "You are a helpful assistant."
CHECK_SYSTEM = "You review preference pairs (a chosen and a rejected response) used to train reward models."
CHECK = """[Prompt]
{prompt}

[Chosen response] (judge: {score_chosen:g}, "{why_chosen}")
{chosen}

[Rejected response] (judge: {score_rejected:g}, "{why_rejected}")
{rejected}

Is this pair useful for preference training: is the chosen response truly better than the rejected one, \
for a reason that matters? 1 means useless or wrongly ordered, 10 means a clear, instructive preference. \
Reply with only a JSON object:
{shape}"""
OPTIMIZE_SYSTEM = "You improve the prompts of a pipeline that makes preference data for reward models."
OPTIMIZE = """A target model answers user prompts under a system prompt. A judge scores each answer with a \
rubric; each prompt's best and worst answers form a pair. A reviewer rejected these pairs as not useful:
{rejected}

Rewrite both prompts below: the target's answers should differ in the quality that matters, and the judge \
should score exactly that quality. Reply with only this JSON object, both texts rewritten:
{current}"""
REJECTED = ('- prompt: "{prompt}"; judge: {score_chosen:g} vs {score_rejected:g} ("{why}"); '
            'reviewer: {score} ("{review}")')
NO_PAIRS = "- (no pairs: the judge scored every prompt's answers alike)"
REPAIR = """Your reply could not be used: {problem}.
Reply again with only a JSON object, nothing else:
{shape}"""
CHECK_MAX_TOKENS = 96
MAX_SHOWN = 5  # rejected pairs shown to the optimizer
CLIP = 160  # characters of a text shown to the optimizer


class Proposal(BaseModel):
    """The optimizer's reply: the two rewritten prompts."""

    model_config = REPLY_CONFIG
    target_system_prompt: str = Field(..., min_length=1, max_length=1000,
                                      description='"<the new system prompt of the target model>"')  # fmt: skip
    judge_rubric: str = Field(..., min_length=1, max_length=1000,
                              description='"<the new rubric of the judge>"')  # fmt: skip


@dataclass(frozen=True)
class RoundPair:
    """A pair of a round with what the check and the optimizer are shown."""

    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    score_chosen: float
    score_rejected: float
    why_chosen: str
    why_rejected: str


def parse_check(text: str) -> tuple[float, str | None]:
    """(score, rationale) of a check reply; ValueError saying what is wrong."""
    reply = parse_reply(ratings_model(("score",), 1, 10), text).model_dump(by_alias=True)
    return reply["score"], reply["rationale"]


def parse_proposal(text: str) -> Proposal:
    """The optimizer's two prompts, whitespace stripped; ValueError saying what is wrong."""
    reply = parse_reply(Proposal, text)
    target, rubric = reply.target_system_prompt.strip(), reply.judge_rubric.strip()
    for name, text in (("target_system_prompt", target), ("judge_rubric", rubric)):
        if not text or (text.startswith("<") and text.endswith(">")):  # blank, or the shape's placeholder
            raise ValueError(f'"{name}" must be the new prompt itself, not blank or a <placeholder>')
    return Proposal(target_system_prompt=target, judge_rubric=rubric)


def clip(text: str, n: int = CLIP) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class LoopJudges:
    """The check and the optimizer of one loop, each with its own endpoint."""

    def __init__(self, spec: LoopSpec, checker: Endpoint, optimizer: Endpoint) -> None:
        self.spec, self.checker, self.optimizer = spec, checker, optimizer
        self.check_reply = ratings_model(("score",), 1, 10)
        self.check_schema, self.check_shape = reply_schema(self.check_reply), reply_shape(self.check_reply)
        self.proposal_schema, self.proposal_shape = reply_schema(Proposal), reply_shape(Proposal)
        # every text they send besides the data: part of the loop's identity
        self.template = template_id(CHECK_SYSTEM, CHECK, OPTIMIZE_SYSTEM, OPTIMIZE, REJECTED, NO_PAIRS, REPAIR,
                                    self.check_schema, self.proposal_schema, CHECK_MAX_TOKENS, MAX_SHOWN, CLIP)

    def _body(self, endpoint: Endpoint, client: ModelClient, messages: list[dict[str, str]], schema: dict[str, Any],
              max_tokens: int) -> dict[str, Any]:  # fmt: skip
        fmt = json_response_format(endpoint, "reply", schema)
        return client.request_body(messages, temperature=self.spec.temperature, max_tokens=max_tokens,
                                   seed=self.spec.seed, response_format=fmt)  # fmt: skip

    async def check(self, client: ModelClient, round_id: str, pair: RoundPair) -> StageResult:
        """The check of one pair: its row (accepted or not, or its failure) and the new calls."""
        user = CHECK.format(prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected,
                            score_chosen=pair.score_chosen, score_rejected=pair.score_rejected,
                            why_chosen=pair.why_chosen, why_rejected=pair.why_rejected, shape=self.check_shape)
        parsed: Parsed[tuple[float, str | None]] = await ask_parsed(
            client, [{"role": "system", "content": CHECK_SYSTEM}, {"role": "user", "content": user}],
            lambda m: self._body(self.checker, client, m, self.check_schema, CHECK_MAX_TOKENS), parse_check,
            lambda problem: REPAIR.format(problem=problem, shape=self.check_shape))  # fmt: skip
        score, rationale = parsed.value if parsed.value else (None, None)
        row = LoopPair(check_id=content_id("loop_pair", round_id, pair.pair_id), round_id=round_id,
                       pair_id=pair.pair_id, score=score, rationale=rationale if parsed.value else parsed.raw or None,
                       accepted=score is not None and score >= self.spec.accept_threshold, error=parsed.error,
                       call_ids=parsed.call_ids)  # fmt: skip
        return StageResult(*(o.call for o in parsed.outcomes if not o.cached), row)

    async def optimize(self, client: ModelClient, target: str, rubric: str, rejected: list[tuple[RoundPair, LoopPair]]
                       ) -> Parsed[Proposal]:  # fmt: skip
        """New target system prompt and judge rubric from the rejected pairs (the lowest-checked first)."""
        shown = sorted(rejected, key=lambda pc: (pc[1].score if pc[1].score is not None else 0, pc[0].pair_id))
        lines = [REJECTED.format(prompt=clip(p.prompt), score_chosen=p.score_chosen, score_rejected=p.score_rejected,
                                 why=clip(p.why_rejected), score="failed" if c.score is None else f"{c.score:g}",
                                 review=clip(c.rationale or c.error or ""))
                 for p, c in shown[:MAX_SHOWN]]  # fmt: skip
        current = json.dumps({"target_system_prompt": target, "judge_rubric": rubric}, ensure_ascii=False)
        user = OPTIMIZE.format(rejected="\n".join(lines) or NO_PAIRS, current=current)
        return await ask_parsed(
            client, [{"role": "system", "content": OPTIMIZE_SYSTEM}, {"role": "user", "content": user}],
            lambda m: self._body(self.optimizer, client, m, self.proposal_schema, self.spec.max_tokens),
            parse_proposal, lambda problem: REPAIR.format(problem=problem, shape=self.proposal_shape))  # fmt: skip


def stop_reason(spec: LoopSpec, round_no: int, rate: float | None) -> str | None:
    """Why the loop stops after this round, or None to go on."""
    if rate is not None and rate >= spec.target_rate:
        return "target_rate"
    if round_no >= spec.max_rounds:
        return "max_rounds"
    return None
