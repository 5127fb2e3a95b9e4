"""Scoring backends, one module per family, all behind `PointwiseScorer` (see base.py)."""

from __future__ import annotations

from prefsynth.backends.client import Endpoint
from prefsynth.schemas.config import ScorerSpec
from prefsynth.tasks.scorers.base import PointwiseScorer, ScoreItem, ScoreOutcome
from prefsynth.tasks.scorers.pointwise_judge import PointwiseJudge

__all__ = ["PointwiseScorer", "ScoreItem", "ScoreOutcome", "build_scorer"]


def build_scorer(spec: ScorerSpec, endpoint: Endpoint) -> PointwiseScorer:
    """The scorer for a config entry, bound to its model's endpoint."""
    if spec.kind == "pointwise_judge":
        return PointwiseJudge(spec, endpoint)
    raise ValueError(f"unknown scorer kind {spec.kind!r}")
