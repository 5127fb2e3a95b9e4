"""Export: pairs -> a Hugging Face `datasets.Dataset` in TRL's conversational preference format.

Columns: `prompt` (message list), `chosen` and `rejected` (one assistant message each),
`score_chosen`, `score_rejected`, `margin`, and provenance (`pair_id`, `prompt_id`, `chosen_id`,
`rejected_id`, `chosen_model`, `rejected_model`, `scorer_id`, `run_id`). `trl` writes train.parquet,
`jsonl` writes train.jsonl; both load with `datasets` and feed TRL's DPOTrainer/RewardTrainer directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from prefsynth.errors import ExportError
from prefsynth.warehouse.ids import content_id

MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})
FILES = {"trl": "train.parquet", "jsonl": "train.jsonl"}
PROVENANCE = ["pair_id", "prompt_id", "chosen_id", "rejected_id", "chosen_model", "rejected_model",
              "scorer_id", "run_id"]  # fmt: skip


@dataclass
class Exported:
    path: Path
    format: str
    n_pairs: int
    snapshot_id: str


def _assistant(col: str) -> pl.Expr:
    return pl.concat_list(pl.struct(role=pl.lit("assistant"), content=pl.col(col)))


def to_trl(rows: pl.DataFrame) -> pl.DataFrame:
    """v_run_pairs rows -> TRL conversational preference columns."""
    if rows.is_empty():
        empty = {"prompt": pl.List(MESSAGE), "chosen": pl.List(MESSAGE), "rejected": pl.List(MESSAGE),
                 "score_chosen": pl.Float64, "score_rejected": pl.Float64, "margin": pl.Float64}  # fmt: skip
        return pl.DataFrame(schema={**empty, **dict.fromkeys(PROVENANCE, pl.String)})
    return rows.sort("prompt_id", "pair_id").select(
        pl.col("prompt_messages").str.json_decode(pl.List(MESSAGE)).alias("prompt"),
        _assistant("chosen_text").alias("chosen"),
        _assistant("rejected_text").alias("rejected"),
        "score_chosen",
        "score_rejected",
        "margin",
        *PROVENANCE,
    )


def write_dataset(rows: pl.DataFrame, out_dir: str | Path, fmt: str, overwrite: bool = False) -> Exported:
    """Write `rows` to out_dir/train.parquet (trl) or train.jsonl (jsonl); an existing one only if `overwrite`."""
    import datasets

    if fmt not in FILES:
        raise ValueError(f"unknown export format {fmt!r}; use one of {sorted(FILES)}")
    path = _target(Path(out_dir), FILES[fmt], overwrite)
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_polars(to_trl(rows))
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "trl":
        ds.to_parquet(str(tmp))
    else:
        ds.to_json(str(tmp), lines=True, force_ascii=False)
    tmp.replace(path)  # a reader never sees a half-written file
    snapshot = content_id("snapshot", sorted(rows["pair_id"].to_list()) if len(rows) else [], fmt)
    return Exported(path=path, format=fmt, n_pairs=len(ds), snapshot_id=snapshot)


def _target(out: Path, name: str, overwrite: bool) -> Path:
    """out/name, with out created; ExportError if out is not a folder or holds `name` and not `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"cannot export to {out}: it is a file, not a folder; choose another output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the export folder {out}: {err.strerror} ({err.filename})") from None
    path = out / name
    if path.exists() and not overwrite:
        raise ExportError(f"{out} already holds a dataset ({path}); pass --overwrite to replace it, "
                          "or choose another output folder")  # fmt: skip
    return path


@task(name="export", cache_policy=NO_CACHE)
def export(rows: pl.DataFrame, out_dir: str, fmt: str, overwrite: bool = False) -> Exported:
    """Prefect task: write one export target."""
    return write_dataset(rows, out_dir, fmt, overwrite)
