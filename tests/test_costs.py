"""Cost control: prices per endpoint give costs per run, stage and model; a budget stops new calls, and a
rerun finishes with only the missing ones. The endpoint is a loopback server with deterministic answers
(every call reports 31 prompt + 9 completion tokens): this tests accounting, not a model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import duckdb
import pytest
import yaml

from prefsynth.backends.budget import BUDGET_EXHAUSTED, spending
from prefsynth.backends.client import Endpoint, ModelClient
from prefsynth.errors import ConfigError
from prefsynth.schemas.config import Budget, parse_config
from tests.conftest import write_jsonl
from tests.fake_server import CountingServer

PRICE = {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}
CALL_TOKENS = 31 + 9  # what the recorded reply's usage says
CALL_COST = (31 * 1000.0 + 9 * 2000.0) / 1e6
PROMPTS = [f"Question {i}: name a color." for i in range(10)]
JOB_CALLS = 10 * 2 * 2  # two samples per prompt, each rated once
LIMIT_CALLS = 24  # the first run's budget: this many calls' tokens


def _endpoint(url: str, price: tuple[float, float] | None = (1000.0, 2000.0)) -> Endpoint:
    return Endpoint(label="m", identity="fake#m", base_url=url, model="m", api_key="k", concurrency=1,
                    timeout_s=10, max_retries=0, is_local=False, price=price)  # fmt: skip


def test_a_spent_budget_refuses_new_requests_but_answers_cached_ones():
    async def ask(ep: Endpoint, texts: list[str]) -> list:
        async with ModelClient(ep) as client:
            return [await client.chat({"messages": [{"role": "user", "content": t}]}) for t in texts]

    with CountingServer(latency_s=0) as server, spending(Budget(max_tokens=2 * CALL_TOKENS)) as budget:
        first = asyncio.run(ask(_endpoint(server.base_url), ["a", "b", "c", "a"]))
        assert budget is not None
    assert [o.ok for o in first] == [True, True, False, True] and len(server.requests) == 2
    refused = first[2]
    assert refused.cached and refused.call.error.startswith(BUDGET_EXHAUSTED)  # not sent, nothing to record
    assert first[3].cached and first[3].text == first[0].text  # a repeated request costs nothing
    assert budget.tokens == 2 * CALL_TOKENS and budget.calls == 2 and budget.cost == pytest.approx(2 * CALL_COST)
    assert first[0].call.input_per_mtok == 1000.0 and first[0].call.output_per_mtok == 2000.0


def test_without_a_budget_nothing_is_refused_and_prices_are_optional():
    async def ask(ep: Endpoint) -> list:
        async with ModelClient(ep) as client:
            return [await client.chat({"messages": [{"role": "user", "content": str(i)}]}) for i in range(3)]

    with CountingServer(latency_s=0) as server:
        out = asyncio.run(ask(_endpoint(server.base_url, price=None)))
    assert all(o.ok for o in out) and out[0].call.input_per_mtok is None


def test_a_money_budget_needs_a_price_on_every_endpoint_model():
    raw = {"prompts": {"builtin": "quickstart"}, "budget": {"max_cost": 1.0},
           "generation": {"models": [{"base_url": "http://h/v1", "model": "m", "price": PRICE}]},
           "scorers": [{"kind": "pointwise_judge", "model": {"base_url": "http://h/v1", "model": "j"}}]}  # fmt: skip
    with pytest.raises(ConfigError, match="no `price`: j"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="give `max_tokens`, `max_cost` or both"):
        parse_config({**raw, "budget": {}})
    raw["scorers"][0]["model"]["price"] = PRICE
    config = parse_config(raw)
    assert config.budget is not None and config.budget.max_cost == 1.0
    # a config without prices or budget is stored as before they existed (ids made from it do not move)
    plain = parse_config({**raw, "budget": None, "generation": {"models": [{"base_url": "http://h/v1", "model": "m"}]}})
    assert "budget" not in plain.model_dump() and "price" not in plain.model_dump()["generation"]["models"][0]


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("prefsynth")
    return subprocess.run([str(cli), *args], env=env, capture_output=True, text=True, timeout=300)


def _job(tmp: Path, url: str, budget: dict, slots: int) -> Path:
    model = {"base_url": url, "model": "m", "max_concurrency": slots, "max_retries": 0, "price": PRICE}
    raw = {"name": "budget", "prompts": {"path": str(write_jsonl(tmp / "p.jsonl", PROMPTS))},
           "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"max_tokens": 16}},
           "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
           "curation": {"min_margin": 1}, "export": [{"format": "trl", "path": str(tmp / "export")}],
           "warehouse": str(tmp / "w.duckdb"), "budget": budget}  # fmt: skip
    path = tmp / f"job-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_budget_stops_the_run_cleanly_and_a_rerun_makes_only_the_missing_calls(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    slots = 2
    db = tmp_path / "w.duckdb"
    with CountingServer(latency_s=0.01) as server:
        job = _job(tmp_path, server.base_url, {"max_tokens": LIMIT_CALLS * CALL_TOKENS}, slots)
        stopped = _cli(["run", str(job)], env)
        out = stopped.stdout + stopped.stderr
        assert stopped.returncode == 3, out
        assert "budget is spent" in out and f"of max_tokens {LIMIT_CALLS * CALL_TOKENS}" in out and "continue" in out
        first_requests = len(server.requests)

        with duckdb.connect(str(db), read_only=True) as con:
            (status,) = con.execute("SELECT status FROM run_ends").fetchone()
            calls = con.execute("SELECT count(*), sum(prompt_tokens + completion_tokens) FROM model_calls").fetchone()
            refused = con.execute("SELECT count(*) FROM failures WHERE error LIKE 'budget exhausted%'").fetchone()[0]
        assert status == "budget_exhausted"
        # the bound: calls until the limit is reached (24 of 40 tokens), plus those in flight then (< slots);
        # every request the server got is recorded (nothing paid and lost)
        assert LIMIT_CALLS <= calls[0] <= LIMIT_CALLS + slots - 1 and calls[0] == first_requests < JOB_CALLS
        assert refused >= 1  # items in flight when it stopped are recorded as not done
        assert not (tmp_path / "export").exists()  # no partial export replaced anything
        with duckdb.connect(str(db), read_only=True) as con:  # nor made the judge look unreliable
            assert con.execute("SELECT count(*) FROM scorer_diagnostics").fetchone() == (0,)

        stats = _cli(["stats", "--db", str(db), "--json"], env)
        costs = json.loads(stats.stdout)["costs"]
        assert {r["stage"] for r in costs} == {"generate[m]", "score[judge]"}
        assert sum(r["calls"] for r in costs) == calls[0]
        assert sum(r["cost"] for r in costs) == pytest.approx(calls[0] * CALL_COST)
        assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in costs) == calls[0] * CALL_TOKENS

        done = _cli(["run", str(_job(tmp_path, server.base_url, {"max_cost": 100.0}, slots))], env)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        missing = JOB_CALLS - calls[0]
        assert len(server.requests) == JOB_CALLS  # the rerun paid only for what was missing
        assert f"{missing} new model calls" in out and f"in {missing} calls" in out  # the budget line

    table = _cli(["stats", "--db", str(db)], env).stdout
    assert "tokens and cost per run, stage and model" in table and "score[judge]" in table
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*), sum(cost) FROM v_model_costs").fetchone()[1] == pytest.approx(
            JOB_CALLS * CALL_COST)
        assert con.execute("SELECT count(*) FROM model_calls WHERE stage IS NULL").fetchone() == (0,)
    assert (tmp_path / "export" / "train.parquet").exists()
