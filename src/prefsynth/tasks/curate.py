"""Curate: turn scores into chosen/rejected pairs by a rule. Pure polars; no model calls.

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
from prefsynth.schemas.records import columns
from prefsynth.warehouse.ids import canonical_json, pair_id


def rule_of(spec: CurationSpec, scorer_id: str, agree_ids: list[str] | None = None) -> dict[str, object]:
    rule: dict[str, object] = {"rule": spec.rule, "min_margin": spec.min_margin, "scorer_id": scorer_id}
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
