"""Score one reply with one scorer, outside any flow: `prefsynth score-text`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefsynth.backends.local import LocalServers
from prefsynth.errors import ConfigError, PrefsynthError
from prefsynth.schemas.config import CDRSpec, ModelSpec, ScorerSpec, load_config
from prefsynth.schemas.records import Message
from prefsynth.tasks._async import run_async
from prefsynth.tasks.score import score_items
from prefsynth.tasks.scorers import PointwiseScorer, ScoreItem, build_scorer
from prefsynth.tasks.scorers.cdr import CDRScorer
from prefsynth.warehouse.ids import prompt_id

EMBEDDED_CDR = CDRSpec(strong=ModelSpec(gguf="smollm2-135m-instruct"), weak=ModelSpec(gguf="gemma3-270m-base"))


def pick_scorer(name_or_kind: str, config: Path | None) -> ScorerSpec:
    if config is None:
        if name_or_kind != "cdr":
            raise ConfigError(f"without --config only --scorer cdr (the embedded pair) works, not {name_or_kind!r}")
        return EMBEDDED_CDR
    specs = load_config(config).scorers
    for spec in specs:
        if name_or_kind in (spec.name, spec.kind):
            return spec
    raise ConfigError(f"{config} has no scorer named or of kind {name_or_kind!r}; have {[s.name for s in specs]}")


async def _score(scorer: PointwiseScorer, item: ScoreItem) -> dict[str, Any]:
    result = await score_items(scorer, [item])
    if result.failures:
        raise PrefsynthError(f"scoring failed: {result.failures[0].error}")
    (score,) = result.scores
    out: dict[str, Any] = {"scorer": scorer.name, "kind": scorer.kind, "scorer_id": scorer.scorer_id,
                           "value": score.value}  # fmt: skip
    if isinstance(scorer, CDRScorer):
        texts = scorer.texts(item)
        out.update(json.loads(score.details or "{}"))
        out.update(strong_context=texts["strong_context"], weak_context=texts["weak_context"],
                   continuation=texts["strong_continuation"], weak_continuation=texts["weak_continuation"])  # fmt: skip
    else:
        out.update(rationale=score.rationale, raw=score.raw)
    return out


def score_one(name_or_kind: str, prompt: str, response: str, config: Path | None) -> dict[str, Any]:
    spec = pick_scorer(name_or_kind, config)
    messages = [Message(role="user", content=prompt)]
    pid = prompt_id([m.model_dump() for m in messages])
    if spec.kind == "pairwise_judge":
        raise ConfigError(f"{spec.name!r} is a pairwise judge: it compares two replies; use `prefsynth eval` or a run")
    with LocalServers() as servers:
        scorer = build_scorer(spec, servers.endpoint)
        assert isinstance(scorer, PointwiseScorer)
        return run_async(_score(scorer, ScoreItem("score-text", "score-text", pid, messages, response)))
