"""The scorer interface every scoring backend plugs into.

A scorer has an id (hash of what determines its values: config and model identities), a kind
("pointwise": one value per response; "pairwise": a verdict per pair of responses), the endpoints it
calls by role, and scores one item at a time after an optional `prepare` over a batch (routing,
in-process batches). Curation reads scores by scorer id, so scorers live side by side and a new curation
rule never re-calls a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from prefsynth.backends.client import Endpoint, ModelClient, Outcome
from prefsynth.schemas.config import ScorerSpec
from prefsynth.schemas.records import (
    Comparison,
    Failure,
    Judgment,
    LogprobRow,
    Message,
    ModelCall,
    Route,
    Score,
    StageResult,
)
from prefsynth.warehouse.ids import canonical_json, scorer_id


@dataclass(frozen=True)
class ScoreItem:
    score_id: str
    response_id: str
    prompt_id: str
    messages: list[Message]
    response: str


@dataclass(frozen=True)
class PairItem:
    """Two responses to one prompt. `a` is shown first in order "ab" (the primary order)."""

    comparison_id: str
    prompt_id: str
    messages: list[Message]
    a: tuple[str, str]  # (response_id, text)
    b: tuple[str, str]
    diagnose: bool = False  # judge the swapped order too, for position consistency only


@dataclass
class ScoreOutcome:
    score: Score | None = None
    failure: Failure | None = None
    calls: list[ModelCall] = field(default_factory=list)  # calls actually made (cache hits excluded)
    logprobs: list[LogprobRow] = field(default_factory=list)
    judgments: list[Judgment] = field(default_factory=list)
    comparison: Comparison | None = None

    def result(self) -> StageResult:
        """As rows for the warehouse."""
        records = [self.score, self.failure, self.comparison]
        return StageResult(*self.calls, *self.logprobs, *self.judgments, *(r for r in records if r is not None))

    def keep(self, outcome: Outcome) -> None:
        """Remember a call for the ledger unless it was answered from the cache."""
        if not outcome.cached:
            self.calls.append(outcome.call)


Clients = dict[str, ModelClient]
T = TypeVar("T", ScoreItem, PairItem)


def by_prompt(items: Sequence[T]) -> list[list[T]]:
    """Items grouped by prompt, in first-seen order: a one-slot server then reuses the prompt's cached prefix."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(item.prompt_id, []).append(item)
    return list(groups.values())


class Scorer(ABC):
    """What every scorer shares: an id from its identity, endpoints by role, and failure records.

    A scorer kind is a subclass with `Spec`, its config class (a `ScorerSpec` whose `kind` names it), built as
    `Scorer(spec, endpoints)` with an endpoint for each of `spec.roles()`; see registry.py to register one.
    """

    kind: ClassVar[str]
    Spec: ClassVar[type[ScorerSpec]]
    # items it can work on at once besides its endpoints' slots (an in-process model offloaded to Ray's
    # workers): the pipeline keeps that many more in flight
    extra_in_flight: int = 0

    def __init__(self, spec: ScorerSpec, endpoints: dict[str, Endpoint]) -> None:
        self.spec = spec
        self.name = spec.name
        self.endpoints = endpoints

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything that determines the values besides model identities (not names, ports or limits)."""

    def _full_identity(self) -> dict[str, Any]:
        models = {role: ep.identity for role, ep in sorted(self.endpoints.items())}
        return {"kind": self.kind, "scorer_kind": self.spec.kind, "models": models, **self.identity()}

    @property
    def scorer_id(self) -> str:
        return scorer_id(self._full_identity())

    @property
    def config_json(self) -> str:
        return canonical_json(self._full_identity())

    async def prepare(self, clients: Clients, items: Sequence[Any]) -> list[Route]:
        """Work shared by items (routing, in-process batches); returns routes to store."""
        return []

    def schedule(self, items: Sequence[Any]) -> tuple[list[list[Any]], int]:
        """Groups of items to score together, and how many groups may be in flight at once."""
        return [[item] for item in items], max(1, len(items))

    @abstractmethod
    async def score(self, clients: Clients, item: Any) -> ScoreOutcome:
        """Score one item; failures are returned, never raised."""

    def failed(self, out: ScoreOutcome, item: ScoreItem | PairItem, error: str, raw: str | None) -> ScoreOutcome:
        item_id = item.score_id if isinstance(item, ScoreItem) else item.comparison_id
        out.failure = Failure(stage="score", item_id=item_id, scorer_id=self.scorer_id, error=error, raw=raw)
        return out


class PointwiseScorer(Scorer):
    """One value per response (ScoreItem -> Score)."""

    kind: ClassVar[str] = "pointwise"

    @abstractmethod
    async def score(self, clients: Clients, item: ScoreItem) -> ScoreOutcome: ...


class PairwiseScorer(Scorer):
    """A verdict per pair of responses (PairItem -> Judgments + a Comparison)."""

    kind: ClassVar[str] = "pairwise"
    orders: tuple[str, ...] = ("ab",)  # the orders its verdict uses ("ab": a shown first)

    @property
    def calls_per_comparison(self) -> int:
        return len(self.orders)

    @abstractmethod
    async def score(self, clients: Clients, item: PairItem) -> ScoreOutcome: ...
