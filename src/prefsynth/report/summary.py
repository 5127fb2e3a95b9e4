"""The report's numbers, in polars: per scorer, per pairwise judge, per curation step, and the lengths of chosen
against rejected before and after length control. Also what the flow publishes as Prefect artifacts (a table and a
markdown report). Nothing here draws (no matplotlib import): the flow uses it too.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from prefsynth.tasks.curate import length_profile
from prefsynth.warehouse.report import ReportData

# curation steps in the order they run: (key in the run summary, what it counts, what it is)
STEPS = (
    ("left_out_prompts", "prompts", "duplicate or contaminated prompts left out"),
    ("panel_disagreement", "prompts", "prompts below min_panel_agreement"),
    ("truncated_responses", "responses", "replies cut off at max_tokens"),
    ("prompts_without_two", "prompts", "prompts without two usable replies"),
    ("below_margin", "pairs", "below the margin"),
    ("length_ratio", "pairs", "over max_length_ratio"),
    ("disagreement", "pairs", "other scorers disagree"),
    ("over_cap", "pairs", "over max_pairs_per_prompt"),
    ("same_text", "pairs", "chosen and rejected texts the same"),
)


def labelled(frame: pl.DataFrame) -> pl.DataFrame:
    """`label`: the scorer's name, with its id's start where two scorers of the run share a name."""
    if frame.is_empty():
        return frame.with_columns(label=pl.col("scorer"))
    shared = pl.col("scorer_id").n_unique().over("scorer") > 1
    with_id = pl.format("{} ({})", "scorer", pl.col("scorer_id").str.head(8))
    return frame.with_columns(label=pl.when(shared).then(with_id).otherwise(pl.col("scorer")))


def scorer_table(data: ReportData) -> pl.DataFrame:
    """Per scorer: kind, responses, mean, std, min, median, max of its values, and the Spearman correlation of
    value and reply length (tokens)."""
    scores = labelled(data.scores)
    return (scores.group_by("label", "kind").agg(
        responses=pl.len(), mean=pl.col("value").mean(), std=pl.col("value").std(), min=pl.col("value").min(),
        median=pl.col("value").median(), max=pl.col("value").max(),
        length_corr=pl.corr("value", "tokens", method="spearman"))
        .with_columns(pl.col("mean", "std", "min", "median", "max", "length_corr").round(4).fill_nan(None))
        .sort("label"))  # fmt: skip


def judge_table(data: ReportData) -> pl.DataFrame:
    """Per pairwise judge: comparisons, position consistency (verdict survives the swap), first-position rate,
    and the shares of flipped and tied comparisons."""
    diag = data.diagnostics.select("scorer", "position_consistency", "first_position_rate")
    per = data.comparisons.group_by("scorer").agg(
        comparisons=pl.len(), flipped=pl.col("flipped").mean(), ties=(pl.col("winner") == "tie").mean())
    return per.join(diag, on="scorer", how="left").select(
        "scorer", "comparisons", "position_consistency", "first_position_rate",
        pl.col("flipped").round(4), pl.col("ties").round(4)).sort("scorer")  # fmt: skip


def panel_taus(data: ReportData) -> pl.DataFrame:
    """Per panel and pair of members: the mean Kendall tau over prompts (where defined)."""
    members = data.agreement.filter(pl.col("scorer_a") != "*")
    return (members.group_by("panel", "scorer_a", "scorer_b").agg(mean_tau=pl.col("kendall_tau").mean(),
                                                                   prompts=pl.col("kendall_tau").count())
            .sort("panel", "scorer_a", "scorer_b"))  # fmt: skip


def prompt_alphas(data: ReportData) -> pl.DataFrame:
    """panel, prompt_id, alpha: each prompt's Krippendorff alpha over the whole panel (where defined)."""
    return data.agreement.filter((pl.col("scorer_a") == "*") & pl.col("alpha").is_not_null()).select(
        "panel", "prompt_id", "alpha")


def steps(data: ReportData) -> pl.DataFrame:
    """step, unit, what, removed: what each curation filter removed (steps the run did not take are left out).
    Empty while the run has no summary yet."""
    counts = data.summary.get("curation") or {}
    rows = [{"step": key, "unit": unit, "what": what, "removed": int(counts[key])}
            for key, unit, what in STEPS if key in counts]  # fmt: skip
    return pl.DataFrame(rows, schema={"step": pl.String, "unit": pl.String, "what": pl.String, "removed": pl.Int64})


def pair_funnel(data: ReportData) -> pl.DataFrame:
    """step, left, removed: the rule's candidate pairs, then what is left after each pair filter."""
    counts = data.summary.get("curation") or {}
    if "candidates" not in counts:
        return pl.DataFrame(schema={"step": pl.String, "left": pl.Int64, "removed": pl.Int64})
    keys = ["candidates", *(k for k, unit, _ in STEPS if unit == "pairs" and k in counts)]
    removed = [0, *(int(counts[k]) for k in keys[1:])]
    frame = pl.DataFrame({"step": keys, "removed": removed})
    return frame.with_columns(left=int(counts["candidates"]) - pl.col("removed").cum_sum()).select(
        "step", "left", "removed")


def lengths(data: ReportData) -> dict[str, Any]:
    """{"length_control", "before", "after"}: `length_profile`s of the sampled pairs. `after` is computed from the
    run's pairs; `before` (the same rule without length control) is what curation recorded in the run's summary
    (None for runs made before it did). length_control: the run's curation had max_length_ratio or length_matched."""
    sampled = data.pairs.filter(pl.col("source") == "sampled")
    recorded = data.summary.get("lengths") or {}
    control = bool(recorded.get("length_control")) or bool(sampled["length_controlled"].any())
    return {"length_control": control, "before": recorded.get("before"), "after": length_profile(sampled)}


def length_rows(lens: dict[str, Any]) -> pl.DataFrame:
    """One row for the pairs before length control (when the run had it) and one for the pairs kept."""
    cols = ("pairs", "with_lengths", "chosen_median", "rejected_median", "chosen_longer")
    shown = (("before length control", lens["before"] if lens["length_control"] else None), ("kept", lens["after"]))
    return pl.DataFrame([{"set": name, **{c: prof.get(c) for c in cols}} for name, prof in shown if prof],
                        schema={"set": pl.String, "pairs": pl.Int64, "with_lengths": pl.Int64,
                                "chosen_median": pl.Float64, "rejected_median": pl.Float64,
                                "chosen_longer": pl.Float64})  # fmt: skip


def artifact_table(data: ReportData) -> list[dict[str, Any]]:
    """The Prefect table artifact: one row per scorer (its value distribution and length correlation), with the
    position consistency of pairwise judges."""
    judges = judge_table(data).select("scorer", "position_consistency", "first_position_rate")
    table = scorer_table(data).join(judges.rename({"scorer": "label"}), on="label", how="left")
    return table.rename({"label": "scorer"}).to_dicts()


def _cell(value: object) -> str:
    """Text for a markdown table cell: numbers rounded, no pipe or newline breaks the table."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(frame: pl.DataFrame) -> list[str]:
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    return [head, rule, *("| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.iter_rows())]


def markdown(data: ReportData) -> str:
    """The Prefect markdown artifact: the report's numbers as text (the HTML page has the plots)."""
    run = data.run
    out = [f"# Report of run {run['run_id']} ({_cell(run['name'])})", "",
           f"Status {run['status']}; {run['prompts']} prompts; {len(data.pairs)} pairs. The HTML page with plots: "
           f"`prefsynth report --run {run['run_id']} --out report.html`.", "", "## Scorers", ""]  # fmt: skip
    out += _md_table(scorer_table(data)) if not data.scores.is_empty() else ["No scores."]
    out += ["", "## Margins of the curated pairs", ""]
    margins = data.pairs.group_by("source", "scorer").agg(
        pairs=pl.len(), mean=pl.col("margin").mean(), min=pl.col("margin").min(),
        max=pl.col("margin").max()).sort("source", "scorer")  # fmt: skip
    out += _md_table(margins) if not margins.is_empty() else ["No pairs."]
    out += ["", "## Length of chosen against rejected (tokens)", ""]
    lens = lengths(data)
    out += _md_table(length_rows(lens))
    if not lens["length_control"]:
        out += ["", "This run's curation has no length control (max_length_ratio, length_matched)."]
    out += ["", "## Pairwise judges", ""]
    judges = judge_table(data)
    out += _md_table(judges) if not judges.is_empty() else ["No pairwise judge in this run."]
    out += ["", "## Panels", ""]
    out += _md_table(data.panels.with_columns(pl.col("members").list.join(", "))) if not data.panels.is_empty() \
        else ["No panel in this run."]  # fmt: skip
    out += ["", "## Curation filters", ""]
    table = steps(data)
    out += _md_table(table) if not table.is_empty() else ["The run has not finished: no curation counts yet."]
    return "\n".join(out) + "\n"
