"""Train/test splits of an export, by prompt, seeded.

Each prompt gets a draw u in [0, 1): the first 52 bits of sha256("{seed}:{prompt_id}") over 2**52
(`warehouse/ids.split_draws`). The splits take the unit interval in the order train, validation, test: with
{train: 0.9, test: 0.1}, u < 0.9 is train and the rest test. So:
- all pairs of a prompt land in one split: no prompt is in two;
- the same seed gives the same split on any machine, and a prompt keeps its split as the dataset grows: its
  draw depends on its id and the seed only, never on the other prompts. Changing the fractions moves only
  the prompts whose draw lies between the old and the new boundary;
- the counts follow the fractions only on average (each prompt is drawn independently): a small dataset can
  have an empty split. The card states each split's pairs and prompts.
"""

from __future__ import annotations

import polars as pl

from prefsynth.schemas.config import Splits
from prefsynth.warehouse.ids import split_draws


def assign_splits(rows: pl.DataFrame, splits: Splits) -> pl.DataFrame:
    """`rows` (with prompt_id) and a `split` column."""
    if rows.is_empty():
        return rows.with_columns(split=pl.lit(None, pl.String))
    draws = split_draws(rows["prompt_id"], splits.seed)
    names = list(splits.fractions)
    bounds, total = [], 0.0
    for name in names[:-1]:
        total += splits.fractions[name]
        bounds.append((name, total))
    pick = pl.lit(names[-1])  # the last split takes the rest of [0, 1), whatever the float sum
    for name, bound in reversed(bounds):
        pick = pl.when(pl.col("draw") < bound).then(pl.lit(name)).otherwise(pick)
    return rows.join(draws.with_columns(split=pick).select("prompt_id", "split"), on="prompt_id", how="left",
                     maintain_order="left")


def split_file(file: str, split: str) -> str:
    """The file of one split: train.parquet -> test.parquet; openrlhf.jsonl -> openrlhf_test.jsonl (names that
    `datasets` and the Hub read as that split)."""
    stem, suffix = file.rsplit(".", 1)
    return f"{split}.{suffix}" if stem == "train" else f"{stem}_{split}.{suffix}"
