"""Panels: several scorers on the same responses -> one aggregate score, and how much the members agree.

Only responses every member scored take part. Members' values are z-scored over those responses, so a
CDR log-ratio and a 1-10 judge score are comparable.
- aggregate `mean_normalized`: the mean of the members' z-scores;
- aggregate `majority`: per prompt, each member votes for the higher of every two responses; a response
  scores its wins (+0.5 per draw) against the prompt's others (Copeland).
Agreement per prompt: Kendall tau-b between every two members' rankings, and Krippendorff's alpha
(interval, on z-scores) over the panel; overall: alpha over all responses and the mean tau.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import polars as pl

from prefsynth.tasks.agreement import copeland, kendall_tau, krippendorff_alpha, normalize
from prefsynth.warehouse.ids import content_id
from prefsynth.warehouse.store import frame


def panel_id(member_ids: list[str], aggregate: str) -> str:
    return content_id("panel", sorted(member_ids), aggregate)


def _wide(values: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """prompt_id, response_id and one value column per member, for responses every member scored."""
    wide = None
    for name, df in values.items():
        part = df.select("prompt_id", "response_id", pl.col("value").alias(name))
        wide = part if wide is None else wide.join(part, on=["prompt_id", "response_id"], how="inner")
    assert wide is not None
    return wide.drop_nulls().sort("prompt_id", "response_id")


def run_panel(
    values: dict[str, pl.DataFrame], pid: str, aggregate: str
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """values: {member name: prompt_id, response_id, value} -> (scores, agreement rows, summary)."""
    members = list(values)
    wide = _wide(values)
    z = {m: normalize(wide[m].to_list()) for m in members}
    wide = wide.with_columns(pl.Series(f"z_{m}", z[m], dtype=pl.Float64) for m in members)
    scores: list[dict[str, Any]] = []
    agreement: list[dict[str, Any]] = []
    taus: list[float] = []
    for (prompt,), group in wide.group_by(["prompt_id"], maintain_order=True):
        rids = group["response_id"].to_list()
        if aggregate == "majority":
            agg = copeland([group[m].to_list() for m in members])
        else:
            agg = [sum(row) / len(row) for row in group.select(f"z_{m}" for m in members).iter_rows()]
        scores += [{"panel_id": pid, "prompt_id": prompt, "response_id": r, "value": v} for r, v in
                   zip(rids, agg, strict=True)]  # fmt: skip
        for a, b in combinations(members, 2):
            tau = kendall_tau(group[a].to_list(), group[b].to_list())
            taus += [tau] if tau is not None else []
            agreement.append({"panel_id": pid, "prompt_id": prompt, "scorer_a": a, "scorer_b": b, "kendall_tau": tau,
                              "alpha": None})  # fmt: skip
        alpha = krippendorff_alpha(list(group.select(f"z_{m}" for m in members).iter_rows()))
        agreement.append({"panel_id": pid, "prompt_id": prompt, "scorer_a": "*", "scorer_b": "*", "kendall_tau": None,
                          "alpha": alpha})  # fmt: skip
    overall = krippendorff_alpha(list(wide.select(f"z_{m}" for m in members).iter_rows()))
    summary = {
        "panel_id": pid,
        "members": members,
        "prompts": wide["prompt_id"].n_unique(),
        "alpha": overall,
        "mean_tau": sum(taus) / len(taus) if taus else None,
    }
    return frame("panel_scores", scores), frame("panel_agreement", agreement), summary


def agreed_only(values: dict[str, pl.DataFrame], agreement: pl.DataFrame, least: float, panel: str
                ) -> tuple[dict[str, pl.DataFrame], int]:  # fmt: skip
    """The values of the prompts on which the panel's members agree (Krippendorff alpha >= `least`; an undefined
    alpha does not agree), and how many of the panel's prompts that leaves out."""
    ok = (pl.col("scorer_a") == "*") & pl.col("alpha").is_not_nan() & (pl.col("alpha") >= least)
    agreed = agreement.filter(ok)["prompt_id"].implode()
    kept = {n: v.filter(pl.col("prompt_id").is_in(agreed)) for n, v in values.items()}
    return kept, values[panel]["prompt_id"].n_unique() - kept[panel]["prompt_id"].n_unique()
