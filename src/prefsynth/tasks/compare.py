"""Pairwise scoring in the pipeline: which pairs of responses to judge, and per-response values from verdicts.

Every two responses to a prompt are compared once (n responses: n(n-1)/2 comparisons), a being the one with
the smaller id; the engine plans a prompt's comparisons once all its responses are in. A response's value
is its mean share over its comparisons (win 1, tie 0.5, loss 0; comparisons dropped for flipping are left
out), written only once every comparison of its prompt is done, under an id that names its opponents:
adding a policy model gives new values, never stale ones.
"""

from __future__ import annotations

from itertools import combinations

import polars as pl

from prefsynth.schemas.records import Message
from prefsynth.tasks.scorers.base import PairItem
from prefsynth.warehouse.ids import content_id


def comparison_id(scorer_id: str, a: str, b: str) -> str:
    return content_id("comparison", scorer_id, a, b)


def prompt_pairs(scorer_id: str, prompt_id: str, messages: list[Message], responses: list[tuple[str, str]]) -> list[
        PairItem]:  # fmt: skip
    """Every two of a prompt's responses ((response_id, text)), a being the one with the smaller id."""
    return [PairItem(comparison_id(scorer_id, a[0], b[0]), prompt_id, messages, a, b)
            for a, b in combinations(sorted(responses), 2)]  # fmt: skip


def pairwise_values(responses: pl.DataFrame, comparisons: pl.DataFrame, scorer_id: str, scorer: str) -> pl.DataFrame:
    """Score rows (the scores table's columns) for the responses whose prompt has every comparison done.

    responses: response_id, prompt_id (a run's); comparisons: comparison_id, prompt_id, response_a_id,
    response_b_id, winner, score_a (among those responses). k responses of a prompt need k(k-1)/2.
    """
    k = responses.group_by("prompt_id").agg(pl.len().alias("k"))
    complete = (
        comparisons.group_by("prompt_id")
        .agg(pl.len().alias("done"), pl.col("comparison_id").sort().alias("opponents"))
        .join(k, on="prompt_id")
        .filter(pl.col("done") == pl.col("k") * (pl.col("k") - 1) // 2)
        .select("prompt_id", "opponents")
    )
    winner = pl.col("winner")

    def side(rid: str, share: pl.Expr, me: str) -> pl.DataFrame:
        outcome = (pl.when(winner.is_null()).then(pl.lit("dropped")).when(winner == me).then(pl.lit("wins"))
                   .when(winner == "tie").then(pl.lit("ties")).otherwise(pl.lit("losses")))  # fmt: skip
        return comparisons.select("prompt_id", pl.col(rid).alias("response_id"), share.alias("share"),
                                  outcome.alias("outcome"))  # fmt: skip

    sides = pl.concat([side("response_a_id", pl.col("score_a"), "a"),
                       side("response_b_id", 1 - pl.col("score_a"), "b")])  # fmt: skip
    counts = {name: (pl.col("outcome") == name).sum().cast(pl.Int64).alias(name)
              for name in ("dropped", "losses", "ties", "wins")}  # fmt: skip
    counted = pl.col("wins") + pl.col("ties") + pl.col("losses")
    tally = (
        sides.group_by("prompt_id", "response_id")
        .agg(pl.col("share").filter(pl.col("outcome") != "dropped").sum(), *counts.values())
        .join(complete, on="prompt_id")
        .filter(counted > 0)
        .sort("prompt_id", "response_id")
    )
    details = pl.concat_str([pl.lit("{"), *(e for i, name in enumerate(counts) for e in (
        pl.lit(f'{", " if i else ""}"{name}": '), pl.col(name).cast(pl.String))), pl.lit("}")])  # fmt: skip
    ids = [content_id("score", rid, scorer_id, list(opponents))
           for rid, opponents in tally.select("response_id", "opponents").iter_rows()]  # fmt: skip
    return tally.select(
        pl.Series("score_id", ids, dtype=pl.String), "response_id", pl.lit(scorer_id).alias("scorer_id"),
        pl.lit(scorer).alias("scorer"), (pl.col("share") / counted).alias("value"),
        pl.lit(None, pl.String).alias("rationale"), pl.lit("").alias("raw"),
        pl.lit([], pl.List(pl.String)).alias("call_ids"), details.alias("details"), "prompt_id",
    )  # fmt: skip
