"""A distillation teacher (RM-Distiller, arXiv 2601.14032): refinement, self-calibrated scoring, generation.

- **Refinement.** Shown a prompt, a sampled response y_l and optionally its own answer, the teacher explains
  what is wrong and writes a minimally edited y*_w between <revised> tags, or as a JSON object the server
  constrains (`reply: json`); one repair prompt if the reply does not parse, then a failure with the raw text.
- **Calibrated scoring.** Shown y_l with its 1-10 score s_l, the explanation and y*_w, it scores y*_w on the
  same scale (JSON). s_l is the curation judge's when that is a 1-10 pointwise judge; otherwise the teacher
  scores y_l itself first (the refinement's `parent_scored_by` says which). The pair is kept only if the
  texts differ after whitespace normalization and s_w - s_l > min_gap.
- **Generation.** Its own answer to a prompt: an anchor response.

Every id is a hash of what determines the row (parent, teacher identity, template texts, parameters), and
every call goes through the cached `ModelClient`: a rerun makes no call.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field
from rapidfuzz.distance import Levenshtein

from prefsynth.backends.client import ChatOutcome, Endpoint, ModelClient
from prefsynth.backends.quirks import json_response_format
from prefsynth.backends.templates import conversation_text
from prefsynth.schemas.config import TeacherSpec
from prefsynth.schemas.records import Failure, Message, Refinement, Response, StageResult
from prefsynth.tasks.scorers.judging import (
    REPLY_CONFIG,
    Parsed,
    ask_parsed,
    parse_reply,
    placeholder_turns,
    reply_schema,
    reply_shape,
)
from prefsynth.tasks.scorers.pointwise_judge import ratings_model
from prefsynth.warehouse.ids import canonical_json, content_id, response_id, scorer_id, template_id

EDIT_KINDS = ("correctness", "completeness", "relevance", "clarity", "style")

SYSTEM = "You are an expert teacher. You improve AI assistant responses with minimal edits and grade them fairly."
REFINE = """[Conversation]
{conversation}

[Response]
{response}
{reference}
Say what is wrong with the response, then write a better version of it. Change only what needs to change: \
keep its structure and wording wherever they are fine.
{format}"""
REFERENCE = "\n[Your own answer, for reference]\n{anchor}\n"
TAGS = """Reply in exactly this format:
<explanation>what is wrong, in one or two sentences</explanation>
<kind>one of: {kinds}</kind>
<revised>the full improved response</revised>"""
JSON = """Reply with only a JSON object:
{shape}"""
REFINE_REPAIR = """Your reply could not be used: {problem}.
{format}"""
SCORE = """[Conversation]
{conversation}

[Response]
{response}

Rate how well the response answers the user's request: correct, relevant, helpful and clear. 1 means \
useless or wrong, 10 means excellent. Reply with only a JSON object:
{shape}"""
CALIBRATED = """[Conversation]
{conversation}

[Original response] (scored {score} on a scale from 1 to 10)
{parent}

[What was wrong with it]
{explanation}

[Revised response]
{revised}

The original response scored {score} out of 10. On the same scale, where 1 means useless or wrong and 10 \
means excellent, score the revised response. Reply with only a JSON object:
{shape}"""
SCORE_REPAIR = """Your reply could not be used: {problem}.
Reply again with only a JSON object, nothing else:
{shape}"""


@dataclass(frozen=True)
class Revision:
    """A parsed refinement reply."""

    explanation: str
    kind: str  # one of EDIT_KINDS, or "other" when the teacher named none of them
    text: str


def _block(text: str, tag: str) -> str | None:
    found = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL | re.IGNORECASE)
    return found.group(1).strip() if found else None


def parse_revision(text: str) -> Revision:
    """The explanation, edit kind and revised text of a refinement reply; ValueError saying what is wrong."""
    revised = _block(text, "revised")
    if revised is None:
        opened = re.search(r"<revised>", text, re.IGNORECASE)
        raise ValueError("the <revised> block is not closed with </revised>" if opened
                         else "there is no <revised>...</revised> block")  # fmt: skip
    if not revised:
        raise ValueError("the <revised> block is empty")
    explanation = _block(text, "explanation")
    if explanation is None:  # free text before the revision counts as the explanation
        before = text[: re.search(r"<revised>", text, re.IGNORECASE).start()]  # type: ignore[union-attr]
        explanation = re.sub(r"<kind>.*?</kind>", "", before, flags=re.DOTALL | re.IGNORECASE).strip()
    if not explanation:
        raise ValueError("there is no <explanation>...</explanation> of what is wrong")
    kind = (_block(text, "kind") or "").lower().strip(" .")
    return Revision(explanation=explanation, kind=kind if kind in EDIT_KINDS else "other", text=revised)


class RevisionReply(BaseModel):
    """A refinement asked for as JSON (`reply: json`)."""

    model_config = REPLY_CONFIG
    explanation: str = Field(..., min_length=1, description='"<what is wrong, in one or two sentences>"')
    kind: Literal[EDIT_KINDS] = Field(..., description=f'<one of {", ".join(map(json.dumps, EDIT_KINDS))}>')
    revised: str = Field(..., min_length=1, description='"<the full improved response>"')


def parse_revision_json(text: str) -> Revision:
    reply = parse_reply(RevisionReply, text)
    return Revision(explanation=reply.explanation.strip(), kind=reply.kind, text=reply.revised.strip())


def normalized(text: str) -> str:
    """What "identical" compares: Unicode NFC with whitespace runs collapsed."""
    return " ".join(unicodedata.normalize("NFC", text).split())


@dataclass(frozen=True)
class RefineItem:
    """One response for the teacher to refine, with its 1-10 score if the curation judge gave one."""

    prompt_id: str
    messages: list[Message]
    parent_id: str
    parent_text: str
    score_parent: float | None  # None: the teacher scores the parent itself
    scored_by: str  # "scorer:<name>", or "teacher" when score_parent is None
    reference: tuple[str, str] | None = None  # (anchor response id, text) shown as a reference


class Teacher:
    """A teacher model's refinement, scoring and generation; ids from its identity and every template."""

    def __init__(self, spec: TeacherSpec, endpoint: Endpoint) -> None:
        self.spec, self.endpoint = spec, endpoint
        self.reply = ratings_model(("score",), 1, 10)
        self.schema, self.shape = reply_schema(self.reply), reply_shape(self.reply)
        self.params = spec.model_dump(include={"max_tokens", "temperature", "seed"})
        if spec.reply == "json":
            self.revision_schema = reply_schema(RevisionReply)
            self.format, self.parse_revision = JSON.format(shape=reply_shape(RevisionReply)), parse_revision_json
        else:
            self.revision_schema = None
            self.format, self.parse_revision = TAGS.format(kinds=", ".join(EDIT_KINDS)), parse_revision
        probe = conversation_text(placeholder_turns())
        self.refine_template = template_id(SYSTEM, REFINE.format(
            conversation=probe, response="<response>", reference=REFERENCE.format(anchor="<anchor>"),
            format=self.format), REFINE_REPAIR.format(problem="<problem>", format=self.format),
            self.revision_schema)  # fmt: skip
        self.score_template = template_id(
            SYSTEM, SCORE.format(conversation=probe, response="<response>", shape=self.shape),
            CALIBRATED.format(conversation=probe, score="<score>", parent="<parent>", explanation="<explanation>",
                              revised="<revised>", shape=self.shape),
            SCORE_REPAIR.format(problem="<problem>", shape=self.shape), self.schema)  # fmt: skip

    @property
    def identity(self) -> dict[str, Any]:
        return {"kind": "teacher", "models": {"teacher": self.endpoint.identity}, "refine": self.refine_template,
                "score": self.score_template, **self.params}  # fmt: skip

    @property
    def scorer_id(self) -> str:
        """The id its calibrated scores go by (a teacher_refinement pair's scorer_id)."""
        return scorer_id(self.identity)

    @property
    def config_json(self) -> str:
        return canonical_json(self.identity)

    def anchor_id(self, prompt_id: str) -> str:
        return response_id(prompt_id, self.endpoint.identity, {"source": "teacher_anchor", **self.params}, 0)

    def refined_id(self, item: RefineItem) -> str:
        reference = item.reference[0] if item.reference else None
        return content_id("refined", item.parent_id, self.endpoint.identity, self.refine_template, self.params,
                          reference)  # fmt: skip

    def _body(self, client: ModelClient, messages: list[dict[str, str]], schema: dict[str, Any] | None = None
              ) -> dict[str, Any]:  # fmt: skip
        fmt = json_response_format(self.endpoint, "teacher", schema) if schema else None
        return client.request_body(messages, temperature=self.spec.temperature, max_tokens=self.spec.max_tokens,
                                   seed=self.spec.seed, response_format=fmt)  # fmt: skip

    def _response(self, rid: str, prompt_id: str, text: str, outcome: ChatOutcome, source: str) -> Response:
        call = outcome.call
        return Response(response_id=rid, prompt_id=prompt_id, model=self.endpoint.label,
                        model_identity=self.endpoint.identity, sampling=canonical_json(self.params), sample_index=0,
                        seed=self.spec.seed, text=text, finish_reason=outcome.finish_reason,
                        prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens,
                        latency_ms=call.latency_ms, call_id=call.call_id, source=source)  # fmt: skip

    async def answer(self, client: ModelClient, prompt_id: str, messages: list[Message]) -> StageResult:
        """The teacher's own answer to a prompt (an anchor response), or its failure."""
        rid = self.anchor_id(prompt_id)
        outcome = await client.chat(self._body(client, [m.model_dump() for m in messages]))
        result = StageResult(*([] if outcome.cached else [outcome.call]))
        if outcome.ok:
            result.add(self._response(rid, prompt_id, outcome.text or "", outcome, "teacher_anchor"))
        else:
            result.add(Failure(stage="anchor", item_id=rid, scorer_id=self.scorer_id,
                               error=outcome.call.error or "unknown error", raw=None))  # fmt: skip
        return result

    async def _score(self, client: ModelClient, user: str) -> Parsed[Any]:
        return await ask_parsed(
            client, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            lambda messages: self._body(client, messages, self.schema),
            lambda text: parse_reply(self.reply, text).model_dump(by_alias=True)["score"],
            lambda problem: SCORE_REPAIR.format(problem=problem, shape=self.shape))  # fmt: skip

    async def refine(self, client: ModelClient, item: RefineItem) -> StageResult:
        """Refine one response and score the refinement against it: a response, its lineage and the calls;
        or a failure with the raw text when a reply does not parse after its repair."""
        rid = self.refined_id(item)
        conversation = conversation_text(item.messages)
        calls: list[ChatOutcome] = []
        result = StageResult()

        def failed(what: str, parsed: Parsed[Any]) -> StageResult:
            result.add(*(o.call for o in calls if not o.cached))
            result.add(Failure(stage="refine", item_id=rid, scorer_id=self.scorer_id,
                               error=f"{what}: {parsed.error}", raw=parsed.raw or None))  # fmt: skip
            return result

        reference = REFERENCE.format(anchor=item.reference[1]) if item.reference else ""
        user = REFINE.format(conversation=conversation, response=item.parent_text, reference=reference,
                             format=self.format)  # fmt: skip
        revised: Parsed[Revision] = await ask_parsed(
            client, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            lambda messages: self._body(client, messages, self.revision_schema), self.parse_revision,
            lambda problem: REFINE_REPAIR.format(problem=problem, format=self.format))  # fmt: skip
        calls += revised.outcomes
        if revised.value is None:
            return failed("refinement", revised)
        rev = revised.value

        s_l = item.score_parent
        if s_l is None:  # the teacher scores the parent itself, on the scale it then calibrates against
            parsed = await self._score(client, SCORE.format(conversation=conversation, response=item.parent_text,
                                                             shape=self.shape))  # fmt: skip
            calls += parsed.outcomes
            if parsed.value is None:
                return failed("score of the parent", parsed)
            s_l = float(parsed.value)

        s_w: float | None = None
        drop: str | None = "identical"
        if normalized(rev.text) != normalized(item.parent_text):
            parsed = await self._score(client, CALIBRATED.format(
                conversation=conversation, score=f"{s_l:g}", parent=item.parent_text, explanation=rev.explanation,
                revised=rev.text, shape=self.shape))  # fmt: skip
            calls += parsed.outcomes
            if parsed.value is None:
                return failed("calibrated score", parsed)
            s_w = float(parsed.value)
            drop = None if s_w - s_l > self.spec.min_gap else "below_min_gap"

        result.add(*(o.call for o in calls if not o.cached))
        result.add(self._response(rid, item.prompt_id, rev.text, revised.outcomes[-1], "teacher_refinement"))
        result.add(Refinement(
            refinement_id=content_id("refinement", rid, s_l, item.scored_by, self.score_template, self.spec.min_gap),
            prompt_id=item.prompt_id, response_id=rid, parent_id=item.parent_id, teacher=self.endpoint.identity,
            edit_kind=rev.kind, explanation=rev.explanation,
            edit_distance=Levenshtein.distance(item.parent_text, rev.text), score_parent=s_l,
            parent_scored_by=item.scored_by, score_refined=s_w,
            margin=None if s_w is None else s_w - s_l, kept=drop is None, drop_reason=drop,
            reference_id=item.reference[0] if item.reference else None,
            call_ids=[o.call.call_id for o in calls]))  # fmt: skip
        return result

