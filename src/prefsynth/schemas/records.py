"""What tasks return and the warehouse stores: one pydantic model per table row, the one declaration of
that table's columns and their types (the migrations create the tables; a test checks they agree).

A new kind of output is a new `Record` subclass (with `table` and `key`) and a migration; `StageResult`
carries any of them, and the store writes each to its table.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from functools import cache
from typing import Annotated, Any, ClassVar, TypeVar, Union

import polars as pl
from pydantic import BaseModel

BIGINT = pl.Int64  # Annotated[int, BIGINT]: a column wider than INTEGER


class Message(BaseModel):
    role: str
    content: str


class Record(BaseModel):
    """A row of one warehouse table. Its fields are the table's columns, in order."""

    table: ClassVar[str]
    key: ClassVar[str | None] = None  # primary key: a row whose key exists is skipped on insert

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "table" in cls.__dict__:
            TABLES[cls.table] = cls


TABLES: dict[str, type[Record]] = {}


def _dtype(hint: Any) -> Any:
    """A field's polars type: str, int (INTEGER; Annotated BIGINT), float, bool, list[str]; models as JSON text."""
    if typing.get_origin(hint) is Annotated:
        return typing.get_args(hint)[1]
    if typing.get_origin(hint) in (Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _dtype(inner)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return pl.String if isinstance(item, type) and issubclass(item, BaseModel) else pl.List(_dtype(item))
    return {str: pl.String, int: pl.Int32, float: pl.Float64, bool: pl.Boolean}[hint]


@cache
def columns(table: str) -> dict[str, Any]:
    """A table's columns and their polars types, from its record's fields."""
    hints = typing.get_type_hints(TABLES[table], include_extras=True)
    return {name: _dtype(hints[name]) for name in TABLES[table].model_fields}


class Prompt(Record):
    table = "prompts"
    key = "prompt_id"

    prompt_id: str
    messages: list[Message]
    source: str  # file path, dataset path, table name or builtin name
    source_ref: str  # line number, row index or row key inside the source


class ModelCall(Record):
    """One attempt of one model request: the ledger and the cache (`status == "ok"`)."""

    table = "model_calls"
    key = "attempt_id"

    attempt_id: str
    call_id: str
    model: str  # model identity (file hash or alias@version for local models, url + name for endpoints)
    endpoint: str  # base_url without credentials; "local" for embedded servers
    kind: str  # "chat"
    request: str  # canonical JSON body
    response: str | None  # JSON: text, finish_reason, usage
    status: str  # "ok" | "error"
    error: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    # migration 011: the stage that made it (e.g. generate[m], score[judge]) and its endpoint's price then
    stage: str | None = None
    input_per_mtok: float | None = None
    output_per_mtok: float | None = None
    # what the call cost in HTTP requests (migration 010; None on older rows, 0 for a cached answer)
    attempts: int | None = None  # requests sent: 1 + retries
    rate_limited: int | None = None  # answers 429
    server_errors: int | None = None  # answers 408, 409, 5xx
    timeouts: int | None = None  # requests abandoned at timeout_s (the server may still serve and bill them)
    dropped: int | None = None  # connections refused or closed without an answer
    wait_ms: float | None = None  # slept before retries (Retry-After or backoff)
    throttle_ms: float | None = None  # waited on requests/tokens-per-minute limits and the global limit
    # migration 018: on an endpoint with replicas, the replica of each failed HTTP attempt ([] when none failed;
    # None for one server); `endpoint` is then the replica that answered (or failed last)
    failed_on: list[str] | None = None


class Response(Record):
    table = "responses"
    key = "response_id"

    response_id: str
    prompt_id: str
    model: str  # label from the config
    model_identity: str
    sampling: str  # canonical JSON of the sampling params
    sample_index: int
    seed: Annotated[int, BIGINT]
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    call_id: str
    source: str = "sampled"  # sampled | teacher_refinement | teacher_anchor (see `refinements` for lineage)


class Score(Record):
    table = "scores"
    key = "score_id"

    score_id: str
    response_id: str
    scorer_id: str
    scorer: str  # scorer name from the config
    value: float
    rationale: str | None
    raw: str  # the model's text, as returned ("" for scorers without text output)
    call_ids: list[str]
    details: str | None = None  # JSON of scorer-specific values (e.g. CDR's log-probs and token counts)


class Failure(Record):
    """An item a stage could not finish: recorded, never silently dropped; retried on the next run."""

    table = "failures"

    stage: str  # "generate" | "score"
    item_id: str  # response_id (generate) or score_id (score)
    scorer_id: str | None
    error: str
    raw: str | None


class LogprobRow(Record):
    """log p(continuation | context) under one model: the CDR cache, keyed by model and both texts."""

    table = "logprobs"
    key = "lp_id"

    lp_id: str  # H(model identity, context hash, continuation hash)
    model: str
    context_hash: str
    continuation_hash: str
    logprob: float
    tokens: int
    call_ids: list[str]


class Route(Record):
    """The domain a router gave a prompt (CDR customization)."""

    table = "prompt_routes"
    key = "route_id"

    route_id: str  # H(router identity, prompt_id, domains)
    prompt_id: str
    router: str  # router model identity
    domain: str
    parsed: bool  # False: the answer did not name a domain and the default was used
    raw: str
    call_id: str


class Judgment(Record):
    """One pairwise judge call that parsed: the order shown, the verdict as given and what it means."""

    table = "judgments"
    key = "judgment_id"

    judgment_id: str  # H(comparison_id, order, sample)
    comparison_id: str
    scorer_id: str
    order: str  # "ab": response a shown first (as A); "ba": response b shown first
    sample: int  # 0..k-1 (Multiple Evidence Calibration)
    verdict: str  # as the judge answered: "A" | "B" | "tie" (positions)
    preferred: str  # in the comparison's terms: "a" | "b" | "tie"
    rationale: str | None
    raw: str  # the judge's text (the repaired reply when a repair was needed)
    repaired: bool
    call_ids: list[str]
    prompt_tokens: int | None
    completion_tokens: int | None


class Comparison(Record):
    """Two responses to one prompt judged by a pairwise scorer: all its judgments combined."""

    table = "comparisons"
    key = "comparison_id"

    comparison_id: str  # H(scorer_id, response a, response b)
    scorer_id: str
    prompt_id: str
    response_a_id: str
    response_b_id: str
    winner: str | None  # "a" | "b" | "tie"; None: verdict flipped with the order and on_flip = drop
    score_a: float  # a's share over the judgments used: win 1, tie 0.5, loss 0 (b's is 1 - score_a)
    consistent: bool | None  # both orders judged: is the majority verdict the same? (None: one order)
    flipped: bool  # the verdict reversed (a in one order, b in the other)
    judgments: int  # judgments combined into the winner (diagnostic-only orders excluded)


class Pair(Record):
    table = "pairs"
    key = "pair_id"

    pair_id: str
    prompt_id: str
    chosen_id: str
    rejected_id: str
    scorer_id: str
    rule: str  # canonical JSON of the curation rule
    score_chosen: float
    score_rejected: float
    margin: float
    source: str  # sampled | teacher_refinement | teacher_anchor


class PromptFlag(Record):
    """A prompt a run's curation left out: a duplicate of another, or found in an evaluation set; or one of its
    responses (`response_id`) left out as a duplicate of a response to another prompt."""

    table = "prompt_flags"

    prompt_id: str
    kind: str  # exact_duplicate | near_duplicate | contaminated | exact_duplicate_response | near_duplicate_response
    of_id: str | None  # the prompt (or response) it duplicates (the one that stays)
    benchmark: str | None  # the evaluation set it was found in
    item: str | None  # the matching item's text (first 1000 characters)
    similarity: float | None  # estimated Jaccard similarity of a near duplicate (1.0: exact)
    response_id: str | None = None  # a duplicate response (of_id: the response it duplicates), else None


class RunAnchor(Record):
    """A teacher's anchor (its own answer to a prompt) that a run used: the rows of an SFT export."""

    table = "run_anchors"
    key = "response_id"  # one per run: the table's key is (run_id, response_id)

    response_id: str
    prompt_id: str


class Refinement(Record):
    """A teacher's minimally edited version of a response (y*_w of its parent y_l), scored by the teacher
    against the parent's score: the lineage and the self-calibrated margin of a teacher_refinement pair."""

    table = "refinements"
    key = "refinement_id"

    refinement_id: str  # H(refined response, parent score and its source, min_gap)
    prompt_id: str
    response_id: str  # the refined response (y*_w): a row of `responses` with source teacher_refinement
    parent_id: str  # the response it refines (y_l)
    teacher: str  # teacher model identity
    edit_kind: str  # the teacher's label: correctness | completeness | relevance | clarity | style | other
    explanation: str  # what the teacher found wrong with the parent
    edit_distance: int  # characters (Levenshtein) from the parent's text to the refinement's
    score_parent: float  # s_l on 1..10
    parent_scored_by: str  # "scorer:<name>" (the curation judge) or "teacher" (the teacher scored it)
    score_refined: float | None  # s_w on 1..10, the teacher's calibrated score (None: not scored, see drop)
    margin: float | None  # s_w - s_l
    kept: bool  # the pair is kept: texts differ and margin > min_gap
    drop_reason: str | None  # identical | below_min_gap
    reference_id: str | None  # the teacher's anchor, when shown as a reference
    call_ids: list[str]


class PanelScore(Record):
    """A panel's aggregate value for one response."""

    table = "panel_scores"

    panel_id: str
    prompt_id: str
    response_id: str
    value: float


class PanelAgreement(Record):
    """How two panel members agree on one prompt (Kendall tau), or the whole panel ("*": Krippendorff alpha)."""

    table = "panel_agreement"

    panel_id: str
    prompt_id: str
    scorer_a: str
    scorer_b: str
    kendall_tau: float | None
    alpha: float | None


class EvalItem(Record):
    """One labelled pair under one scorer in `prefsynth eval`."""

    table = "eval_items"

    eval_id: str
    scorer_id: str
    pair_key: str
    subset: str | None
    source_ref: str
    score_better: float | None
    score_worse: float | None
    error: str | None
    consistent: bool | None


class PromptVersion(Record):
    """One text of the target's system prompt or the judge's rubric, as a synthesis loop used it."""

    table = "prompt_versions"
    key = "version_id"

    version_id: str  # H(role, text): the text's identity
    role: str  # target | judge
    text: str
    parent_id: str | None  # the version the optimizer rewrote into this one (None: the config's)
    loop_id: str  # the loop that first used it
    round: int  # ... in this round


class LoopRound(Record):
    """One round of a synthesis loop: the prompt versions it ran with and how many of its pairs passed."""

    table = "loop_rounds"
    key = "round_id"

    round_id: str  # H(loop_id, round)
    loop_id: str  # H(the loop's config)
    round: int  # 1, 2, ...
    target_version: str
    judge_version: str
    pipeline_run_id: str  # the round's pipeline run (its pairs: run_pairs)
    pairs: int
    accepted: int
    acceptance_rate: float | None  # accepted / pairs (None: no pairs)
    stop_reason: str | None  # target_rate | max_rounds | unchanged | optimizer_failed (None: went on)


class LoopPair(Record):
    """The pair-quality check of one pair in one loop round."""

    table = "loop_pairs"
    key = "check_id"

    check_id: str  # H(round, pair)
    round_id: str
    pair_id: str
    score: float | None  # 1..10 (None: the check failed, see error)
    rationale: str | None
    accepted: bool
    error: str | None
    call_ids: list[str]


class ReviewTask(Record):
    """One pair `prefsynth review export` sent to people: which response was shown where, and why it was picked."""

    table = "review_tasks"
    key = "task_id"

    task_id: str  # H(review_id, pair_id): the id a tool's task or record carries
    review_id: str  # H(run, pairs, criterion, seed, tool): one export
    pair_id: str
    prompt_id: str
    left_id: str  # shown on the left (first)
    right_id: str
    chosen_side: str  # left | right: where the machine's chosen response was shown
    tool: str  # argilla | label-studio
    criterion: str  # agreement | margin | flips | auto
    rank: int  # 1: the most doubtful
    doubt: str  # JSON: the pair's agreement, z_margin and flips when exported


class HumanLabel(Record):
    """One person's verdict on one review task (scorer `human`), from a tool's export file."""

    table = "human_labels"
    key = "label_id"

    label_id: str  # H(task, annotator, verdict, labelled_at)
    task_id: str
    pair_id: str
    prompt_id: str
    chosen_id: str  # the machine's chosen and rejected responses of the pair
    rejected_id: str
    scorer_id: str  # the `human` scorer
    verdict: str  # chosen | rejected | tie | skip
    preferred_id: str | None  # the preferred response (None: tie or skip)
    annotator: str
    labelled_at: str | None  # as the tool wrote it (None: the tool's export has no time)
    tool: str
    source_file: str
    source_sha256: str


R = TypeVar("R", bound=Record)


class StageResult:
    """What a task returns: rows for any tables, in the order added; the writer commits them together."""

    def __init__(self, *records: Record) -> None:
        self.rows: dict[str, list[Record]] = {}
        self.add(*records)

    def add(self, *records: Record) -> None:
        for record in records:
            self.rows.setdefault(record.table, []).append(record)

    def of(self, kind: type[R]) -> list[R]:
        """This result's rows of one record kind."""
        return self.rows.get(kind.table, [])  # type: ignore[return-value]

    def without(self, kind: type[Record]) -> StageResult:
        """The same rows but those of `kind`."""
        out = StageResult()
        out.rows = {table: rows for table, rows in self.rows.items() if table != kind.table}
        return out

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.rows.values())


def merge_results(parts: Iterable[StageResult]) -> StageResult:
    """Several results as one batch (rows concatenated per table, in order)."""
    merged = StageResult()
    for part in parts:
        for table, rows in part.rows.items():
            merged.rows.setdefault(table, []).extend(rows)
    return merged


class StageCounts(BaseModel):
    """One stage of a run: what it had to do, what was already there, what it made, what failed."""

    stage: str
    total: int = 0
    reused: int = 0
    new: int = 0
    failed: int = 0
    model_calls: int = 0
    tokens: int = 0  # prompt + completion tokens of the new model calls

    def tally(self) -> StageCounts:
        """`total` from what was reused, made and failed (a stage's counts once it stops)."""
        self.total = self.reused + self.new + self.failed
        return self


class RunSummary(BaseModel):
    run_id: str
    name: str
    warehouse: str
    status: str = "completed"
    prompts: int = 0  # distinct prompts of the run
    prompts_read: int = 0
    duplicates_dropped: int = 0
    stages: list[StageCounts] = []
    pairs: int = 0
    curation: dict[str, int] = {}  # what each curation step removed (tasks/curate.py STEPS)
    lengths: dict[str, Any] = {}  # chosen against rejected length, before and after length control (Curated.lengths)
    exports: list[str] = []
    seconds: float = 0.0
    budget: str | None = None  # what the run's new calls spent against its budget, if it has one

    @property
    def failures(self) -> int:
        return sum(s.failed for s in self.stages)

    @property
    def model_calls(self) -> int:
        return sum(s.model_calls for s in self.stages)


class RoundSummary(BaseModel):
    """One round of a synthesis loop as its summary shows it."""

    round: int
    target_version: str
    judge_version: str
    pipeline_run_id: str
    pairs: int
    accepted: int
    acceptance_rate: float | None
    model_calls: int  # new calls: the pipeline's, the check's and the optimizer's
    stop_reason: str | None


class LoopSummary(BaseModel):
    loop_id: str
    run_id: str
    name: str
    warehouse: str
    rounds: list[RoundSummary] = []
    seconds: float = 0.0

    @property
    def model_calls(self) -> int:
        return sum(r.model_calls for r in self.rounds)

    @property
    def stop_reason(self) -> str | None:
        return self.rounds[-1].stop_reason if self.rounds else None
