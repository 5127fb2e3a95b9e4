"""Scoring backends, one module per family, all behind `PointwiseScorer` (see base.py)."""

from __future__ import annotations

from collections.abc import Callable

from prefsynth.backends.client import Endpoint
from prefsynth.schemas.config import ModelSpec, ScorerSpec
from prefsynth.tasks.scorers.base import PointwiseScorer, ScoreItem, ScoreOutcome
from prefsynth.tasks.scorers.cdr import CDRScorer
from prefsynth.tasks.scorers.pointwise_judge import PointwiseJudge

__all__ = ["PointwiseScorer", "ScoreItem", "ScoreOutcome", "build_scorer"]


def build_scorer(spec: ScorerSpec, endpoint: Callable[[ModelSpec], Endpoint]) -> PointwiseScorer:
    """The scorer for a config entry, with `endpoint` turning its model specs into ready endpoints."""
    if spec.kind == "pointwise_judge":
        return PointwiseJudge(spec, endpoint(spec.model))
    if spec.kind == "cdr":
        router = spec.customization.router
        return CDRScorer(spec, endpoint(spec.strong), endpoint(spec.weak), endpoint(router) if router else None)
    raise ValueError(f"unknown scorer kind {spec.kind!r}")
