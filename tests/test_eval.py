"""`prefsynth eval` and the pipeline with CDR as its scorer, end to end on the embedded pair."""

from __future__ import annotations

import json

import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from prefsynth.cli import app
from prefsynth.flows.synthesize import synthesize
from tests.conftest import orphan_run_ids, small_config, write_jsonl

runner = CliRunner()
PAIRS = [
    {"input": "What is the capital of France?", "output_1": "Paris.", "output_2": "Berlin is the capital.",
     "label": 1},
    {"input": "Give an antonym of 'cold'.", "output_1": "Purple elephants dance.", "output_2": "Hot.", "label": 2},
    {"input": "Count from 1 to 3.", "output_1": "1, 2, 3", "output_2": "3, 2, 1", "label": 1},
]  # fmt: skip
CDR = {"kind": "cdr", "strong": {"gguf": "smollm2-135m-instruct"}, "weak": {"gguf": "gemma3-270m-base"}}


def _config(tmp_path, scorers) -> str:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({
        "prompts": {"builtin": "quickstart"},
        "generation": {"models": [{"gguf": "smollm2-135m-instruct"}]},
        "scorers": scorers,
        "warehouse": str(tmp_path / "w.duckdb"),
    }))  # fmt: skip
    return str(path)


@pytest.mark.model
def test_eval_reports_accuracy_side_by_side_and_reruns_for_free(tmp_path, prefect_harness):
    data = tmp_path / "mini.json"
    data.write_text(json.dumps(PAIRS))
    config = _config(tmp_path, [{**CDR, "name": "vanilla"}, {**CDR, "name": "own-templates", "template": "own"}])
    args = ["eval", "--config", config, "--data", str(data), "--format", "llmbar", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["scorers"]) == {"vanilla", "own-templates"}
    for report in out["scorers"].values():
        assert report["n"] + report["failed"] == 3 and 0 <= report["accuracy"] <= 1
        assert report["by_subset"]["mini"]["n"] == report["n"]
    assert out["n"] == out["scorers"]["vanilla"]["n"] and "ties" in out and "by_subset" in out
    db = tmp_path / "w.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        items = con.execute("SELECT scorer_id, count(*), count(score_better) FROM eval_items GROUP BY 1").fetchall()
        assert sorted(n for _, n, _ in items) == [3, 3]
        # accuracy in the warehouse equals the items' own verdicts
        stored = con.execute("SELECT scorer, accuracy FROM evals").fetchall()
        recomputed = dict(con.execute(
            "SELECT e.scorer, avg(CASE WHEN i.score_better > i.score_worse THEN 1.0 ELSE 0.0 END) FROM eval_items i "
            "JOIN evals e USING (eval_id, scorer_id) WHERE i.score_better IS NOT NULL GROUP BY 1").fetchall())
        assert {s: round(a, 4) for s, a in stored} == {s: round(a, 4) for s, a in recomputed.items()}
        calls = con.execute("SELECT count(*) FROM model_calls").fetchone()[0]
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["scorers"]["vanilla"]["accuracy"] == out["scorers"]["vanilla"]["accuracy"]
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == calls  # no new log-prob requests
        assert con.execute("SELECT kind, status FROM runs JOIN run_ends USING (run_id)").fetchall() == [
            ("eval", "completed")] * 2  # fmt: skip
    assert orphan_run_ids(db) == {}


@pytest.mark.model
def test_eval_of_a_file_with_a_duplicate_identical_and_empty_pair(tmp_path, prefect_harness):
    empty = {"input": "Say hello.", "output_1": "", "output_2": "Hello!", "label": 2}
    identical = {"input": "Say hi.", "output_1": "Hi.", "output_2": "Hi.", "label": 1}
    data = tmp_path / "dup.json"
    data.write_text(json.dumps([PAIRS[0], PAIRS[1], PAIRS[0], identical, empty]))
    args = ["eval", "--config", _config(tmp_path, [{**CDR, "name": "cdr"}]), "--data", str(data), "--format", "llmbar"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    report = out["scorers"]["cdr"]
    assert report["n"] > 0 and report["model_calls"] > 0  # the scorer really scored
    assert report["n"] == 3 and report["failed"] == 0  # the empty reply is scored too
    assert (out["pairs"], out["duplicates"], out["skipped"], out["skipped_by_reason"]) == (3, 1, 1, {"identical": 1})
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        refs = [r for (r,) in con.execute("SELECT source_ref FROM eval_items ORDER BY source_ref").fetchall()]
        assert refs == ["dup.json[0]", "dup.json[1]", "dup.json[4]"]
        stored = json.loads(con.execute("SELECT report FROM evals").fetchone()[0])
        assert (stored["duplicates"], stored["skipped"]) == (1, 1)
        calls = con.execute("SELECT count(*) FROM model_calls").fetchone()[0]
    table = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    header, row = [line for line in table.stdout.splitlines() if "scorer" in line or "cdr" in line][:2]
    cells = {k.strip(): v.strip() for k, v in zip(header.split("┃")[1:-1], row.split("│")[1:-1], strict=True)}
    assert (cells["n"], cells["duplicates"], cells["skipped"]) == ("3", "1", "1")
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == calls  # rerun: no new requests


def test_eval_rejects_bad_data_before_any_model_call(tmp_path):
    data = tmp_path / "bad.json"
    data.write_text('[{"input": "x", "output_1": "a", "output_2": "b", "label": 3}]')
    result = runner.invoke(app, ["eval", "--config", _config(tmp_path, [CDR]), "--data", str(data),
                                 "--format", "llmbar"])  # fmt: skip
    assert result.exit_code == 2 and "bad.json" in result.output
    result = runner.invoke(app, ["eval", "--config", _config(tmp_path, [CDR]), "--data", str(data), "--format", "x"])
    assert result.exit_code == 2 and "llmbar" in result.output


@pytest.mark.model
def test_pipeline_with_cdr_as_its_scorer(tmp_path, prefect_harness):
    prompts = write_jsonl(tmp_path / "p.jsonl", ["Name a fruit.", "What is 5 - 2?", "Say hello in Spanish."])
    # the default margin (auto): any positive gap, since CDR values are log-ratios, not points on a scale
    config = small_config(tmp_path, prompts, scorers=[{**CDR, "name": "cdr"}], curation={"min_margin": "auto"})
    summary = synthesize(config=config)
    assert summary.failures == 0
    with duckdb.connect(config.warehouse, read_only=True) as con:
        details = [json.loads(d) for (d,) in con.execute("SELECT details FROM scores").fetchall()]
        assert len(details) == 6 and all(d["strong_tokens"] > 0 and d["weak_tokens"] > 0 for d in details)
        assert con.execute("SELECT count(*) FROM logprobs").fetchone()[0] == 12
        pairs = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
        assert pairs > 0 and pairs == con.execute(
            "SELECT count(*) FROM (SELECT r.prompt_id FROM scores s JOIN responses r USING (response_id) "
            "GROUP BY 1 HAVING max(value) > min(value))").fetchone()[0]
        calls = con.execute("SELECT count(*) FROM model_calls").fetchone()[0]
    rerun = synthesize(config=config)
    assert rerun.model_calls == 0 and rerun.pairs == summary.pairs
    with duckdb.connect(config.warehouse, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == calls

