"""The scorer interface every scoring backend plugs into.

A scorer has an id (hash of what determines its values: config and model identity), a kind
("pointwise": one value per response), and scores one item with the model calls it needs. Curation
reads scores by scorer id, so scorers live side by side and new curation rules never re-call a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prefsynth.backends.client import Endpoint, ModelClient
from prefsynth.schemas.records import Failure, Message, ModelCall, Score
from prefsynth.warehouse.ids import canonical_json, scorer_id


@dataclass(frozen=True)
class ScoreItem:
    score_id: str
    response_id: str
    messages: list[Message]
    response: str


@dataclass
class ScoreOutcome:
    score: Score | None = None
    failure: Failure | None = None
    calls: list[ModelCall] = field(default_factory=list)  # calls actually made (cache hits excluded)


class PointwiseScorer(ABC):
    """One value per response."""

    kind: ClassVar[str] = "pointwise"

    def __init__(self, name: str, endpoint: Endpoint) -> None:
        self.name = name
        self.endpoint = endpoint

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything that determines the values (not names, ports or concurrency)."""

    @property
    def scorer_id(self) -> str:
        return scorer_id({"kind": self.kind, "model": self.endpoint.identity, **self.identity()})

    @property
    def config_json(self) -> str:
        return canonical_json({"kind": self.kind, "model": self.endpoint.identity, **self.identity()})

    @abstractmethod
    def first_request(self, client: ModelClient, item: ScoreItem) -> dict[str, Any]:
        """The body of the first call for an item (lets the task fetch cached answers in bulk)."""

    @abstractmethod
    async def score(self, client: ModelClient, item: ScoreItem, known: Mapping[str, str]) -> ScoreOutcome:
        """Score one item; failures are returned, never raised."""
