"""Score replies with one scorer, outside any flow and warehouse: `prefsynth score-text` and `prefsynth.score`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from prefsynth.backends.local import LocalServers
from prefsynth.errors import ConfigError, PrefsynthError
from prefsynth.schemas.config import ModelSpec, ScorerSpec, load_config
from prefsynth.schemas.records import Comparison, Failure, Message, Score
from prefsynth.tasks._async import run_async
from prefsynth.tasks.score import score_items
from prefsynth.tasks.scorers import PairItem, PairwiseScorer, PointwiseScorer, ScoreItem, build_scorer
from prefsynth.tasks.scorers.cdr import CDRScorer, CDRSpec
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
    if result.of(Failure):
        raise PrefsynthError(f"scoring failed: {result.of(Failure)[0].error}")
    (score,) = result.of(Score)
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
    if spec.compares:
        raise ConfigError(f"{spec.name!r} is a pairwise judge: it compares two replies; use `prefsynth eval` or a run")
    with LocalServers() as servers:
        scorer = build_scorer(spec, servers.endpoint)
        assert isinstance(scorer, PointwiseScorer)
        return run_async(_score(scorer, ScoreItem("score-text", "score-text", pid, messages, response)))


def _messages(prompt: Any, where: str) -> list[Message]:
    if isinstance(prompt, str) and prompt.strip():
        return [Message(role="user", content=prompt)]
    if isinstance(prompt, list) and prompt:
        try:
            return [m if isinstance(m, Message) else Message(**m) for m in prompt]
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"{where}: `prompt` must be a non-empty text or a list of {{role, content}} messages")


def _fields(item: Any, names: tuple[str, ...], where: str) -> list[Any]:
    """The item's values for `names`: from a mapping by name, or a tuple/list by position."""
    if isinstance(item, dict):
        missing = [n for n in names if n not in item]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)} (needs {', '.join(names)})")
        values = [item[n] for n in names]
    elif isinstance(item, tuple | list) and len(item) == len(names):
        values = list(item)
    else:
        raise ConfigError(f"{where}: expected ({', '.join(names)}), as a tuple or a mapping")
    if not all(isinstance(v, str) for v in values[1:]):
        raise ConfigError(f"{where}: {', '.join(names[1:])} must be texts")
    return values


def score_batch(spec: ScorerSpec, rows: Sequence[Any]) -> pl.DataFrame:
    """One row per item, in order (see `prefsynth.score`)."""
    with LocalServers() as servers:
        scorer = build_scorer(spec, servers.endpoint)
        pairwise = isinstance(scorer, PairwiseScorer)
        names = ("prompt", "a", "b") if pairwise else ("prompt", "response")
        items: list[Any] = []
        for i, row in enumerate(rows):
            prompt, *texts = _fields(row, names, f"items[{i}]")
            messages = _messages(prompt, f"items[{i}]")
            pid = prompt_id([m.model_dump() for m in messages])
            if pairwise:
                items.append(PairItem(str(i), pid, messages, (f"a{i}", texts[0]), (f"b{i}", texts[1])))
            else:
                items.append(ScoreItem(str(i), f"r{i}", pid, messages, texts[0]))
        result = run_async(score_items(scorer, items))
    errors = {f.item_id: f.error for f in result.of(Failure)}
    out: list[dict[str, Any]] = []
    if pairwise:
        comps = {c.comparison_id: c for c in result.of(Comparison)}
        for i in range(len(items)):
            c = comps.get(str(i))
            out.append({"index": i, "winner": c.winner if c else None, "score_a": c.score_a if c else None,
                        "consistent": c.consistent if c else None, "flipped": c.flipped if c else None,
                        "error": errors.get(str(i))})  # fmt: skip
        schema = {"index": pl.Int64, "winner": pl.String, "score_a": pl.Float64, "consistent": pl.Boolean,
                  "flipped": pl.Boolean, "error": pl.String}  # fmt: skip
    else:
        scores = {s.score_id: s for s in result.of(Score)}
        for i in range(len(items)):
            s = scores.get(str(i))
            out.append({"index": i, "value": s.value if s else None, "rationale": s.rationale if s else None,
                        "error": errors.get(str(i))})  # fmt: skip
        schema = {"index": pl.Int64, "value": pl.Float64, "rationale": pl.String, "error": pl.String}
    return pl.DataFrame(out, schema=schema)
