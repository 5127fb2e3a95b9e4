"""Margins for margin-aware reward training: written only when chosen.

TRL's RewardTrainer trains with `loss = -logsigmoid(r_chosen - r_rejected - margin)` whenever a `margin` column
is present (OpenRLHF does too, with `--model.margin_loss_enable`), so a margin changes the objective. Every
row keeps the raw gap as `score_gap` (= score_chosen - score_rejected), a name neither trainer reads; `margin`
comes from the export's mode:
- `none` (default): no `margin` column, the plain Bradley-Terry objective;
- `raw`: score_gap, in the units of the pair's scorer;
- `scaled`: score_gap divided by the largest score_gap among the export's rows of the same source and scorer,
  so curated pairs (positive gaps) get margins in (0, 1]; a group whose largest gap is not positive gets 0;
- `teacher`: refinement pairs get the gap stored with the pair (the teacher's calibrated s_w - s_l); rows of
  other sources, anchors included (the curation scorer scores them), get 0 (no calibrated gap: 0 trains them
  with the plain objective). An export with no refinement pair is refused.
Every row gets a value, never null: TRL's collator decides from a batch's first row whether margins exist.
"""

from __future__ import annotations

from typing import get_args

import polars as pl

from prefsynth.errors import ExportError
from prefsynth.schemas.config import MarginMode

MARGIN_MODES: tuple[str, ...] = get_args(MarginMode)
TEACHER_SOURCES = ("teacher_refinement",)  # the pairs whose stored margin is the teacher's calibrated s_w - s_l
GROUP = ("source", "scorer_id")  # rows in one unit: `scaled` divides within these


def with_margins(rows: pl.DataFrame, mode: str) -> pl.DataFrame:
    """v_run_pairs rows with `score_gap` added and `margin` (the pair's stored gap) replaced by the mode's
    value, or dropped for `none`. ExportError for `teacher` on rows without teacher pairs."""
    if mode not in MARGIN_MODES:
        raise ValueError(f"unknown margin mode {mode!r}; use one of {', '.join(MARGIN_MODES)}")
    rows = rows.with_columns((pl.col("score_chosen") - pl.col("score_rejected")).alias("score_gap"))
    if mode == "none":
        return rows.drop("margin")
    if mode == "raw":
        margin = pl.col("score_gap")
    elif mode == "scaled":
        top = pl.col("score_gap").max().over(GROUP)
        margin = pl.when(top > 0).then(pl.col("score_gap") / top).otherwise(0.0)
    else:
        _require_teacher_pairs(rows)
        margin = pl.when(pl.col("source").is_in(TEACHER_SOURCES)).then(pl.col("margin")).otherwise(0.0)
    return rows.with_columns(margin.cast(pl.Float64).alias("margin"))


def _require_teacher_pairs(rows: pl.DataFrame) -> None:
    if rows.is_empty() or rows["source"].is_in(TEACHER_SOURCES).any():
        return
    counts = rows.group_by("source").len().sort("source")
    found = ", ".join(f"{n} {source}" for source, n in counts.iter_rows())
    raise ExportError(f"margin mode 'teacher' needs teacher pairs (source {' or '.join(TEACHER_SOURCES)}), "
                      f"but this export's pairs are: {found}; choose the margin mode raw, scaled or none")  # fmt: skip
