"""Per-scorer diagnostics of a run: failure rate, length bias, and position bias of pairwise judges.

- failure rate: items (responses, or comparisons for pairwise judges) without a result / items;
- length bias: Spearman correlation between a response's score and its length in tokens;
- position consistency: share of comparisons judged in both orders whose majority verdict survives the swap;
- first-position rate: share of decisive judgments (A or B) that chose the response shown first (0.5 = none).
"""

from __future__ import annotations

from typing import Any

import polars as pl


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def length_corr(values: pl.DataFrame, lengths: pl.DataFrame) -> float | None:
    """Spearman correlation of value and tokens over responses that have both; None under 3 or if constant."""
    df = values.join(lengths, on="response_id").drop_nulls(["value", "tokens"])
    if len(df) < 3 or df["value"].n_unique() < 2 or df["tokens"].n_unique() < 2:
        return None
    return _round(df.select(pl.corr("value", "tokens", method="spearman")).item())


def position_stats(comparisons: pl.DataFrame, verdicts: pl.DataFrame) -> dict[str, float | None]:
    """Over the comparisons that were combined (failed ones excluded, their judgments too)."""
    both = comparisons.filter(pl.col("consistent").is_not_null())
    decisive = verdicts.filter(pl.col("verdict").is_in(["A", "B"]),
                               pl.col("comparison_id").is_in(comparisons["comparison_id"].implode()))  # fmt: skip
    return {
        "position_consistency": _round(both["consistent"].mean()) if len(both) else None,  # type: ignore[arg-type]
        "first_position_rate": _round((decisive["verdict"] == "A").mean()) if len(decisive) else None,
    }


def pairwise_report(
    comparisons: pl.DataFrame, judgments: pl.DataFrame, orders: tuple[str, ...], calls_per_comparison: int
) -> dict[str, Any]:
    """Position bias and cost of a pairwise judge over its combined comparisons (for `prefsynth eval`)."""
    done = judgments.filter(pl.col("comparison_id").is_in(comparisons["comparison_id"].implode()))
    used = done.filter(pl.col("order").is_in(list(orders)))
    tokens = used.select(pl.col("prompt_tokens").fill_null(0) + pl.col("completion_tokens").fill_null(0)).sum().item()
    return {
        **position_stats(comparisons, done),
        "flipped": int(comparisons["flipped"].sum()),
        "dropped": int(comparisons["winner"].is_null().sum()),
        "repaired": int(done["repaired"].sum()),
        "calls_per_pair": calls_per_comparison,
        "tokens_per_pair": round(tokens / len(comparisons), 1) if len(comparisons) else None,
    }


def diagnostics(
    scorer_id: str, scorer: str, items: int, results: int, values: pl.DataFrame, lengths: pl.DataFrame,
    comparisons: pl.DataFrame | None = None, verdicts: pl.DataFrame | None = None,
) -> dict[str, Any]:  # fmt: skip
    failed = max(items - results, 0)
    row: dict[str, Any] = {
        "scorer_id": scorer_id,
        "scorer": scorer,
        "items": items,
        "failed": failed,
        "failure_rate": _round(failed / items) if items else None,
        "length_corr": length_corr(values, lengths),
        "position_consistency": None,
        "first_position_rate": None,
    }
    if comparisons is not None and verdicts is not None:
        row.update(position_stats(comparisons, verdicts))
    return row
