"""What tasks return and the warehouse stores: one pydantic model per fact table row."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel


class Message(BaseModel):
    role: str
    content: str


class Prompt(BaseModel):
    prompt_id: str
    messages: list[Message]
    source: str  # file path, dataset path, table name or builtin name
    source_ref: str  # line number, row index or row key inside the source


class ModelCall(BaseModel):
    """One attempt of one model request: the ledger and the cache (`status == "ok"`)."""

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


class Response(BaseModel):
    response_id: str
    prompt_id: str
    model: str  # label from the config
    model_identity: str
    sampling: str  # canonical JSON of the sampling params
    sample_index: int
    seed: int
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    call_id: str


class Score(BaseModel):
    score_id: str
    response_id: str
    scorer_id: str
    scorer: str  # scorer name from the config
    value: float
    rationale: str | None
    raw: str  # the model's text, as returned ("" for scorers without text output)
    call_ids: list[str]
    details: str | None = None  # JSON of scorer-specific values (e.g. CDR's log-probs and token counts)


class Failure(BaseModel):
    """An item a stage could not finish: recorded, never silently dropped; retried on the next run."""

    stage: str  # "generate" | "score"
    item_id: str  # response_id (generate) or score_id (score)
    scorer_id: str | None
    error: str
    raw: str | None


class LogprobRow(BaseModel):
    """log p(continuation | context) under one model: the CDR cache, keyed by model and both texts."""

    lp_id: str  # H(model identity, context hash, continuation hash)
    model: str
    context_hash: str
    continuation_hash: str
    logprob: float
    tokens: int
    call_ids: list[str]


class Route(BaseModel):
    """The domain a router gave a prompt (CDR customization)."""

    route_id: str  # H(router identity, prompt_id, domains)
    prompt_id: str
    router: str  # router model identity
    domain: str
    parsed: bool  # False: the answer did not name a domain and the default was used
    raw: str
    call_id: str


class Judgment(BaseModel):
    """One pairwise judge call that parsed: the order shown, the verdict as given and what it means."""

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


class Comparison(BaseModel):
    """Two responses to one prompt judged by a pairwise scorer: all its judgments combined."""

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


class Pair(BaseModel):
    pair_id: str
    prompt_id: str
    chosen_id: str
    rejected_id: str
    scorer_id: str
    rule: str  # canonical JSON of the curation rule
    score_chosen: float
    score_rejected: float
    margin: float


class StageResult(BaseModel):
    """What a task returns for one chunk: rows for each table, written by the flow in one statement each."""

    calls: list[ModelCall] = []
    responses: list[Response] = []
    scores: list[Score] = []
    failures: list[Failure] = []
    logprobs: list[LogprobRow] = []
    routes: list[Route] = []
    judgments: list[Judgment] = []
    comparisons: list[Comparison] = []


def merge_results(parts: Iterable[StageResult]) -> StageResult:
    """Several results as one batch (lists concatenated, in order)."""
    merged = StageResult()
    for part in parts:
        for name in StageResult.model_fields:
            getattr(merged, name).extend(getattr(part, name))
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
    exports: list[str] = []
    seconds: float = 0.0

    @property
    def failures(self) -> int:
        return sum(s.failed for s in self.stages)

    @property
    def model_calls(self) -> int:
        return sum(s.model_calls for s in self.stages)
