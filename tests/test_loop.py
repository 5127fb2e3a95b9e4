"""The synthesis loop (issue 11, Anyprefer style): reply parsing, the stop rule, and whole loops.

The check's and the optimizer's replies are injected by the loopback server where a real model cannot be
steered (which pairs pass, what the new prompts say); the end-to-end run uses the real SmolLM2 server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from prefsynth.api import run_loop
from prefsynth.errors import ConfigError
from prefsynth.schemas.config import LoopSpec, parse_config
from prefsynth.tasks.loop import CHECK_SYSTEM, OPTIMIZE_SYSTEM, parse_check, parse_proposal, stop_reason
from tests.conftest import write_jsonl
from tests.fake_server import FakeOpenAI, Reply, chat_reply, deterministic_reply

EXAMPLE = Path(__file__).parent.parent / "examples" / "synthesis-loop.yaml"


def test_check_reply_parses_score_and_rationale() -> None:
    assert parse_check('```json\n{"rationale": "clear gap", "score": "8"}\n```') == (8.0, "clear gap")
    with pytest.raises(ValueError, match="outside 1..10"):
        parse_check('{"rationale": "x", "score": 11}')
    with pytest.raises(ValueError, match='no "score"'):
        parse_check('{"rationale": "x"}')


def test_optimizer_reply_needs_two_real_prompts() -> None:
    got = parse_proposal('{"target_system_prompt": " Be exact. ", "judge_rubric": "Reward exactness."}')
    assert (got.target_system_prompt, got.judge_rubric) == ("Be exact.", "Reward exactness.")
    with pytest.raises(ValueError, match='no "judge_rubric"'):
        parse_proposal('{"target_system_prompt": "Be exact."}')
    with pytest.raises(ValueError, match="placeholder"):
        parse_proposal('{"target_system_prompt": "<the new system prompt>", "judge_rubric": "Reward it."}')
    with pytest.raises(ValueError, match="not blank"):
        parse_proposal('{"target_system_prompt": "  ", "judge_rubric": "Reward it."}')


def test_stop_rule() -> None:
    spec = LoopSpec(max_rounds=3, target_rate=0.5)
    assert stop_reason(spec, 1, 0.5) == "target_rate"
    assert stop_reason(spec, 1, 0.4) is None
    assert stop_reason(spec, 1, None) is None
    assert stop_reason(spec, 3, 0.4) == "max_rounds"


def test_loop_config_needs_a_pointwise_judge_and_best_vs_worst(tmp_path: Path) -> None:
    raw = _config("http://x/v1", tmp_path, {"max_rounds": 2})
    raw["scorers"][0] = {**raw["scorers"][0], "kind": "pairwise_judge"}
    with pytest.raises(ConfigError, match="must be a pointwise_judge"):
        parse_config(raw)


def _config(url: str, tmp_path: Path, loop: dict[str, Any]) -> dict[str, Any]:
    prompts = write_jsonl(tmp_path / "p.jsonl", ["Name a prime.", "Say hi.", "What is 2+2?"])
    model = {"base_url": url, "model": "m"}
    return {"name": "loop-test", "prompts": {"path": str(prompts)},
            "generation": {"models": [model], "samples_per_prompt": 3, "sampling": {"max_tokens": 16}},
            "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
            "curation": {"rule": "best_vs_worst", "min_margin": 1}, "loop": loop,
            "warehouse": str(tmp_path / "w.duckdb")}  # fmt: skip


def _replying(check_score: int) -> FakeOpenAI:
    """Generation and the judge answer deterministically; the check gives `check_score`; the optimizer
    proposes fixed prompts."""

    def respond(body: dict[str, Any]) -> Reply:
        system = body["messages"][0]["content"]
        if system == CHECK_SYSTEM:
            return chat_reply(json.dumps({"rationale": "injected", "score": check_score}))
        if system == OPTIMIZE_SYSTEM:
            return chat_reply(json.dumps({"target_system_prompt": "Answer in one exact sentence.",
                                          "judge_rubric": "Reward exact one-sentence answers."}))  # fmt: skip
        return deterministic_reply(body)

    return FakeOpenAI(respond)


def test_loop_stops_early_when_target_rate_is_reached(tmp_path: Path, prefect_harness: None) -> None:
    with _replying(check_score=9) as fake:
        summary, _ = run_loop(_config(fake.base_url, tmp_path, {"max_rounds": 3, "target_rate": 0.5}))
        assert summary.rounds[0].pairs > 0, "precondition: round 1 made pairs"
        assert [r.stop_reason for r in summary.rounds] == ["target_rate"]
        assert summary.rounds[0].acceptance_rate == 1.0
        assert not any(r["messages"][0]["content"] == OPTIMIZE_SYSTEM for r in fake.requests)


def test_loop_rewrites_prompts_records_versions_and_reruns_free(tmp_path: Path, prefect_harness: None) -> None:
    config = _config("", tmp_path, {"max_rounds": 2, "accept_threshold": 7, "target_rate": 0.9})
    with _replying(check_score=3) as fake:
        for m in (config["generation"]["models"][0], config["scorers"][0]["model"]):
            m["base_url"] = fake.base_url
        summary, _ = run_loop(config)
        first = len(fake.requests)
        assert summary.rounds[0].pairs > 0 and summary.rounds[0].accepted == 0, "precondition: pairs all rejected"
        assert [r.stop_reason for r in summary.rounds] == [None, "max_rounds"]
        assert len({r.target_version for r in summary.rounds}) == 2
        assert len({r.judge_version for r in summary.rounds}) == 2
        # round 2 ran with the optimizer's prompts: the target's system turn and the judge's rubric
        systems = {r["messages"][0]["content"] for r in fake.requests}
        assert "Answer in one exact sentence." in systems
        assert any("Reward exact one-sentence answers." in r["messages"][-1]["content"] for r in fake.requests)

        again, _ = run_loop(config)
        assert len(fake.requests) == first, "a rerun of the loop makes no call"
        assert again.model_calls == 0 and again.loop_id == summary.loop_id

    with duckdb.connect(config["warehouse"], read_only=True) as con:
        versions = con.sql("SELECT role, round, parent_id IS NULL, rounds, acceptance_rate FROM v_prompt_versions "
                           "ORDER BY role, round").fetchall()  # fmt: skip
        assert versions == [("judge", 1, True, 1, 0.0), ("judge", 2, False, 1, 0.0),
                            ("target", 1, True, 1, 0.0), ("target", 2, False, 1, 0.0)]  # fmt: skip
        assert con.sql("SELECT count(*) FROM loop_rounds").fetchone() == (2,)
        checked = con.sql("SELECT count(*), count(*) FILTER (WHERE NOT accepted) FROM loop_pairs").fetchone()
        assert checked[0] == sum(r.pairs for r in summary.rounds) == checked[1]


@pytest.mark.model
def test_example_loop_on_the_embedded_model(tmp_path: Path, prefect_harness: None) -> None:
    db = tmp_path / "loop.duckdb"
    summary, _ = run_loop(EXAMPLE, db=db)
    first = summary.rounds[0]
    with duckdb.connect(str(db), read_only=True) as con:
        # fetched at once: a relation kept past `with` keeps the file's instance alive, and DuckDB's next
        # connect to it in this process spins until it is gone
        checks = con.sql("SELECT count(*) FROM loop_pairs JOIN loop_rounds USING (round_id) WHERE round = 1").fetchone()
        assert first.pairs > 0 and checks == (first.pairs,), "precondition: round 1's pairs were checked"
        assert len(summary.rounds) <= 2 and summary.stop_reason in ("max_rounds", "target_rate", "unchanged")
        versions = con.sql("SELECT version_id, role, acceptance_rate FROM v_prompt_versions").fetchall()
    used = {r.target_version for r in summary.rounds} | {r.judge_version for r in summary.rounds}
    assert {v[0] for v in versions} == used and all(v[2] is not None for v in versions)

    again, _ = run_loop(EXAMPLE, db=db)
    assert again.model_calls == 0 and [r.model_dump(exclude={"model_calls", "pipeline_run_id"}) for r in again.rounds] \
        == [r.model_dump(exclude={"model_calls", "pipeline_run_id"}) for r in summary.rounds]


def test_a_loop_budget_covers_its_rounds_and_a_rerun_goes_on_without_paying_twice(
    tmp_path: Path, prefect_harness: None
) -> None:
    config = _config("", tmp_path, {"max_rounds": 2, "accept_threshold": 7, "target_rate": 0.9})
    with _replying(check_score=3) as fake:
        for m in (config["generation"]["models"][0], config["scorers"][0]["model"]):
            m["base_url"], m["max_concurrency"] = fake.base_url, 1
        stopped, _ = run_loop({**config, "budget": {"max_tokens": 10 * 40}})  # 10 calls of round 1's 18
        assert [r.stop_reason for r in stopped.rounds] == ["budget_exhausted"]
        assert len(fake.requests) == 10 and stopped.model_calls == 10
        with duckdb.connect(config["warehouse"], read_only=True) as con:
            assert con.sql("SELECT count(*) FROM loop_rounds").fetchone() == (0,)  # an unfinished round is not kept

        done, _ = run_loop(config)
        assert [r.stop_reason for r in done.rounds] == [None, "max_rounds"] and done.rounds[0].pairs > 0
    with duckdb.connect(config["warehouse"], read_only=True) as con:
        calls, distinct = con.sql("SELECT count(*), count(DISTINCT call_id) FROM model_calls").fetchone()
    assert calls == distinct == len(fake.requests)  # every request recorded once: nothing was paid twice
