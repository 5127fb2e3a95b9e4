"""Train/test splits of an export (issue 12): by prompt, seeded, one file per split, recorded in the snapshot and
written again byte-for-byte; the card's counts; bad splits as clear errors; and push_to_hub's checks and what
it would push, without the network (tests never reach the Hub: HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import duckdb
import polars as pl
import pytest
from typer.testing import CliRunner

from prefsynth import cli
from prefsynth.backends.hub import commit_operations, hub_files
from prefsynth.cli import app
from prefsynth.errors import ConfigError, ExportError
from prefsynth.schemas.config import Splits, parse_config
from prefsynth.schemas.records import Message, Pair, Prompt, Response, StageResult
from prefsynth.tasks.export import dataset_dict, write_dataset
from prefsynth.tasks.splits import assign_splits
from prefsynth.warehouse.store import Store

runner = CliRunner()
PROMPTS = [f"p{i:02d}" for i in range(40)]
JUDGE = {"kind": "pointwise", "models": {"judge": "m"}, "scale_min": 1, "scale_max": 9}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli.console, "_width", 1000)


def _rows(prompts: list[str], per_prompt: int = 3) -> pl.DataFrame:
    return pl.DataFrame({"prompt_id": [p for p in prompts for _ in range(per_prompt)],
                         "pair_id": [f"{p}-{k}" for p in prompts for k in range(per_prompt)]})  # fmt: skip


def _warehouse(path: Path, prompts: list[str] = PROMPTS) -> Path:
    """A completed run `run1`: two pairs per prompt (each of two responses against a third), scorer sj."""
    with Store(path) as store:
        store.begin_run("run1", "test", "{}", None)
        store.ingest_prompts("run1", [Prompt(prompt_id=p, messages=[Message(role="user", content=f"question {p}")],
                                             source="t", source_ref=p) for p in prompts])  # fmt: skip
        responses = [Response(response_id=f"{p}{s}", prompt_id=p, model="m", model_identity="m", sampling="{}",
                              sample_index=i, seed=0, text=f"answer {s} to {p}", finish_reason="stop",
                              prompt_tokens=None, completion_tokens=None, latency_ms=1.0, call_id=f"call-{p}{s}")
                     for p in prompts for i, s in enumerate("abc")]  # fmt: skip
        store.write("run1", StageResult(*responses))
        store.register_scorer("sj", "judge", "pointwise", json.dumps(JUDGE))
        pairs = [Pair(pair_id=f"{p}-{s}", prompt_id=p, chosen_id=f"{p}{s}", rejected_id=f"{p}c", scorer_id="sj",
                      score_chosen=8.0, score_rejected=2.0, margin=6.0, rule="{}", source="sampled")
                 for p in prompts for s in "ab"]  # fmt: skip
        store.write_pairs("run1", pairs)
        store.end_run("run1", "completed", {})
    return path


def test_no_prompt_lands_in_two_splits_and_the_same_seed_draws_the_same_split():
    splits = Splits(fractions={"test": 0.25, "train": 0.75}, seed=7)
    assert list(splits.fractions) == ["train", "test"]  # always in the order train, validation, test
    out = assign_splits(_rows(PROMPTS), splits)
    per_prompt = out.group_by("prompt_id").agg(pl.col("split").n_unique().alias("n"), pl.col("split").first())
    assert per_prompt["n"].max() == 1  # every pair of a prompt is in one split
    counts = dict(per_prompt.group_by("split").len().iter_rows())
    assert set(counts) == {"train", "test"} and sum(counts.values()) == len(PROMPTS)
    assert out.equals(assign_splits(_rows(PROMPTS), splits))  # the same seed, the same split
    other = assign_splits(_rows(PROMPTS), Splits(fractions=splits.fractions, seed=8))
    assert not other["split"].equals(out["split"])  # another seed, another draw
    # the documented draw: the first 52 bits of sha256("seed:prompt_id"), train below 0.75
    for pid, split in per_prompt.select("prompt_id", "split").iter_rows():
        draw = int(hashlib.sha256(f"7:{pid}".encode()).hexdigest()[:13], 16) / 2**52
        assert split == ("train" if draw < 0.75 else "test"), pid
    # stable as the dataset grows: more prompts move none of the earlier ones
    grown = assign_splits(_rows(PROMPTS + [f"q{i}" for i in range(100)]), splits)
    assert grown.filter(pl.col("prompt_id").is_in(PROMPTS)).sort("pair_id").equals(out.sort("pair_id"))


@pytest.mark.parametrize(("splits", "message"), [
    ({"train": 0.9}, "the fractions must sum to 1, got 0.9"),
    ({"train": 1.2, "test": -0.2}, "train must be a fraction of the prompts in (0, 1], got 1.2"),
    ({"train": 0.9, "dev": 0.1}, "unknown split name 'dev'; use train, validation, test"),
    ({}, "name at least one split"),
])  # fmt: skip
def test_bad_splits_in_a_config_name_the_field(splits, message):
    model = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    raw = {"prompts": {"builtin": "quickstart"}, "generation": {"models": [model]},
           "scorers": [{"kind": "pointwise_judge", "model": model}], "export": [{"path": "o", "splits": splits}]}
    with pytest.raises(ConfigError, match=r"export\.0\.splits") as err:
        parse_config(raw)
    assert message in str(err.value)


def test_a_split_export_writes_a_file_per_split_the_card_counts_and_the_snapshot_again(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    first = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "v1"), "--splits",
                                "train=0.8,test=0.2", "--seed", "3"])  # fmt: skip
    assert first.exit_code == 0, first.output
    assert "80 pairs (train " in first.output and ", test " in first.output
    train, test = (pl.read_parquet(tmp_path / "v1" / f"{s}.parquet") for s in ("train", "test"))
    assert train.height > 0 and test.height > 0 and train.height + test.height == 80  # precondition: both used
    assert not set(train["prompt_id"]) & set(test["prompt_id"])  # no prompt in both
    assert "split" not in train.columns  # the file says the split
    # what datasets and TRL users do: load the folder as a DatasetDict
    loaded = datasets.load_dataset(str(tmp_path / "v1"), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "test"} and loaded["test"].num_rows == test.height
    card = (tmp_path / "v1" / "README.md").read_text(encoding="utf-8")
    assert "`train.parquet` and `test.parquet` hold 80 pairs" in card and "seed 3" in card
    assert f"| train | `train.parquet` | {train.height} | {train['prompt_id'].n_unique()} | 0.8 |" in card
    assert f"| test | `test.parquet` | {test.height} | {test['prompt_id'].n_unique()} | 0.2 |" in card

    with duckdb.connect(str(db), read_only=True) as con:
        snap, recorded = con.execute("SELECT snapshot_id, splits FROM dataset_snapshots").fetchone()
        by_split = dict(con.execute("SELECT split, count(*) FROM snapshot_rows GROUP BY split").fetchall())
    assert by_split == {"train": train.height, "test": test.height}
    assert json.loads(recorded)["files"]["test"]["sha256"] == hashlib.sha256(
        (tmp_path / "v1" / "test.parquet").read_bytes()).hexdigest()  # fmt: skip
    listed = runner.invoke(app, ["datasets", "--db", str(db)], env={"COLUMNS": "250"})
    assert f"train {train.height}, test {test.height} (seed 3)" in listed.output

    again = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "again"), "--snapshot", snap[:10]])
    assert again.exit_code == 0 and "byte-for-byte the same files and card" in again.output, again.output
    for name in ("train.parquet", "test.parquet", "README.md"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "v1" / name).read_bytes(), name
    # the same seed gives the same split; another seed another one, and another snapshot
    other = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "s4"), "--splits",
                                "train=0.8,test=0.2", "--seed", "4"])  # fmt: skip
    assert other.exit_code == 0 and snap[:12] not in other.output
    assert set(pl.read_parquet(tmp_path / "s4" / "test.parquet")["prompt_id"]) != set(test["prompt_id"])


def test_a_snapshot_keeps_its_recorded_split(tmp_path):
    """A re-export uses each row's recorded split, not a new draw: rows whose recorded split is moved in the
    warehouse land where the warehouse says, and the bytes then differ from the recorded ones."""
    db = _warehouse(tmp_path / "w.duckdb")
    assert runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "v1"), "--splits",
                               "train=0.5,test=0.5"]).exit_code == 0  # fmt: skip
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE snapshot_rows SET split = 'test'")
    again = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "b"), "--snapshot",
                                _only_snapshot(db)])  # fmt: skip
    assert again.exit_code == 0 and "the bytes differ" in again.output
    assert pl.read_parquet(tmp_path / "b" / "train.parquet").height == 0
    assert pl.read_parquet(tmp_path / "b" / "test.parquet").height == 80
    with duckdb.connect(str(db)) as con:  # a split the snapshot does not name: an error, not a lost row
        con.execute("UPDATE snapshot_rows SET split = NULL WHERE row_id = 'p00-a'")
    lost = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "c"), "--snapshot",
                               _only_snapshot(db)])  # fmt: skip
    assert lost.exit_code == 2 and "rows whose split is none of ['train', 'test']" in lost.output


def _only_snapshot(db: Path) -> str:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT snapshot_id FROM dataset_snapshots").fetchone()[0]


@pytest.mark.parametrize(("value", "message"), [
    ("train=0.9,test=0.2", "--splits: the fractions must sum to 1, got 1.1"),
    ("train=1.5,test=-0.5", "--splits: train must be a fraction of the prompts in (0, 1], got 1.5"),
    ("train=0.9,holdout=0.1", "--splits: unknown split name 'holdout'"),
    ("train:0.9", "--splits: write NAME=FRACTION,..., e.g. train=0.9,test=0.1"),
])  # fmt: skip
def test_bad_splits_on_the_command_line_exit_2_before_any_work(tmp_path, value, message):
    db = _warehouse(tmp_path / "w.duckdb", PROMPTS[:2])
    result = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "o"), "--splits", value])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_the_python_api_splits_into_a_datasetdict_as_the_export_does(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    with Store(db, read_only=True) as store:
        rows = store.export_rows()[1]
    splits = Splits(fractions={"train": 0.7, "validation": 0.1, "test": 0.2}, seed=1)
    dd = dataset_dict(rows, splits)
    done = write_dataset(rows, tmp_path / "o", "jsonl", splits=splits, run_id="run1")
    assert list(dd) == ["train", "validation", "test"] and sum(d.num_rows for d in dd.values()) == 80
    for name in dd:
        written = [json.loads(line) for line in (tmp_path / "o" / f"{name}.jsonl").read_text().splitlines()]
        assert dd[name]["pair_id"] == [r["pair_id"] for r in written], name
        assert done.splits["files"][name]["rows"] == dd[name].num_rows
    assert dd["train"][0]["chosen"][0]["role"] == "assistant"


def _no_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_push_to_hub_without_a_token_stops_before_any_work(tmp_path, monkeypatch):
    _no_token(monkeypatch, tmp_path)
    db = _warehouse(tmp_path / "w.duckdb", PROMPTS[:2])
    result = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "o"), "--push-to-hub", "me/prefs"])
    assert result.exit_code == 2 and "push_to_hub needs a Hugging Face token" in result.output, result.output
    assert "HF_TOKEN" in result.output and not (tmp_path / "o").exists()
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM dataset_snapshots").fetchone() == (0,)
    bad = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "o"), "--push-to-hub", "no repo"])
    assert bad.exit_code == 2 and "--push-to-hub must be a Hub repo id ORG/NAME" in bad.output
    # a config's push_to_hub: the Python API refuses before the run starts (no Prefect, no model call)
    import prefsynth

    model = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    config = {"prompts": {"builtin": "quickstart"}, "generation": {"models": [model]},
              "scorers": [{"kind": "pointwise_judge", "model": model}], "warehouse": str(tmp_path / "r.duckdb"),
              "export": [{"path": str(tmp_path / "e"), "push_to_hub": "me/prefs"}]}  # fmt: skip
    with pytest.raises(ExportError, match="needs a Hugging Face token"):
        prefsynth.run(config)
    assert not (tmp_path / "r.duckdb").exists()


def test_push_to_hub_offline_is_refused_with_a_token(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as the tests run
    db = _warehouse(tmp_path / "w.duckdb", PROMPTS[:2])
    result = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "o"), "--push-to-hub", "me/p"])
    assert result.exit_code == 2 and "HF_HUB_OFFLINE is set" in result.output and not (tmp_path / "o").exists()


def test_what_a_push_uploads_is_the_snapshots_files_and_card(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    with Store(db, read_only=True) as store:
        rows = store.export_rows()[1]
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "openrlhf.jsonl").write_text("another export's file\n")
    done = write_dataset(rows, tmp_path / "o", "trl", splits=Splits(fractions={"train": 0.9, "test": 0.1}))
    files = hub_files(done)
    assert [name for name, _ in files] == ["train.parquet", "test.parquet", "README.md"]  # not the other export's
    ops = commit_operations(done)
    recorded = {v["file"]: v["sha256"] for v in done.splits["files"].values()} | {"README.md": done.card_sha256}
    assert {op.path_in_repo: op.upload_info.sha256.hex() for op in ops} == recorded  # the same bytes
