"""Scoring backends, one module per kind (its config `Spec` and its scorer), behind `PointwiseScorer` or
`PairwiseScorer` (see base.py); registry.py finds them, and those of installed packages."""

from __future__ import annotations

from collections.abc import Callable

from prefsynth.backends.client import Endpoint
from prefsynth.schemas.config import ModelSpec, ScorerSpec
from prefsynth.tasks.scorers.base import PairItem, PairwiseScorer, PointwiseScorer, ScoreItem, ScoreOutcome, Scorer
from prefsynth.tasks.scorers.registry import scorer_class

__all__ = ["PairItem", "PairwiseScorer", "PointwiseScorer", "ScoreItem", "ScoreOutcome", "Scorer", "build_scorer"]


def build_scorer(spec: ScorerSpec, endpoint: Callable[[ModelSpec], Endpoint]) -> Scorer:
    """The scorer for a config entry, with `endpoint` turning each of its models into a ready endpoint."""
    return scorer_class(spec.kind)(spec, {role: endpoint(model) for role, model in spec.roles().items()})
