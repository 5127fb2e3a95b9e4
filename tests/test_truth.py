"""A run whose every call fails says so: exit 1, status failed, and the previous export stays as it was."""

from __future__ import annotations

import hashlib
import json

import duckdb
import yaml
from typer.testing import CliRunner

from prefsynth.cli import app
from tests.conftest import write_jsonl
from tests.fake_server import FakeOpenAI, chat_reply

runner = CliRunner()


def _good(body: dict) -> tuple[int, dict]:
    digest = int(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(), 16)
    if "response_format" in body:
        return chat_reply(json.dumps({"rationale": "ok", "score": digest % 10 + 1}))
    return chat_reply(f"answer {digest % 1000}")


def _malformed(body: dict) -> tuple[int, dict]:
    return 200, {"unexpected": "not a chat completion"}


def _config(tmp_path, url: str, seed: int):
    model = {"base_url": url, "model": "m", "max_retries": 2}
    raw = {"name": "truth", "prompts": {"path": str(write_jsonl(tmp_path / "p.jsonl", [f"q{i}" for i in range(8)]))},
           "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"seed": seed}},
           "scorers": [{"kind": "pointwise_judge", "model": model}], "curation": {"min_margin": 1},
           "export": [{"format": "trl", "path": str(tmp_path / "export")}], "warehouse": str(tmp_path / "w.duckdb")}
    path = tmp_path / f"c{seed}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_run_whose_calls_all_fail_exits_1_and_keeps_the_previous_export(tmp_path, prefect_harness):
    with FakeOpenAI(_good) as server:
        first = runner.invoke(app, ["run", str(_config(tmp_path, server.base_url, 0))])
    assert first.exit_code == 0, first.output
    export = tmp_path / "export" / "train.parquet"
    before = export.read_bytes()
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        good_run, pairs = con.execute("SELECT run_id, count(*) FROM run_pairs GROUP BY 1").fetchone()
    assert pairs > 0  # the precondition: the first run made a dataset

    with FakeOpenAI(_malformed) as server:  # new seed: every call is new, and every answer is malformed
        broken = runner.invoke(app, ["run", str(_config(tmp_path, server.base_url, 7))])
    assert broken.exit_code == 1, broken.output
    assert "failed" in broken.output and "no export was replaced" in broken.output
    assert export.read_bytes() == before
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        statuses = dict(con.execute("SELECT run_id, status FROM run_ends").fetchall())
        failures = con.execute("SELECT count(*) FROM failures WHERE error LIKE 'unreadable response%'").fetchone()[0]
    assert sorted(statuses.values()) == ["completed", "failed"] and statuses[good_run] == "completed"
    assert failures == 16

    again = runner.invoke(app, ["export", "--db", str(tmp_path / "w.duckdb"), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert f"{pairs} pairs from run {good_run}" in again.output
