"""A run through the fault proxy in front of the real llama.cpp server (SmolLM2): it finishes, every HTTP
request is on a recorded call, every injected fault is counted in the warehouse and in `prefsynth stats`,
nothing is lost or duplicated, and a rerun requests only what failed."""

from __future__ import annotations

import json

import duckdb
import pytest
from typer.testing import CliRunner

from prefsynth.backends.local import LocalServers
from prefsynth.cli import app
from prefsynth.flows.synthesize import synthesize
from prefsynth.schemas.config import ModelSpec
from tests.conftest import small_config, write_jsonl
from tests.fault_proxy import FaultProxy

PROMPTS = ["Name one primary color.", "What is 3 + 4?", "What do bees make?"]
RATES = {"rate_limit": 0.15, "error": 0.15, "slow": 0.08, "drop": 0.12}  # half the requests fail


def _q(db, sql, params=None):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


@pytest.mark.model
def test_a_run_through_the_fault_proxy_finishes_counts_every_fault_and_reruns_only_what_failed(
    tmp_path, prefect_harness
):
    with LocalServers() as servers:
        upstream = servers.endpoint(ModelSpec(gguf="smollm2-135m-instruct")).base_url
        # one request at a time, so the opening faults fall on the first two calls, each out of its one retry;
        # then half the requests fail, at random (seeded), so about a quarter of the calls run out of retries
        opening = ["rate_limit", "error", "slow", "drop"]
        with FaultProxy(upstream, RATES, seed=7, retry_after_s=1, slow_s=8, opening=opening) as proxy:
            model = {"name": "smol", "base_url": proxy.base_url, "model": "smollm2-135m-instruct",
                     "server": "llama-cpp", "max_concurrency": 1, "timeout_s": 6, "max_retries": 1}  # fmt: skip
            config = small_config(
                tmp_path, write_jsonl(tmp_path / "p.jsonl", PROMPTS),
                generation={"models": [model], "samples_per_prompt": 2,
                            "sampling": {"temperature": 1.0, "max_tokens": 8, "seed": 1}},
                scorers=[{"kind": "pointwise_judge", "model": model, "max_tokens": 40}])  # fmt: skip
            first = synthesize(config=config)
            posts, faults, upstream_errors = proxy.posts, dict(proxy.faults), proxy.upstream_errors
            proxy.reset(rates={})  # the rerun meets no faults
            second = synthesize(config=config)
            rerun_posts, upstream_errors = proxy.posts, upstream_errors + proxy.upstream_errors
    db = config.warehouse
    assert first.status == "completed" and second.status == "completed"

    # the first run: every request it sent is on a recorded call, and every fault is counted
    calls = _q(db, "SELECT call_id, status, attempts, rate_limited, server_errors, timeouts, dropped, wait_ms "
                   "FROM model_calls WHERE run_id = ?", [first.run_id])  # fmt: skip
    failed = {c[0] for c in calls if c[1] == "error"}
    assert failed and all(faults.get(f) for f in RATES), faults  # the precondition: faults hit, some calls failed
    assert upstream_errors == 0  # no fault but those drawn
    assert sum(c[2] for c in calls) == posts
    assert sum(c[3] for c in calls) == faults["rate_limit"] and sum(c[4] for c in calls) == faults["error"]
    assert sum(c[6] for c in calls) == faults["drop"]
    assert sum(c[5] for c in calls) >= faults["slow"]  # each slow answer was abandoned at the timeout
    assert all(c[7] > 0 for c in calls if c[2] > 1)  # each retry waited (Retry-After or backoff)
    assert all(c[2] == 2 for c in calls if c[1] == "error")  # a failed call used its one retry

    # ...and `prefsynth stats` shows the same, per endpoint
    out = CliRunner().invoke(app, ["stats", "--db", db, "--json"])
    assert out.exit_code == 0, out.output
    (row,) = [r for r in json.loads(out.output)["retries_by_endpoint"] if r["model"].endswith("smollm2-135m-instruct")]
    totals = _q(db, "SELECT count(*), sum(attempts), sum(timeouts) FROM model_calls")[0]
    assert (row["calls"], row["requests"], row["timeouts"]) == totals and totals[1] == posts + rerun_posts
    # over both runs: the rerun meets no injected fault, but a loaded machine can still time a request out
    assert row["retries"] == totals[1] - totals[0] and row["rate_limited"] == faults["rate_limit"]

    # nothing lost or duplicated: in each run, every planned item has a result or a failure row; the rerun
    # plans what failed in the first (and the scores of the responses it makes)
    counts = {}
    for run in (first.run_id, second.run_id):
        counts[run] = _q(db, "SELECT (SELECT count(*) FROM responses WHERE run_id = $1), (SELECT count(DISTINCT "
                             "item_id) FROM failures WHERE run_id = $1 AND stage = 'generate'), (SELECT count(*) FROM "
                             "scores WHERE run_id = $1), (SELECT count(DISTINCT item_id) FROM failures WHERE run_id = "
                             "$1 AND stage = 'score')", [run])[0]  # fmt: skip
    made1, gen_failed1, scored1, score_failed1 = counts[first.run_id]
    made2, gen_failed2, scored2, score_failed2 = counts[second.run_id]
    assert made1 + gen_failed1 == len(PROMPTS) * 2 and scored1 + score_failed1 == made1
    assert made2 + gen_failed2 == gen_failed1 and scored2 + score_failed2 == made2 + score_failed1
    responses = _q(db, "SELECT response_id FROM responses")
    assert len(responses) == len({r for (r,) in responses}) == len(PROMPTS) * 2  # all made by the end
    ok_twice = _q(db, "SELECT call_id FROM model_calls WHERE status = 'ok' GROUP BY 1 HAVING count(*) > 1")
    assert ok_twice == []  # no answered call was paid for twice

    # the rerun requested only what failed (and what depended on it), once each, with no fault to retry
    again = _q(db, "SELECT call_id, attempts FROM model_calls WHERE run_id = ?", [second.run_id])
    ok_first = {c[0] for c in calls if c[1] == "ok"}
    assert rerun_posts == len(again) == sum(a for _, a in again) and failed <= {c for c, _ in again}
    assert not ok_first & {c for c, _ in again}
