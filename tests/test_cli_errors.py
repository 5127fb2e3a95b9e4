"""Bad input at the CLI: exit code 2 and a message naming the file, folder or id, never a traceback.

All need no model but two, which run the flow up to the check; the flow starts the local model server
first (marked `model`). The last one needs no Prefect run either.
"""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from prefsynth import cli
from prefsynth.backends.local import LocalServer
from prefsynth.cli import app
from prefsynth.warehouse.store import Store

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli.console, "_width", 1000)  # one line per message: paths are not wrapped


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _refused(result, *names: object, flow_logs: bool = False) -> str:
    """The message of an exit-2 refusal that names each of `names`, with no traceback.

    With `flow_logs`, only the CLI's own last line is checked: Prefect's run logger prints the failed
    task or flow run (with its traceback) above it.
    """
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit)
    message = result.output.strip().splitlines()[-1] if flow_logs else result.output
    assert message.startswith("error: ") and "Traceback" not in message, result.output
    for name in names:
        assert str(name) in message, (name, result.output)
    return message


def _warehouse(path: Path) -> Path:
    with Store(path) as store:
        store.begin_run("run1", "test", "{}", None)
        store.end_run("run1", "completed", {})
    return path


def test_export_of_an_unknown_run_is_refused(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    _refused(_invoke("export", "--db", db, "--out", tmp_path / "out", "--run", "no-such-run"), "'no-such-run'", db)
    assert not (tmp_path / "out").exists()


def test_export_from_a_missing_warehouse_creates_nothing(tmp_path):
    db = tmp_path / "typo.duckdb"
    _refused(_invoke("export", "--db", db, "--out", tmp_path / "out"), f"warehouse not found: {db}")
    assert list(tmp_path.iterdir()) == []


def test_export_keeps_an_existing_dataset_unless_told_to_overwrite(tmp_path):
    db, out = _warehouse(tmp_path / "w.duckdb"), tmp_path / "out"
    first = _invoke("export", "--db", db, "--out", out)
    assert first.exit_code == 0, first.output
    dataset = out / "train.parquet"
    dataset.write_bytes(b"an earlier dataset")
    _refused(_invoke("export", "--db", db, "--out", out), f"{out} already holds a dataset", "--overwrite")
    assert dataset.read_bytes() == b"an earlier dataset"
    again = _invoke("export", "--db", db, "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert dataset.read_bytes().startswith(b"PAR1")
    other = _invoke("export", "--db", db, "--out", out, "--format", "jsonl")  # another format replaces nothing
    assert other.exit_code == 0 and (out / "train.jsonl").exists()


def test_export_help_documents_overwrite():
    result = _invoke("export", "--help")
    assert result.exit_code == 0 and "--overwrite" in result.output


def test_export_out_pointing_at_a_file_is_refused(tmp_path):
    db, out = _warehouse(tmp_path / "w.duckdb"), tmp_path / "notes.txt"
    out.write_text("mine")
    _refused(_invoke("export", "--db", db, "--out", out), f"cannot export to {out}: it is a file")
    assert out.read_text() == "mine"


def test_stats_on_a_warehouse_whose_wal_cannot_be_replayed_says_how_to_recover(tmp_path):
    from tests.test_store import _unreplayable_wal

    db = _warehouse(tmp_path / "w.duckdb")
    wal = tmp_path / "w.duckdb.wal"
    wal.write_bytes(_unreplayable_wal(tmp_path))
    out = _refused(_invoke("stats", "--db", db), f"cannot open warehouse {db}", f"mv {wal} {wal}.damaged-")
    assert "Stack Trace" not in out and wal.exists()


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("name: café\n".encode("latin-1"))
    _refused(_invoke("run", config), f"{config}:1: not UTF-8 text")


def _flow_config(tmp_path: Path, prompts: dict) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "prompts": prompts,
        "generation": {"models": [{"gguf": "smollm2-135m-instruct"}]},
        "scorers": [{"kind": "pointwise_judge", "model": {"gguf": "smollm2-135m-instruct"}}],
        "warehouse": str(tmp_path / "w.duckdb"),
    }))  # fmt: skip
    return config


@pytest.mark.model
def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path, prefect_harness):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n')
    config = _flow_config(tmp_path, {"path": str(prompts)})
    _refused(_invoke("run", config), f"{prompts}:2: not UTF-8 text", flow_logs=True)
    db = tmp_path / "w.duckdb"  # prompts stream into the warehouse in one transaction: nothing is left
    if db.exists():
        with duckdb.connect(str(db), read_only=True) as con:
            assert con.execute("SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM prompts)").fetchone() == (0,)


@pytest.mark.model
def test_a_warehouse_whose_folder_cannot_be_created_is_named(tmp_path, prefect_harness):
    # Tests run as root, where chmod does not stop writes: a regular file in place of a folder does.
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    db = blocker / "sub" / "w.duckdb"
    config = _flow_config(tmp_path, {"warehouse_table": "prompts"})  # opens the warehouse before any model
    _refused(_invoke("run", config, "--db", db), f"cannot create the folder of warehouse {db}", "Not a directory",
             flow_logs=True)
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("command", ["run", "demo", "eval", "score-text"])
def test_a_local_model_without_the_local_extra_is_refused_before_anything_starts(
    tmp_path, monkeypatch, prefect_harness, command
):
    """An endpoint-only install (no llama-cpp-python) asked for a local model: one line naming what is missing
    and the extra, before any server starts, any warehouse is created or the labelled data is read."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import and find_spec fail as when not installed
    launched: list[Path] = []
    monkeypatch.setattr(LocalServer, "launch", lambda self: launched.append(self.path))
    config, db = _flow_config(tmp_path, {"builtin": "quickstart"}), tmp_path / "w.duckdb"
    args = {"run": ["run", config], "demo": ["demo", "--db", db],
            "eval": ["eval", "--config", config, "--data", tmp_path / "absent.json", "--format", "llmbar"],
            "score-text": ["score-text", "--prompt", "Hi", "--response", "Hello."]}[command]  # fmt: skip
    message = _refused(_invoke(*args), "local model `gguf: smollm2-135m-instruct` needs the `local` extra "
                       "(llama-cpp-python is not installed): pip install 'prefsynth[local]'")  # fmt: skip
    assert len(message.strip().splitlines()) == 1 and not launched and not db.exists()
