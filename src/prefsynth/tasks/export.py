"""Export: pairs -> a Hugging Face `datasets.Dataset` file and its dataset card (README.md) in one folder.

Formats (file):
- `trl` (train.parquet), `jsonl` (train.jsonl): TRL's conversational preference format, `prompt` (message
  list), `chosen` and `rejected` (one assistant message each); TRL's DPOTrainer/RewardTrainer read it.
- `openrlhf` (openrlhf.jsonl): what OpenRLHF's RewardDataset reads with `--data.apply_chat_template` and no
  prompt key: `chosen` and `rejected` are whole conversations (prompt messages + the answer).
Then, in all three: `margin` (only with a margin mode, see margins.py), `source`, `score_gap`, `score_chosen`,
`score_rejected`, `chosen_finish_reason`, `rejected_finish_reason` (`length`: cut off at max_tokens) and
provenance (`pair_id`, `prompt_id`, `chosen_id`, `rejected_id`, `chosen_model`, `rejected_model`, `scorer_id`,
`run_id`).
- `sft` (sft.jsonl): not pairs but the teacher's anchors (its own answers) as SFT targets, in TRL's
  conversational prompt-completion format: `prompt` (message list), `completion` (one assistant message),
  then `source`, `finish_reason`, `model`, `prompt_id`, `response_id`, `run_id`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from prefsynth.errors import ExportError
from prefsynth.tasks.card import dataset_card, sft_card
from prefsynth.tasks.margins import with_margins
from prefsynth.warehouse.ids import content_id
from prefsynth.warehouse.store import export_view

MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})
FILES = {"trl": "train.parquet", "jsonl": "train.jsonl", "openrlhf": "openrlhf.jsonl", "sft": "sft.jsonl"}
CARD = "README.md"
PROVENANCE = ["pair_id", "prompt_id", "chosen_id", "rejected_id", "chosen_model", "rejected_model",
              "scorer_id", "run_id"]  # fmt: skip
FINISH = ["chosen_finish_reason", "rejected_finish_reason"]  # `length`: the reply was cut off at max_tokens
SCORERS = pl.DataFrame(schema={"scorer_id": pl.String, "name": pl.String, "kind": pl.String, "config": pl.String})


@dataclass
class Exported:
    path: Path
    format: str
    n_pairs: int  # rows: pairs, or anchors for `sft`
    snapshot_id: str
    row_ids: list[str]  # pair ids, or response ids for `sft`
    file_sha256: str
    card_sha256: str
    counts: dict[str, int]  # rows per source


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prompt() -> pl.Expr:
    return pl.col("prompt_messages").str.json_decode(pl.List(MESSAGE))


def _assistant(col: str) -> pl.Expr:
    return pl.concat_list(pl.struct(role=pl.lit("assistant"), content=pl.col(col)))


def _tail(rows: pl.DataFrame) -> list[str]:
    """The columns after the texts: `margin` where with_margins wrote one, then the gap, scores, provenance."""
    margin = ["margin"] if "margin" in rows.columns else []
    return [*margin, "source", "score_gap", "score_chosen", "score_rejected", *FINISH, *PROVENANCE]


def _trl(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.select(_prompt().alias("prompt"), _assistant("chosen_text").alias("chosen"),
                       _assistant("rejected_text").alias("rejected"), *_tail(rows))  # fmt: skip


def _openrlhf(rows: pl.DataFrame) -> pl.DataFrame:
    chosen, rejected = (pl.concat_list(_prompt(), _assistant(f"{side}_text")) for side in ("chosen", "rejected"))
    return rows.select(chosen.alias("chosen"), rejected.alias("rejected"), *_tail(rows))


def _sft(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.select(_prompt().alias("prompt"), _assistant("text").alias("completion"), "source", "finish_reason",
                       "model", "prompt_id", "response_id", "run_id")  # fmt: skip


SHAPES: dict[str, Callable[[pl.DataFrame], pl.DataFrame]] = {"trl": _trl, "jsonl": _trl, "openrlhf": _openrlhf,
                                                             "sft": _sft}  # fmt: skip


def to_trl(rows: pl.DataFrame, margin: str = "none") -> pl.DataFrame:
    """v_run_pairs rows -> TRL conversational preference columns (a `margin` column only for a margin mode)."""
    return _trl(with_margins(rows, margin).sort("prompt_id", "pair_id"))


def write_dataset(rows: pl.DataFrame, out_dir: str | Path, fmt: str, overwrite: bool = False, margin: str = "none",
                  scorers: pl.DataFrame = SCORERS, run_id: str | None = None) -> Exported:  # fmt: skip
    """Write `rows` (run `run_id`'s v_run_pairs, or v_run_anchors for `sft`) to out_dir/FILES[fmt], an existing
    one only if `overwrite`, and the folder's card (README.md), whose units come from `scorers` (rows of the
    scorers table)."""
    import datasets

    if fmt not in FILES:
        raise ValueError(f"unknown export format {fmt!r}; use one of {sorted(FILES)}")
    key = export_view(fmt)[1]
    if fmt == "sft" and margin != "none":
        raise ExportError(f"margin {margin!r} is for preference pairs; an sft export has none")
    shaped = rows.sort("prompt_id", key) if fmt == "sft" else with_margins(rows, margin).sort("prompt_id", key)
    out = Path(out_dir)  # the rows are checked above, before any file is touched
    path = _target(out, FILES[fmt], overwrite)
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_polars(SHAPES[fmt](shaped))
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "trl":
        ds.to_parquet(str(tmp))
    else:
        ds.to_json(str(tmp), lines=True, force_ascii=False)
    tmp.replace(path)  # a reader never sees a half-written file
    others = sorted(f for f in FILES.values() if f != path.name and (out / f).exists())
    text = (sft_card(shaped, run_id, path.name, others) if fmt == "sft"
            else dataset_card(shaped, run_id, fmt, path.name, margin, scorers, others))  # fmt: skip
    card = out / (CARD + ".tmp")
    card.write_text(text, encoding="utf-8")
    card.replace(out / CARD)
    ids = sorted(rows[key].to_list()) if len(rows) else []
    counts = dict(shaped.group_by("source").len().sort("source").iter_rows()) if len(shaped) else {}
    return Exported(path=path, format=fmt, n_pairs=len(ds), snapshot_id=content_id("snapshot", ids, fmt, margin),
                    row_ids=ids, file_sha256=sha256(path), card_sha256=sha256(out / CARD), counts=counts)  # fmt: skip


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
def export(rows: pl.DataFrame, out_dir: str, fmt: str, margin: str, scorers: pl.DataFrame, run_id: str,
           overwrite: bool = False) -> Exported:  # fmt: skip
    """Prefect task: write one export target."""
    return write_dataset(rows, out_dir, fmt, overwrite, margin, scorers, run_id)
