"""End to end on the embedded default: real llama.cpp server with SmolLM2, real DuckDB, real Prefect."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from prefsynth.cli import app
from prefsynth.errors import EndpointError, InputError, ModelFileError
from prefsynth.flows.synthesize import synthesize
from prefsynth.schemas.config import PipelineConfig
from prefsynth.schemas.records import RunSummary
from tests.conftest import orphan_run_ids, small_config, write_jsonl

PROMPTS = [
    "Name one primary color.",
    "What is 3 + 4?",
    "Give a synonym for 'happy'.",
    "Écris « bonjour » en anglais.",
    "What do bees make?",
    "Say something kind to a friend.",
]
runner = CliRunner()


def _q(db, sql):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def one_run(tmp_path_factory, prefect_harness) -> tuple[PipelineConfig, RunSummary]:
    """One run on the real model, made once and never written to again: each test gets its own copy."""
    tmp = tmp_path_factory.mktemp("pipeline")
    prompts = write_jsonl(tmp / "prompts.jsonl", PROMPTS)
    # three samples per prompt: with seed 1, six prompts give several pairs (the checks below need some)
    config = small_config(tmp, prompts, generation={"models": [{"gguf": "smollm2-135m-instruct"}],
                          "samples_per_prompt": 3, "sampling": {"temperature": 1.0, "max_tokens": 12, "seed": 1}})
    summary = synthesize(config=config)
    assert summary.pairs > 0, "the run made no pairs: nothing below would be checked"  # the precondition
    return config, summary


@pytest.fixture
def first_run(one_run, tmp_path) -> tuple[Path, PipelineConfig, RunSummary]:
    """This test's own copy of the run's warehouse (model calls included, so a rerun costs nothing)."""
    config, summary = one_run
    for suffix in ("", ".wal"):  # a closed warehouse is one file, but a WAL left behind belongs with it
        if Path(config.warehouse + suffix).exists():
            shutil.copy(config.warehouse + suffix, tmp_path / f"w.duckdb{suffix}")
    return tmp_path, config.model_copy(update={"warehouse": str(tmp_path / "w.duckdb")}), summary


@pytest.mark.model
def test_first_run_fills_every_table(first_run):
    tmp, config, summary = first_run
    db = config.warehouse
    counts = dict(_q(db, "SELECT 'prompts', count(*) FROM prompts UNION ALL SELECT 'responses', count(*) FROM "
                         "responses UNION ALL SELECT 'scored', count(*) FROM scores UNION ALL SELECT 'failed', "
                         "count(DISTINCT item_id) FROM failures WHERE stage = 'score'"))  # fmt: skip
    assert counts["prompts"] == 6 and counts["responses"] == 18
    assert counts["scored"] + counts["failed"] == 18 and counts["scored"] > 0
    # every response carries what produced it
    row = _q(db, "SELECT model, sampling, seed, finish_reason, completion_tokens, latency_ms FROM responses LIMIT 1")[0]
    assert row[0] == "smollm2-135m-instruct" and json.loads(row[1])["max_tokens"] == 12
    assert row[3] in ("stop", "length") and row[4] > 0 and row[5] > 0
    # the ledger: one ok call per response, plus judge calls (one or two per response)
    calls = dict(_q(db, "SELECT status, count(*) FROM model_calls GROUP BY 1"))
    assert 18 + 18 <= calls["ok"] <= 18 + 36 and summary.model_calls == sum(calls.values())
    # pairs are exactly best-vs-worst with margin >= 1, recomputed here in SQL
    expected = _q(db, "SELECT count(*) FROM (SELECT r.prompt_id FROM scores s JOIN responses r USING (response_id) "
                      "GROUP BY 1 HAVING count(*) >= 2 AND max(value) - min(value) >= 1)")[0][0]  # fmt: skip
    assert summary.pairs == expected
    status = _q(db, f"SELECT status FROM run_ends WHERE run_id = '{summary.run_id}'")
    assert status == [("completed",)] and orphan_run_ids(db) == {}


@pytest.mark.model
def test_rerun_makes_zero_model_calls_and_the_same_pairs(first_run):
    tmp, config, summary = first_run
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    calls_before = _q(config.warehouse, "SELECT count(*) FROM model_calls")[0][0]
    result = runner.invoke(app, ["run", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "score[judge]" in result.stdout  # stage names are shown as text, not read as rich markup
    assert _q(config.warehouse, "SELECT count(*) FROM model_calls")[0][0] == calls_before
    runs = [r[0] for r in _q(config.warehouse, "SELECT run_id FROM runs ORDER BY started_at")]
    assert len(runs) == 2
    pair_sets = [
        {r[0] for r in _q(config.warehouse, f"SELECT pair_id FROM run_pairs WHERE run_id = '{run}'")} for run in runs
    ]
    assert pair_sets[0] and pair_sets[0] == pair_sets[1]


@pytest.mark.model
def test_adding_prompts_computes_only_the_new_ones(first_run):
    tmp, config, _ = first_run
    prompts = write_jsonl(tmp / "more.jsonl", [*PROMPTS, "What color is the sky on a clear day?"])
    bigger = config.model_copy(update={"prompts": config.prompts.model_copy(update={"path": str(prompts)})})
    summary = synthesize(config=bigger)
    gen = next(s for s in summary.stages if s.stage == "generate")
    score = next(s for s in summary.stages if s.stage.startswith("score"))
    assert (gen.total, gen.reused, gen.new, gen.model_calls) == (21, 18, 3, 3)
    assert score.reused == 18 and score.new + score.failed == 3
    assert 3 <= score.model_calls <= 6


@pytest.mark.model
def test_stats_and_export_commands(first_run):
    tmp, config, summary = first_run
    result = runner.invoke(app, ["stats", "--db", config.warehouse, "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert {"prompts", "responses", "scores", "pairs", "model_calls"} <= set(stats)
    assert stats["prompts"] == 6 and stats["responses"] == 18
    latest = _q(config.warehouse, "SELECT count(*) FROM v_pairs_export")[0][0]
    assert latest == summary.pairs > 0  # the precondition: there is a dataset to check
    assert stats["pairs_by_source"] == {"sampled": stats["pairs"]}
    out = tmp / "export"
    result = runner.invoke(app, ["export", "--db", config.warehouse, "--out", str(out), "--format", "trl"])
    assert result.exit_code == 0, result.output
    ds = datasets.Dataset.from_parquet(str(out / "train.parquet"))
    assert len(ds) == latest and "margin" not in ds.column_names  # no margin unless --margin asks for one
    for row in ds:
        assert row["chosen"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"
        assert row["score_chosen"] - row["score_rejected"] == row["score_gap"] >= 1 and row["source"] == "sampled"
    assert _q(config.warehouse, "SELECT n_pairs FROM dataset_snapshots ORDER BY created_at DESC LIMIT 1") == [(latest,)]


# ---- bad input: a clear error and nothing written ------------------------------------------------------------


def _fails_cleanly(tmp_path, config, error, match):
    with pytest.raises(error, match=match):
        synthesize(config=config)
    db = tmp_path / "w.duckdb"
    assert not db.exists() or _q(db, "SELECT count(*) FROM runs") == [(0,)]


def test_unreachable_endpoint(tmp_path, prefect_harness):
    prompts = write_jsonl(tmp_path / "p.jsonl", ["hi"])
    remote = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "NOT_USED_KEY"}
    config = small_config(tmp_path, prompts, generation={"models": [remote]},
                          scorers=[{"kind": "pointwise_judge", "model": remote}])  # fmt: skip
    import os

    os.environ["NOT_USED_KEY"] = "sk-do-not-print"
    try:
        _fails_cleanly(tmp_path, config, EndpointError, r"http://127.0.0.1:9/v1 \(m\) is unreachable")
    finally:
        del os.environ["NOT_USED_KEY"]


def test_missing_gguf(tmp_path, prefect_harness):
    prompts = write_jsonl(tmp_path / "p.jsonl", ["hi"])
    config = small_config(tmp_path, prompts, generation={"models": [{"gguf": str(tmp_path / "gone.gguf")}]})
    _fails_cleanly(tmp_path, config, ModelFileError, "gone.gguf")


@pytest.mark.model  # the flow starts the local server before it reads the prompts
def test_empty_prompt_file(tmp_path, prefect_harness):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("")
    _fails_cleanly(tmp_path, small_config(tmp_path, prompts), InputError, "no prompts found")


@pytest.mark.model
def test_malformed_prompt_line(tmp_path, prefect_harness):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    _fails_cleanly(tmp_path, small_config(tmp_path, prompts), InputError, r"p.jsonl:2: invalid JSON")


def test_invalid_config_field_via_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prompts: {builtin: quickstart}\ngeneration: {models: [{gguf: smollm2-135m-instruct}], "
                    "samples_per_prompt: -1}\nscorers: []\nwarehouse: " + str(tmp_path / "w.duckdb") + "\n")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "generation.samples_per_prompt" in result.output and "scorers" in result.output
    assert not (tmp_path / "w.duckdb").exists()


def test_every_command_has_help_with_an_example():
    """Every command the CLI registers, sub-commands included (`review export`), not a list that can go stale."""
    import typer.main

    def commands(group: Any, path: list[str]) -> Iterator[list[str]]:
        for name, command in group.commands.items():
            yield from commands(command, [*path, name]) if hasattr(command, "commands") else [[*path, name]]

    found = list(commands(typer.main.get_command(app), []))
    assert {"run", "report", "datasets"} <= {p[0] for p in found} and ["review", "import"] in found  # precondition
    for command in found:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output, command
