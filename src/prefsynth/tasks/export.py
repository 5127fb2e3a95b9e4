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
With `splits` (splits.py), one file per split instead, named as `datasets` reads splits: train.parquet and
test.parquet (trl), train.jsonl and test.jsonl (jsonl), openrlhf_train.jsonl ... (openrlhf), sft_train.jsonl ...
A folder holds one dataset of each format: with `overwrite`, the files of the same format that this export does
not write (test.parquet of an earlier export with splits, say) are deleted, so that `datasets` finds no stale
split in the folder; without it, they stop the export like its own files do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from prefsynth.errors import ExportError
from prefsynth.schemas.config import SPLIT_NAMES, Splits
from prefsynth.tasks.card import dataset_card, sft_card
from prefsynth.tasks.margins import with_margins
from prefsynth.tasks.splits import assign_splits, split_file
from prefsynth.warehouse.ids import canonical_json, content_id
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
    path: Path  # the file; with splits, the folder
    format: str
    n_pairs: int  # rows: pairs, or anchors for `sft`
    snapshot_id: str
    row_ids: list[str]  # pair ids, or response ids for `sft`
    file_sha256: str  # with splits: the SHA-256 of the canonical JSON {file: its SHA-256}
    card_sha256: str
    counts: dict[str, int]  # rows per source
    row_splits: list[str] | None = None  # each row's split (in row_ids' order), with splits
    splits: dict[str, Any] | None = None  # seed, fractions, and per split its file, rows, prompts and SHA-256
    files: list[Path] = field(default_factory=list)  # the data files written (not the card)
    removed: list[str] = field(default_factory=list)  # stale files of the format deleted (with overwrite)


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
                  scorers: pl.DataFrame = SCORERS, run_id: str | None = None,
                  splits: Splits | None = None) -> Exported:  # fmt: skip
    """Write `rows` (run `run_id`'s v_run_pairs, or v_run_anchors for `sft`) to out_dir/FILES[fmt], an existing
    one only if `overwrite`, and the folder's card (README.md), whose units come from `scorers` (rows of the
    scorers table). With `splits`, one file per split: rows with a `split` column (a snapshot's) keep theirs,
    others are drawn (splits.py)."""
    if fmt not in FILES:
        raise ValueError(f"unknown export format {fmt!r}; use one of {sorted(FILES)}")
    key = export_view(fmt)[1]
    if fmt == "sft" and margin != "none":
        raise ExportError(f"margin {margin!r} is for preference pairs; an sft export has none")
    shaped = rows.sort("prompt_id", key) if fmt == "sft" else with_margins(rows, margin).sort("prompt_id", key)
    if splits is not None and "split" not in shaped.columns:
        shaped = assign_splits(shaped, splits)
    names: list[str | None] = list(splits.fractions) if splits is not None else [None]
    if splits is not None and not shaped["split"].is_in(list(splits.fractions)).fill_null(False).all():  # no row lost
        raise ExportError(f"rows whose split is none of {list(splits.fractions)}: {shaped['split'].unique().to_list()}")
    out = Path(out_dir)  # the rows are checked above, before any file is touched
    paths = {name: _target(out, FILES[fmt] if name is None else split_file(FILES[fmt], name), overwrite)
             for name in names}  # every target is checked before any is written  # fmt: skip
    stale = [f for f in format_files(fmt) if f not in {p.name for p in paths.values()} and (out / f).exists()]
    if stale and not overwrite:
        raise ExportError(f"{out} already holds a {fmt} dataset ({', '.join(stale)}); pass --overwrite to replace "
                          "it (these files are then deleted), or choose another output folder")  # fmt: skip
    parts = {name: shaped if name is None else shaped.filter(pl.col("split") == name) for name in names}
    for name, path in paths.items():
        _write(SHAPES[fmt](parts[name]), path, fmt)
    for name in stale:  # after the new files are in place: they replace these
        (out / name).unlink()
    hashes = {path.name: sha256(path) for path in paths.values()}
    info = None if splits is None else {"seed": splits.seed, "fractions": splits.fractions, "files": {
        name: {"file": path.name, "rows": len(parts[name]), "prompts": parts[name]["prompt_id"].n_unique(),
               "sha256": hashes[path.name]} for name, path in paths.items()}}  # fmt: skip
    files = list(hashes)
    others = sorted(f for f in _all_files() if f not in hashes and (out / f).exists())
    text = (sft_card(shaped, run_id, files, others, info) if fmt == "sft"
            else dataset_card(shaped, run_id, fmt, files, margin, scorers, others, info))  # fmt: skip
    card = out / (CARD + ".tmp")
    card.write_text(text, encoding="utf-8")
    card.replace(out / CARD)
    keyed = shaped.sort(key)
    ids = keyed[key].to_list() if len(rows) else []
    counts = dict(shaped.group_by("source").len().sort("source").iter_rows()) if len(shaped) else {}
    parts_id = [] if splits is None else [{"splits": splits.fractions, "seed": splits.seed}]
    only = next(iter(paths.values()))
    return Exported(path=only if splits is None else out, format=fmt, n_pairs=len(shaped),
                    snapshot_id=content_id("snapshot", ids, fmt, margin, *parts_id), row_ids=ids,
                    file_sha256=hashes[only.name] if splits is None else _digest(hashes),
                    card_sha256=sha256(out / CARD), counts=counts,
                    row_splits=None if splits is None else keyed["split"].to_list(), splits=info,
                    files=list(paths.values()), removed=stale)  # fmt: skip


def _write(shaped: pl.DataFrame, path: Path, fmt: str) -> None:
    """One dataset file through `datasets`, written aside and then moved: a reader never sees half a file."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_polars(shaped)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "trl":
        ds.to_parquet(str(tmp))
    else:
        ds.to_json(str(tmp), lines=True, force_ascii=False)
    tmp.replace(path)


def format_files(fmt: str) -> list[str]:
    """Every file name an export of `fmt` writes, with and without splits: train.parquet, validation.parquet
    and test.parquet for trl."""
    return sorted({FILES[fmt], *(split_file(FILES[fmt], s) for s in SPLIT_NAMES)})


def _all_files() -> list[str]:
    """Every file name an export writes, of any format, with and without splits."""
    return sorted({f for fmt in FILES for f in format_files(fmt)})


def _digest(hashes: dict[str, str]) -> str:
    """One SHA-256 for several files: of the canonical JSON {file name: its SHA-256}."""
    return hashlib.sha256(canonical_json(hashes).encode()).hexdigest()


def dataset_dict(rows: pl.DataFrame, splits: Splits) -> Any:
    """v_run_pairs rows -> a `datasets.DatasetDict` of TRL conversational preference rows, one per split (no
    `margin` column), split as an export with these splits."""
    import datasets

    split = assign_splits(rows, splits)
    return datasets.DatasetDict({name: datasets.Dataset.from_polars(to_trl(split.filter(pl.col("split") == name)))
                                 for name in splits.fractions})  # fmt: skip


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
           overwrite: bool = False, splits: Splits | None = None) -> Exported:  # fmt: skip
    """Prefect task: write one export target."""
    return write_dataset(rows, out_dir, fmt, overwrite, margin, scorers, run_id, splits)
