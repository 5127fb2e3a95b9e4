"""Scoring backends, one module per family, behind `PointwiseScorer` or `PairwiseScorer` (see base.py)."""

from __future__ import annotations

from collections.abc import Callable

from prefsynth.backends.client import Endpoint
from prefsynth.schemas.config import ModelSpec, ScorerSpec
from prefsynth.tasks.scorers.base import PairItem, PairwiseScorer, PointwiseScorer, ScoreItem, ScoreOutcome, Scorer
from prefsynth.tasks.scorers.cdr import CDRScorer
from prefsynth.tasks.scorers.pairwise_judge import PairwiseJudge
from prefsynth.tasks.scorers.pointwise_judge import PointwiseJudge
from prefsynth.tasks.scorers.reward_model import RewardModelScorer

__all__ = ["PairItem", "PairwiseScorer", "PointwiseScorer", "ScoreItem", "ScoreOutcome", "Scorer", "build_scorer"]


def build_scorer(spec: ScorerSpec, endpoint: Callable[[ModelSpec], Endpoint]) -> Scorer:
    """The scorer for a config entry, with `endpoint` turning its model specs into ready endpoints."""
    if spec.kind == "pointwise_judge":
        return PointwiseJudge(spec, endpoint(spec.model))
    if spec.kind == "pairwise_judge":
        return PairwiseJudge(spec, endpoint(spec.model))
    if spec.kind == "reward_model":
        return RewardModelScorer(spec, endpoint(spec.model) if spec.model is not None else None)
    if spec.kind == "cdr":
        router = spec.customization.router
        return CDRScorer(spec, endpoint(spec.strong), endpoint(spec.weak), endpoint(router) if router else None)
    raise ValueError(f"unknown scorer kind {spec.kind!r}")
