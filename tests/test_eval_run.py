"""`prefsynth eval` is a run: a `runs` row of kind eval names every row it writes, and it is never the run
to export. The scorer is a reward model behind a loopback server replaying vLLM's /pooling shape: what is
tested is the bookkeeping, not a model."""

from __future__ import annotations

import json

import duckdb
import pytest
from typer.testing import CliRunner

from prefsynth.cli import app
from prefsynth.flows.evaluate import evaluate
from prefsynth.schemas.config import load_config
from prefsynth.warehouse.store import Store
from tests.conftest import orphan_run_ids
from tests.test_eval import PAIRS, _config
from tests.test_reward_model import FakeVLLM, pooling_reply


def _reward(url: str) -> dict:
    return {"kind": "reward_model", "name": "rm", "model": {"base_url": url, "model": "rm", "max_retries": 0}}


def _runs(db) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT run_id, kind, status FROM runs LEFT JOIN run_ends USING (run_id) "
                           "ORDER BY started_at").fetchall()  # fmt: skip


def test_an_eval_is_a_run_that_names_its_rows_and_is_never_exported(tmp_path, prefect_harness):
    db = tmp_path / "w.duckdb"
    with Store(db) as store:  # a completed pipeline run first: it stays the one to export
        store.begin_run("pipeline", "p", "{}", None)
        store.end_run("pipeline", "completed", {})
    data = tmp_path / "mini.json"
    data.write_text(json.dumps(PAIRS))
    with FakeVLLM(pooling_reply) as fake:
        args = ["eval", "--config", _config(tmp_path, [_reward(fake.base_url)]), "--data", data, "--format", "llmbar"]
        result = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    eval_id = json.loads(result.stdout)["eval_id"]
    assert _runs(db) == [("pipeline", "synthesize", "completed"), (eval_id, "eval", "completed")]
    with duckdb.connect(str(db), read_only=True) as con:
        calls = con.execute("SELECT DISTINCT run_id, count(*) OVER () FROM model_calls").fetchall()
        assert calls == [(eval_id, 6)]  # the precondition: the eval wrote rows, under its run id
        assert con.execute("SELECT DISTINCT eval_id FROM evals").fetchall() == [(eval_id,)]
    assert orphan_run_ids(db) == {}
    with Store(db, read_only=True) as store:
        assert store.export_rows()[0] == "pipeline" and store.run_kind(eval_id) == "eval"
    import prefsynth

    refused = CliRunner().invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "o"), "--run", eval_id])
    assert refused.exit_code == 2 and "is a `prefsynth eval` run" in refused.output
    runs = prefsynth.Warehouse(db).runs()
    assert runs.filter(runs["run_id"] == eval_id)["kind"].to_list() == ["eval"]
    assert prefsynth.Warehouse(db).failures(run=eval_id).columns[:2] == ["run_id", "stage"]


def test_an_eval_that_fails_ends_its_run_as_failed(tmp_path, prefect_harness, monkeypatch):
    def disk_full(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Store, "write_eval", disk_full)
    data = tmp_path / "mini.json"
    data.write_text(json.dumps(PAIRS))
    with FakeVLLM(pooling_reply) as fake, pytest.raises(OSError, match="disk full"):
        evaluate(config=load_config(_config(tmp_path, [_reward(fake.base_url)])), data=str(data), fmt="llmbar")
    db = tmp_path / "w.duckdb"
    ((_, kind, status),) = _runs(db)
    assert (kind, status) == ("eval", "failed")
    assert orphan_run_ids(db) == {}
