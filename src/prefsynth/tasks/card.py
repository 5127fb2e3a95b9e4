"""The dataset card (README.md) of an export folder: what the file holds, and the unit of every gap and margin.

Units come from what the warehouse knows of each pair's scorer (the scorers table: name, kind, config JSON);
where it says nothing that fixes a unit, the card says "the scorer's own units".
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from prefsynth.tasks.margins import GROUP, TEACHER_SOURCES

FORMATS = {
    "trl": "TRL conversational preference with an explicit prompt: `prompt`, `chosen` and `rejected` are message "
           "lists (`chosen`/`rejected` one assistant message each); TRL's DPOTrainer and RewardTrainer read it",
    "jsonl": "TRL conversational preference as JSON lines: the columns of the `trl` format",
    "openrlhf": "OpenRLHF preference data: `chosen` and `rejected` are whole conversations (the prompt's messages "
                "and the answer); train with `--data.apply_chat_template --data.chosen_key chosen "
                "--data.rejected_key rejected` and no `--data.prompt_key`",
}  # fmt: skip
SOURCES = {
    "sampled": "a curation rule over sampled responses",
    "teacher_refinement": "a teacher's minimal edit of a response against that response",
    "teacher_anchor": "the teacher's own answer against a sampled response",
}
MODES = {
    "none": "There is no `margin` column: TRL's RewardTrainer and OpenRLHF train with the plain loss "
            "-logsigmoid(r_chosen - r_rejected).",
    "raw": "`margin` = `score_gap`, in the unit of each row's scorer (table above).",
    "scaled": "`margin` = `score_gap` divided by the largest `score_gap` among the rows of the same source and "
              "scorer (the divisor is in the table above): unitless, in (0, 1] for a positive gap.",
    "teacher": "Refinement pairs (source teacher_refinement) get the gap stored with the pair: the teacher's "
               "calibrated score difference s_w - s_l. Rows of other sources (anchors are scored by the curation "
               "scorer, not calibrated by the teacher) have no calibrated gap and "
               "get 0, which trains them with the plain loss.",
}  # fmt: skip


def score_unit(name: str, kind: str, config: dict[str, Any]) -> str:
    """The unit of a scorer's values (and so of a gap between two of them), from its stored config."""
    roles = set(config.get("models") or {})
    if "scale_min" in config and "scale_max" in config:
        return f"points on scorer `{name}`'s {config['scale_min']}–{config['scale_max']} scale"
    if kind == "teacher":
        return f"points on teacher `{name}`'s 1–10 scale (its score of the refinement minus the parent's)"
    if kind == "human":
        return "share (0–1) of the annotators who preferred the response (`prefsynth review import`)"
    if kind == "pairwise":
        return f"share (0–1) of its pairwise comparisons a response won, judged by scorer `{name}`"
    if {"strong", "weak"} <= roles and config.get("value") in ("mean", "sum"):
        per = "per token" if config["value"] == "mean" else "summed over tokens"
        return f"CDR log-ratio log p_strong - log p_weak {per}, of scorer `{name}`"
    if kind == "panel" and config.get("aggregate") == "mean_normalized":
        return f"mean z-score of panel `{name}`'s members"
    if kind == "panel" and config.get("aggregate") == "majority":
        return f"Copeland score (wins + 0.5 per draw against the prompt's other responses) of panel `{name}`"
    if "backend" in config:
        return f"reward-model output of scorer `{name}`"
    return f"scorer `{name}`'s own units"


def dataset_card(rows: pl.DataFrame, run_id: str | None, fmt: str, files: list[str], mode: str,
                 scorers: pl.DataFrame, others: list[str], splits: dict[str, Any] | None = None) -> str:  # fmt: skip
    """The card of `files`: `rows` are with_margins' output (source, scorer_id, score_gap), `scorers` the
    scorers table's rows of their scorers, `others` dataset files in the folder this card does not describe,
    `splits` an export's split record (export.Exported.splits)."""
    known = {r["scorer_id"]: r for r in scorers.iter_rows(named=True)}
    # No `configs:` in the metadata: datasets (5.2) caches a folder whose card lists configs by the folder's name
    # and the card alone, so `load_dataset(folder)` after a re-export there would return the earlier rows.
    lines = ["---", "tags:", "- prefsynth", "- preference", "---", "",
             f"# Preference pairs from prefsynth run `{run_id or '–'}`", "",
             f"{_names(files)} {_hold(files)} {len(rows)} pairs of run `{run_id or '–'}` in the `{fmt}` format: "
             f"{FORMATS[fmt]}.", ""]  # fmt: skip
    lines += _others(others) + _splits(splits, "pairs")
    lines += ["## Pairs per source", "", "| source | pairs | scorer | unit of `score_gap` | `margin` |",
              "|---|---|---|---|---|"]  # fmt: skip
    groups = rows.group_by(GROUP).agg(pl.len().alias("n"), pl.col("score_gap").max().alias("top")).sort(GROUP)
    for source, scorer_id, n, top in groups.iter_rows():
        scorer = known.get(scorer_id)
        if scorer is None:
            who, unit = f"`{scorer_id}`", "the scorer's own units"
        else:
            who = f"`{scorer['name']}` ({scorer['kind']}, id `{scorer_id}`)"
            unit = score_unit(scorer["name"], scorer["kind"], json.loads(scorer["config"]))
        lines.append(f"| {source} | {n} | {who} | {unit} | {_margin_cell(mode, source, top)} |")
    lines += ["", "## Columns", "",
              "- `score_gap` = `score_chosen` - `score_rejected`, in the unit of the row's scorer (table above). "
              "TRL and OpenRLHF do not read it; use it to filter or weight pairs.",
              "- `source`: where the pair comes from: "
              + "; ".join(f"`{s}`, {text}" for s, text in SOURCES.items()) + ".",
              "- `chosen_finish_reason`, `rejected_finish_reason`: `length` means the reply was cut off at "
              "max_tokens (curation pairs such replies only with `allow_truncated: true`).",
              "- `score_chosen`, `score_rejected`: the scorer's values of the two responses; the other columns "
              "(`pair_id`, `prompt_id`, `chosen_id`, `rejected_id`, `chosen_model`, `rejected_model`, "
              "`scorer_id`, `run_id`) trace each pair back to the warehouse.", "",
              f"## Margin mode: `{mode}`", "", MODES[mode]]  # fmt: skip
    if mode != "none":
        lines += ["", "Every row has a `margin`. TRL's RewardTrainer then trains with "
                  "-logsigmoid(r_chosen - r_rejected - margin), and so does OpenRLHF's reward-model training "
                  "with `--model.margin_loss_enable`: the reward model must separate each pair by at least its "
                  "margin, in reward units."]  # fmt: skip
    return "\n".join(lines) + "\n"


def sft_card(rows: pl.DataFrame, run_id: str | None, files: list[str], others: list[str],
             splits: dict[str, Any] | None = None) -> str:  # fmt: skip
    """The card of an `sft` export: `rows` are v_run_anchors rows (model, finish_reason)."""
    cut = rows.filter(pl.col("finish_reason") == "length").height if len(rows) else 0
    models = ", ".join(f"`{m}`" for m in sorted(set(rows["model"].to_list()))) if len(rows) else "–"
    lines = ["---", "tags:", "- prefsynth", "- sft", "---", "",
             f"# SFT targets from prefsynth run `{run_id or '–'}`", "",
             f"{_names(files)} {_hold(files)} {len(rows)} answers of the run's teacher ({models}) to the run's "
             "prompts, in TRL's conversational prompt-completion format: `prompt` is a message list and "
             "`completion` one assistant message. TRL's SFTTrainer reads it and by default trains on the "
             "completion only.", ""]  # fmt: skip
    lines += _others(others) + _splits(splits, "answers")
    lines += ["## Columns", "",
              "- `source`: `teacher_anchor`, the teacher's own answer to the prompt (`model`).",
              f"- `finish_reason`: `length` means the answer was cut off at the teacher's `max_tokens` ({cut} of "
              f"{len(rows)} here); filter them out, or raise `teacher.max_tokens`.",
              "- `prompt_id`, `response_id`, `run_id` trace each row back to the warehouse."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _names(files: list[str]) -> str:
    names = [f"`{f}`" for f in files]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _hold(files: list[str]) -> str:
    return "holds" if len(files) == 1 else "hold"


def _splits(splits: dict[str, Any] | None, what: str) -> list[str]:
    """The splits section: how rows were split, and each split's file, rows and prompts."""
    if splits is None:
        return []
    lines = ["## Splits", "",
             f"Split by prompt with seed {splits['seed']}: every {what[:-1]} of a prompt is in one split, so no "
             "prompt is in two. A prompt's split is drawn from the first 52 bits of "
             f"sha256(\"{splits['seed']}:<prompt_id>\"): the same seed gives the same split, and a prompt keeps its "
             "split as the dataset grows. Each prompt is drawn independently, so the shares follow the fractions "
             "only on average.", "",
             f"| split | file | {what} | prompts | fraction asked |", "|---|---|---|---|---|"]  # fmt: skip
    for name, part in splits["files"].items():
        lines.append(f"| {name} | `{part['file']}` | {part['rows']} | {part['prompts']} | "
                     f"{splits['fractions'][name]:g} |")  # fmt: skip
    return [*lines, "", "`datasets.load_dataset(\"<this folder>\")` reads these files as a DatasetDict with these "
            "splits (the file names say which).", ""]  # fmt: skip


def _others(others: list[str]) -> list[str]:
    if not others:
        return []
    return [f"Other files here ({', '.join(f'`{o}`' for o in others)}) come from other exports; "
            "this card does not describe them.", ""]  # fmt: skip


def _margin_cell(mode: str, source: str, top: float | None) -> str:
    if mode == "none":
        return "none"
    if mode == "raw":
        return "= `score_gap`"
    if mode == "scaled":
        return f"`score_gap` / {top:g}" if top is not None and top > 0 else "0 (no positive gap)"
    return "the teacher's calibrated gap s_w - s_l" if source in TEACHER_SOURCES else "0 (no calibrated gap)"
