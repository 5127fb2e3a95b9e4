"""Curate: turn scores into chosen/rejected pairs by a rule. Pure polars; no model calls.

Rules (`curation.rule`, one or a list; every pair says its `source`):
- best_vs_worst (source sampled): over the sampled responses, as below.
- refined_vs_original (teacher_refinement): each kept teacher refinement against its parent, margin s_w - s_l
  on the teacher's calibrated 1-10 scale (kept: texts differ and the margin > teacher.min_gap).
- anchor_vs_sampled (teacher_anchor): the teacher's own answer against each sampled response of its prompt
  that the curation scorer scores lower (by min_margin, and > 0).

best_vs_worst: per prompt, the highest-scored response is chosen and the lowest rejected, when
chosen - rejected >= min_margin and > 0. Ties break by the smaller response id (deterministic).
Prompts with one scored response, or all scores equal, give no pair.

require_agreement: a pair is kept only if each named scorer also scores the chosen response strictly above
the rejected one (a scorer without a value for either response vetoes the pair).
"""

from __future__ import annotations

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from prefsynth.schemas.config import CurationSpec
from prefsynth.schemas.records import Refinement, columns
from prefsynth.warehouse.ids import canonical_json, pair_id


def rule_of(spec: CurationSpec, scorer_id: str, agree_ids: list[str] | None = None) -> dict[str, object]:
    rule: dict[str, object] = {"rule": "best_vs_worst", "min_margin": spec.min_margin, "scorer_id": scorer_id}
    if agree_ids:  # only when used, so pairs curated without it keep their ids
        rule["require_agreement"] = sorted(agree_ids)
    return rule


def best_vs_worst(
    scores: pl.DataFrame, scorer_id: str, spec: CurationSpec, agree: dict[str, pl.DataFrame] | None = None
) -> pl.DataFrame:
    """scores: prompt_id, response_id, value -> pairs (sorted by prompt_id).

    agree: {scorer_id: response_id, value} of the scorers that must agree on every pair.
    """
    agree = agree or {}
    rule = rule_of(spec, scorer_id, list(agree))
    rule_json = canonical_json(rule)
    order = ["value", "response_id"]
    grouped = (
        scores.lazy()
        .filter(pl.col("value").is_not_null() & pl.col("value").is_not_nan())
        .group_by("prompt_id")
        .agg(
            n=pl.len(),
            chosen_id=pl.col("response_id").sort_by(order, descending=[True, False]).first(),
            score_chosen=pl.col("value").max(),
            rejected_id=pl.col("response_id").sort_by(order, descending=[False, False]).first(),
            score_rejected=pl.col("value").min(),
        )
        .with_columns(margin=pl.col("score_chosen") - pl.col("score_rejected"))
        .filter((pl.col("n") >= 2) & (pl.col("margin") > 0) & (pl.col("margin") >= spec.min_margin))
        .sort("prompt_id")
        .collect()
    )
    for other in agree.values():
        vals = other.select("response_id", "value")
        grouped = (
            grouped.join(vals.rename({"response_id": "chosen_id", "value": "_c"}), on="chosen_id", how="left")
            .join(vals.rename({"response_id": "rejected_id", "value": "_r"}), on="rejected_id", how="left")
            .filter(pl.col("_c") > pl.col("_r"))
            .drop("_c", "_r")
            .sort("prompt_id")
        )
    ids = [pair_id(c, r, rule, (sc, sr)) for c, r, sc, sr in
           grouped.select("chosen_id", "rejected_id", "score_chosen", "score_rejected").iter_rows()]  # fmt: skip
    return grouped.with_columns(
        pair_id=pl.Series(ids, dtype=pl.String), scorer_id=pl.lit(scorer_id), rule=pl.lit(rule_json),
        source=pl.lit("sampled"),
    ).select(list(columns("pairs")))


@task(name="curate", cache_policy=NO_CACHE)
def curate(
    scores: pl.DataFrame, scorer_id: str, spec: CurationSpec, agree: dict[str, pl.DataFrame] | None = None
) -> pl.DataFrame:
    """Prefect task: pairs for a run's scored responses."""
    return best_vs_worst(scores, scorer_id, spec, agree)


def refined_vs_original(refinements: list[Refinement], teacher_id: str, min_gap: float) -> pl.DataFrame:
    """Each kept refinement (chosen) against its parent (rejected); margin = the teacher's s_w - s_l."""
    rule = {"rule": "refined_vs_original", "min_gap": min_gap, "scorer_id": teacher_id}
    rows = [{"pair_id": pair_id(r.response_id, r.parent_id, rule, (r.score_refined, r.score_parent)),
             "prompt_id": r.prompt_id, "chosen_id": r.response_id, "rejected_id": r.parent_id,
             "scorer_id": teacher_id, "rule": canonical_json(rule), "score_chosen": r.score_refined,
             "score_rejected": r.score_parent, "margin": r.margin, "source": "teacher_refinement"}
            for r in refinements if r.kept and r.score_refined is not None and r.margin is not None]  # fmt: skip
    return pl.DataFrame(rows, schema=columns("pairs")).unique("pair_id", maintain_order=True).sort("prompt_id")


def anchor_vs_sampled(anchors: pl.DataFrame, scores: pl.DataFrame, scorer_id: str, spec: CurationSpec) -> pl.DataFrame:
    """The teacher's anchor (chosen) against each sampled response of its prompt that the curation scorer
    scores lower, by at least min_margin (and > 0). anchors and scores: prompt_id, response_id, value."""
    rule = {"rule": "anchor_vs_sampled", "min_margin": spec.min_margin, "scorer_id": scorer_id}
    valid = pl.col("value").is_not_null() & pl.col("value").is_not_nan()
    joined = (
        anchors.filter(valid).rename({"response_id": "chosen_id", "value": "score_chosen"})
        .join(scores.filter(valid).rename({"response_id": "rejected_id", "value": "score_rejected"}), on="prompt_id")
        .with_columns(margin=pl.col("score_chosen") - pl.col("score_rejected"))
        .filter((pl.col("margin") > 0) & (pl.col("margin") >= spec.min_margin))
        .sort("prompt_id", "rejected_id")
    )
    ids = [pair_id(c, r, rule, (sc, sr)) for c, r, sc, sr in
           joined.select("chosen_id", "rejected_id", "score_chosen", "score_rejected").iter_rows()]  # fmt: skip
    return joined.with_columns(
        pair_id=pl.Series(ids, dtype=pl.String), scorer_id=pl.lit(scorer_id), rule=pl.lit(canonical_json(rule)),
        source=pl.lit("teacher_anchor"),
    ).select(list(columns("pairs")))
