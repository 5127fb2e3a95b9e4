"""Human review of doubtful pairs: which pairs to send to people, and what their verdicts do. Pure polars.

Doubt of a curated pair (one run's `v_run_pairs`), from what the warehouse already holds (no model call):
- `agreement`: the share of the *other* scorers (each response's latest value per scorer in `scores`, pairwise
  judges' win shares included) that score the chosen response strictly above the rejected one. Low = doubtful.
  None when no other scorer scored both responses.
- `z_margin`: the calibrated margin, the pair's gap over the standard deviation of its scorer's values in the
  run (as curation's `{z: x}` margins measure it; a scorer without values in `scores`, e.g. a panel or the
  teacher, uses its values among the run's pairs). Small = doubtful.
- `flips`: pairwise comparisons of the two responses whose verdict reversed when the order was swapped
  (`comparisons.flipped`, any pairwise judge). Many = doubtful.
`--by auto` ranks by flips (most first) when the run has pairwise comparisons, then agreement (lowest first)
when it has other scorers, then z_margin (smallest first). `--by X` ranks by X, then by the other criteria in
that same order; the last tie-break is the pair id. Pairs people already labelled are not sent again.

Each task shows the two responses as `left` and `right`; the machine's chosen response is on the left or the
right by a seeded hash of the pair id (`--seed`), so reviewers cannot learn a position, and the same seed
gives the same sides. The mapping is stored (`review_tasks`) and each task carries its `task_id`.

Verdicts (`human_labels`, scorer `human`): per pair, each annotator's latest verdict counts once; skips do not
count. People prefer the chosen response (`chosen`), the rejected one (`rejected`), or neither (`tie`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import polars as pl

from prefsynth.errors import PrefsynthError
from prefsynth.schemas.records import HumanLabel, ReviewTask
from prefsynth.tasks.labelled import accuracy_report
from prefsynth.warehouse.ids import canonical_json, content_id, pair_id

CRITERIA = ("agreement", "margin", "flips", "auto")
TOOLS = ("argilla", "label-studio")
HUMAN_CONFIG = {"kind": "human"}
HUMAN_ID = content_id("scorer", HUMAN_CONFIG)  # the `human` scorer: one for every annotator and tool
# criterion -> (column, descending)
_KEYS = {"flips": ("flips", True), "agreement": ("agreement", False), "margin": ("z_margin", False)}


class ReviewError(PrefsynthError):
    """Bad review input: an unknown criterion or tool, a budget below 1, a file that is not a tool's export of
    a prefsynth review."""


def doubt(pairs: pl.DataFrame, values: pl.DataFrame, comparisons: pl.DataFrame) -> pl.DataFrame:
    """pairs (pair_id, chosen_id, rejected_id, scorer_id, score_chosen, score_rejected, margin) with agreement,
    z_margin, flips and comparisons added. values: response_id, scorer_id, value (each response's latest value
    per scorer, over the run's responses); comparisons: response_a_id, response_b_id, flipped."""
    base = pairs.select("pair_id", "chosen_id", "rejected_id", "scorer_id", "score_chosen", "score_rejected")
    vals = values.filter(pl.col("value").is_not_null() & pl.col("value").is_finite())
    others = (
        base.join(vals.rename({"response_id": "chosen_id", "scorer_id": "other", "value": "_c"}), on="chosen_id")
        .join(vals.rename({"response_id": "rejected_id", "scorer_id": "other", "value": "_r"}),
              on=["rejected_id", "other"])
        .filter(pl.col("other") != pl.col("scorer_id"))
        .group_by("pair_id").agg(agreement=(pl.col("_c") > pl.col("_r")).mean())
    )  # fmt: skip
    own = vals.group_by("scorer_id").agg(std=pl.col("value").std())
    ends = pl.concat([base.select("pair_id", "scorer_id", response_id="chosen_id", value="score_chosen"),
                      base.select("pair_id", "scorer_id", response_id="rejected_id", value="score_rejected")])
    fallback = ends.unique(["scorer_id", "response_id"]).group_by("scorer_id").agg(std_pairs=pl.col("value").std())
    std = pl.coalesce(pl.when(pl.col("std") > 0).then("std"), pl.when(pl.col("std_pairs") > 0).then("std_pairs"))
    ab = comparisons.select("response_a_id", "response_b_id", pl.col("flipped").cast(pl.Int64))
    either = pl.concat([ab.select(chosen_id="response_a_id", rejected_id="response_b_id", flipped="flipped"),
                        ab.select(chosen_id="response_b_id", rejected_id="response_a_id", flipped="flipped")])
    flips = either.group_by("chosen_id", "rejected_id").agg(flips=pl.col("flipped").sum(), comparisons=pl.len())
    out = (pairs.join(others, on="pair_id", how="left").join(own, on="scorer_id", how="left")
           .join(fallback, on="scorer_id", how="left").join(flips, on=["chosen_id", "rejected_id"], how="left"))
    margin = pl.col("score_chosen") - pl.col("score_rejected")
    return out.with_columns(
        z_margin=pl.when(std.is_not_null()).then(margin / std).otherwise(margin),
        flips=pl.col("flips").fill_null(0), comparisons=pl.col("comparisons").fill_null(0),
    ).drop("std", "std_pairs")  # fmt: skip


def check_by(by: str) -> None:
    """ReviewError for an unknown criterion."""
    if by not in CRITERIA:
        raise ReviewError(f"--by must be one of {', '.join(CRITERIA)}, got {by!r}")


def check_options(by: str, budget: int, tool: str) -> None:
    """ReviewError for an unknown criterion or tool, or a budget below 1."""
    check_by(by)
    if budget < 1:
        raise ReviewError(f"--budget must be at least 1, got {budget}")
    if tool not in TOOLS:
        raise ReviewError(f"--format must be one of {', '.join(TOOLS)}, got {tool!r}")


def rank(scored: pl.DataFrame, by: str) -> pl.DataFrame:
    """The pairs, most doubtful first (see the module's docs); ReviewError when the run lacks what `by` needs."""
    check_by(by)
    have = {"flips": bool(scored["comparisons"].sum()) if len(scored) else False,
            "agreement": scored["agreement"].is_not_null().any() if len(scored) else False, "margin": True}
    if by == "flips" and not have["flips"]:
        raise ReviewError("--by flips needs pairwise comparisons of the run's pairs (a pairwise judge); "
                          "this run has none: use --by margin, agreement or auto")  # fmt: skip
    if by == "agreement" and not have["agreement"]:
        raise ReviewError("--by agreement needs a second scorer that scored the pairs' responses; this run has "
                          "none: use --by margin, flips or auto")  # fmt: skip
    order = [c for c in ("flips", "agreement", "margin") if have[c]]
    if by != "auto":
        order = [by, *(c for c in order if c != by)]
    keys = [_KEYS[c][0] for c in order] + ["pair_id"]
    descending = [_KEYS[c][1] for c in order] + [False]
    return scored.sort(keys, descending=descending, nulls_last=True).with_row_index("rank", offset=1)


def chosen_side(seed: int, pid: str) -> str:
    """Where the machine's chosen response is shown: a seeded hash of the pair id, half left, half right."""
    return "left" if int(hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest(), 16) % 2 == 0 else "right"


def review_tasks(ranked: pl.DataFrame, budget: int, by: str, seed: int, tool: str, run_id: str) -> list[ReviewTask]:
    """The `budget` most doubtful pairs as tasks, with their sides and doubt."""
    check_options(by, budget, tool)
    top = ranked.head(budget)
    rid = content_id("review", run_id, top["pair_id"].to_list(), by, seed, tool)
    tasks = []
    for row in top.iter_rows(named=True):
        side = chosen_side(seed, row["pair_id"])
        left, right = ((row["chosen_id"], row["rejected_id"]) if side == "left"
                       else (row["rejected_id"], row["chosen_id"]))  # fmt: skip
        info = {"agreement": row["agreement"], "z_margin": row["z_margin"], "flips": row["flips"]}
        tasks.append(ReviewTask(task_id=content_id("review_task", rid, row["pair_id"]), review_id=rid,
                                pair_id=row["pair_id"], prompt_id=row["prompt_id"], left_id=left, right_id=right,
                                chosen_side=side, tool=tool, criterion=by, rank=row["rank"],
                                doubt=canonical_json(info)))  # fmt: skip
    return tasks


def labels(verdicts: list[dict[str, Any]], tasks: dict[str, dict[str, Any]], source: str, sha256: str,
           tool: str) -> list[HumanLabel]:  # fmt: skip
    """Human labels from a tool's verdicts (task_id, selected: left | right | tie | skip, annotator, labelled_at)
    and the stored tasks ({task_id: review_tasks row with the pair's chosen_id and rejected_id}). A label's id
    holds the file's SHA-256: the same file imported again adds nothing, while a newer export's verdicts are new
    rows even when the tool kept the time (an edited verdict changed back, or Argilla's records with no time)."""
    out = []
    for v in verdicts:
        task = tasks[v["task_id"]]
        picked = {"left": task["left_id"], "right": task["right_id"]}.get(v["selected"])
        verdict = v["selected"] if picked is None else ("chosen" if picked == task["chosen_id"] else "rejected")
        out.append(HumanLabel(
            label_id=content_id("human_label", sha256, v["task_id"], v["annotator"], verdict, v["labelled_at"]),
            task_id=v["task_id"], pair_id=task["pair_id"], prompt_id=task["prompt_id"],
            chosen_id=task["chosen_id"], rejected_id=task["rejected_id"], scorer_id=HUMAN_ID, verdict=verdict,
            preferred_id=picked, annotator=v["annotator"], labelled_at=v["labelled_at"], tool=tool,
            source_file=source, source_sha256=sha256))  # fmt: skip
    return out


def decisions(labelled: pl.DataFrame) -> pl.DataFrame:
    """Per pair of responses (a < b by id): the people's verdict. labelled: human_labels rows oldest first (as
    `Store.human_labels` orders them: by the tool's time, then by import). Each annotator's latest non-skip
    verdict counts once; the response with more votes wins, equal votes (ties included) make a tie. Columns: a,
    b, winner (the preferred response; None: a tie), votes_a, votes_b, votes (annotators whose verdict counts)."""
    schema = {"a": pl.String, "b": pl.String, "winner": pl.String, "votes_a": pl.UInt32, "votes_b": pl.UInt32,
              "votes": pl.UInt32}  # fmt: skip
    rows = labelled.filter(pl.col("verdict") != "skip")
    if rows.is_empty():
        return pl.DataFrame(schema=schema)
    rows = rows.with_columns(a=pl.min_horizontal("chosen_id", "rejected_id"),
                             b=pl.max_horizontal("chosen_id", "rejected_id"))  # fmt: skip
    latest = rows.with_row_index("_i").sort("_i").group_by("a", "b", "annotator", maintain_order=True).last()
    votes = latest.group_by("a", "b").agg(votes_a=(pl.col("preferred_id") == pl.col("a")).sum(),
                                          votes_b=(pl.col("preferred_id") == pl.col("b")).sum(), votes=pl.len())
    winner = (pl.when(pl.col("votes_a") > pl.col("votes_b")).then(pl.col("a"))
              .when(pl.col("votes_b") > pl.col("votes_a")).then(pl.col("b")))  # fmt: skip
    return votes.with_columns(winner=winner).select(list(schema)).sort("a", "b")


def human_override(pairs: pl.DataFrame, decided: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """Curated pairs after people's verdicts: kept when people agree, flipped (chosen and rejected swapped,
    scorer `human`, scores the share of votes) when they prefer the rejected response, dropped on a tie."""
    counts = {"human_confirmed": 0, "human_flipped": 0, "human_tie_dropped": 0}
    if decided.is_empty() or pairs.is_empty():
        return pairs, counts
    keyed = pairs.with_columns(a=pl.min_horizontal("chosen_id", "rejected_id"),
                               b=pl.max_horizontal("chosen_id", "rejected_id"))  # fmt: skip
    joined = keyed.join(decided, on=["a", "b"], how="left")
    tie = pl.col("votes").is_not_null() & pl.col("winner").is_null()
    flipped = pl.col("winner").is_not_null() & (pl.col("winner") != pl.col("chosen_id"))
    counts["human_tie_dropped"] = int(joined.select(tie.sum()).item())
    counts["human_flipped"] = int(joined.select(flipped.sum()).item())
    counts["human_confirmed"] = int(joined.select((pl.col("winner").is_not_null() & ~flipped).sum()).item())
    keep = joined.filter(~tie & ~flipped).select(list(pairs.columns))
    turned = joined.filter(flipped)
    rows = []
    for r in turned.iter_rows(named=True):
        mine = r["votes_a"] if r["rejected_id"] == r["a"] else r["votes_b"]  # the new chosen's votes
        share = mine / r["votes"]
        rule = {"rule": "human_override", "of": r["pair_id"], "scorer_id": HUMAN_ID}
        rows.append({**{k: r[k] for k in pairs.columns},
                     "pair_id": pair_id(r["rejected_id"], r["chosen_id"], rule, (share, 1 - share)),
                     "chosen_id": r["rejected_id"], "rejected_id": r["chosen_id"], "scorer_id": HUMAN_ID,
                     "rule": canonical_json(rule), "score_chosen": share, "score_rejected": 1 - share,
                     "margin": 2 * share - 1})  # fmt: skip
    flips = pl.DataFrame(rows, schema=pairs.schema) if rows else pl.DataFrame(schema=pairs.schema)
    return pl.concat([keep, flips]).sort("prompt_id", "chosen_id", "rejected_id"), counts


def human_accuracy(decided: pl.DataFrame, values: pl.DataFrame, scorers: pl.DataFrame) -> list[dict[str, Any]]:
    """Each machine scorer against the people's decided (non-tie) pairs, as `prefsynth eval` reports it: n,
    correct, accuracy (ties wrong), accuracy_ties_half, ties, failed (the scorer lacks a value of one side).
    values: response_id, scorer_id, value (latest); scorers: scorer_id, name of the scorers to report."""
    won = decided.filter(pl.col("winner").is_not_null()).with_columns(
        better="winner", worse=pl.when(pl.col("winner") == pl.col("a")).then(pl.col("b")).otherwise(pl.col("a")))
    out = []
    for sid, name in scorers.sort("name", "scorer_id").iter_rows():
        mine = dict(values.filter(pl.col("scorer_id") == sid).select("response_id", "value").iter_rows())
        rows = [("human", mine.get(b), mine.get(w)) for b, w in won.select("better", "worse").iter_rows()]
        report = accuracy_report(rows)
        report.pop("by_subset")
        out.append({"scorer": name, "scorer_id": sid, **report})
    return out

