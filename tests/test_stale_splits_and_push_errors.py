"""An export that replaces another leaves no stale split file, in its folder or in the Hub repo, and a failed
push (a refused connection, a repo id the Hub refuses) is a clear error, not a traceback: the CLI exits 2, a
run logs it and completes. No network: the Hub's endpoint is a closed loopback port."""

from __future__ import annotations

import logging
import socket

import datasets
import duckdb
import pytest
from typer.testing import CliRunner

from prefsynth import cli
from prefsynth.backends.hub import commit_operations, push
from prefsynth.cli import app
from prefsynth.errors import ConfigError, ExportError
from prefsynth.flows.synthesize import push_export
from prefsynth.schemas.config import ExportTarget, Splits, parse_config
from prefsynth.tasks.export import write_dataset
from prefsynth.warehouse.store import Store
from tests.test_splits import _warehouse

runner = CliRunner()
BAD_IDS = ["org/a--b", "org/a..b", "org/x.git"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli.console, "_width", 1000)


def _export(db, out, *args: str):
    return runner.invoke(app, ["export", "--db", str(db), "--out", str(out), *args])


def test_overwrite_deletes_the_earlier_exports_split_files_of_the_format(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    out = tmp_path / "v1"
    assert _export(db, out, "--splits", "train=0.8,test=0.2").exit_code == 0
    assert (out / "test.parquet").exists()  # precondition: an export with splits
    (out / "openrlhf.jsonl").write_text("another format's file\n")
    again = _export(db, out, "--overwrite")  # no splits: train.parquet holds every row
    assert again.exit_code == 0, again.output
    assert "deleted test.parquet" in again.output
    assert not (out / "test.parquet").exists() and (out / "openrlhf.jsonl").exists()  # not another format's
    loaded = datasets.load_dataset(str(out), data_files="*.parquet", cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train"} and loaded["train"].num_rows == 80  # no test split whose prompts are in train
    # train/validation/test, then train/test: validation goes
    assert _export(db, out, "--overwrite", "--splits", "train=0.6,validation=0.2,test=0.2").exit_code == 0
    assert (out / "validation.parquet").exists()
    fewer = _export(db, out, "--overwrite", "--splits", "train=0.8,test=0.2")
    assert fewer.exit_code == 0 and "deleted validation.parquet" in fewer.output, fewer.output
    assert sorted(p.name for p in out.glob("*.parquet")) == ["test.parquet", "train.parquet"]


def test_without_overwrite_a_stale_split_file_stops_the_export(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    out = tmp_path / "v1"
    out.mkdir()
    (out / "validation.parquet").write_bytes(b"an earlier export's")
    result = _export(db, out)
    assert result.exit_code == 2 and "already holds a trl dataset (validation.parquet)" in result.output
    assert "--overwrite" in result.output and not (out / "train.parquet").exists()


def test_a_push_deletes_the_repos_stale_split_files_of_the_format(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    with Store(db, read_only=True) as store:
        rows = store.export_rows()[1]
    done = write_dataset(rows, tmp_path / "o", "trl")  # no splits: train.parquet and the card
    repo = ["README.md", ".gitattributes", "train.parquet", "validation.parquet", "test.parquet", "openrlhf.jsonl"]
    assert _paths(commit_operations(done, repo)) == (["train.parquet", "README.md"],
                                                     ["test.parquet", "validation.parquet"])  # fmt: skip
    # not another format's file, nor .gitattributes; train/test deletes validation, and a new repo nothing
    split = write_dataset(rows, tmp_path / "s", "trl", splits=Splits(fractions={"train": 0.5, "test": 0.5}))
    assert _paths(commit_operations(split, repo))[1] == ["validation.parquet"]
    assert _paths(commit_operations(split, [])) == (["train.parquet", "test.parquet", "README.md"], [])


def _paths(ops: list) -> tuple[list[str], list[str]]:
    """The paths a commit adds, and those it deletes."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    return ([op.path_in_repo for op in ops if isinstance(op, CommitOperationAdd)],
            [op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)])  # fmt: skip


@pytest.mark.parametrize("repo_id", BAD_IDS)
def test_a_repo_id_the_hub_refuses_is_a_config_error(repo_id):
    model = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    raw = {"prompts": {"builtin": "quickstart"}, "generation": {"models": [model]},
           "scorers": [{"kind": "pointwise_judge", "model": model}],
           "export": [{"path": "o", "push_to_hub": repo_id}]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"export\.0\.push_to_hub") as err:
        parse_config(raw)
    assert f"{repo_id!r} is not a Hub repo id" in str(err.value)


@pytest.mark.parametrize("repo_id", BAD_IDS)
def test_a_repo_id_the_hub_refuses_exits_2_on_the_command_line(tmp_path, monkeypatch, repo_id):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    db = _warehouse(tmp_path / "w.duckdb")
    result = _export(db, tmp_path / "o", "--push-to-hub", repo_id)
    assert result.exit_code == 2 and f"--push-to-hub {repo_id!r} is not a Hub repo id" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists(), result.output


@pytest.fixture
def refused_hub(monkeypatch):
    """The Hub's endpoint: a loopback port that nothing listens on (the connection is refused), online, a token."""
    from huggingface_hub import constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")


def test_a_refused_connection_is_an_export_error(tmp_path, refused_hub, caplog):
    db = _warehouse(tmp_path / "w.duckdb")
    with Store(db, read_only=True) as store:
        rows = store.export_rows()[1]
    done = write_dataset(rows, tmp_path / "o", "trl")
    with pytest.raises(ExportError, match=r"push to the Hub dataset me/prefs failed \(ConnectError"):
        push(done, "me/prefs", False, "hf_not_a_real_token")
    # the flow's push: logged with the command to push again, and the run goes on
    target = ExportTarget(path=str(tmp_path / "o"), push_to_hub="me/prefs")
    with caplog.at_level(logging.INFO, logger="test-push"):
        assert push_export(done, target, logging.getLogger("test-push")) is None
    records = [r for r in caplog.records if r.name == "test-push"]
    assert [r.levelname for r in records] == ["ERROR"]
    message = records[0].getMessage()
    assert "failed (ConnectError" in message and "the export itself is written and recorded" in message
    assert f"Push it again: prefsynth export --snapshot {done.snapshot_id[:12]} --out" in message


def test_a_refused_connection_exits_2_after_the_export_is_recorded(tmp_path, refused_hub):
    db = _warehouse(tmp_path / "w.duckdb")
    result = _export(db, tmp_path / "o", "--push-to-hub", "me/prefs")
    assert result.exit_code == 2 and "push to the Hub dataset me/prefs failed (ConnectError" in result.output
    assert "Traceback" not in result.output and (tmp_path / "o" / "train.parquet").exists(), result.output
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM dataset_snapshots").fetchone() == (1,)
