"""Sharded runs (flows/shards.py): the split of prompts into shards, one shard run alone, the error without a
shared Prefect server, and `prefsynth run --shards 2` against a real `prefect server start` with two process
workers, writing one DuckLake on a real PostgreSQL. The model endpoint is the loopback server with
deterministic answers: this tests orchestration (which calls are made where, and how often), not a model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefsynth.cli import app
from prefsynth.errors import ConfigError
from prefsynth.flows.shards import parse_shard, shard_of
from prefsynth.warehouse.ids import prompt_id
from prefsynth.warehouse.store import Store
from tests.conftest import write_jsonl
from tests.fake_server import CountingServer

PROMPTS = [f"Question {i}: name a colour you like." for i in range(8)]


def _config(folder: Path, url: str, warehouse: str) -> Path:
    model = {"base_url": url, "model": "m", "max_retries": 0, "max_concurrency": 4}
    raw = {"name": "sharded", "prompts": {"path": str(write_jsonl(folder / "p.jsonl", PROMPTS))},
           "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"max_tokens": 16, "seed": 1}},
           "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}], "curation": {"min_margin": 1},
           "export": [{"format": "trl", "path": str(folder / "export")}], "warehouse": warehouse}  # fmt: skip
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _pairs(warehouse: str, run_id: str) -> set[str]:
    with Store(warehouse, read_only=True) as store:
        return {r[0] for r in store.con.execute("SELECT pair_id FROM run_pairs WHERE run_id = $1", [run_id]).fetchall()}


def _ran(worker_log: str, flow_run_id: object) -> bool:
    """Whether a worker's log shows it started the flow run (both workers may try; the server refuses one)."""
    return (f"submitting flow run '{flow_run_id}'" in worker_log
            and f"Aborted submission of flow run '{flow_run_id}'" not in worker_log)  # fmt: skip


# ---- the split (no server) ----------------------------------------------------------------------------
def test_shards_are_stable_hash_ranges_that_hold_every_prompt_once() -> None:
    ids = [prompt_id([{"role": "user", "content": f"prompt {i}"}]) for i in range(2000)]
    for count in (1, 2, 3, 7):
        shards = [shard_of(i, count) for i in ids]
        assert all(0 <= s < count for s in shards)  # each prompt in exactly one shard of `count`
        assert set(shards) == set(range(count))  # 2000 hashes leave no range empty
        assert shards == [shard_of(i, count) for i in reversed(ids)][::-1]  # the order of the prompts is irrelevant
        # ranges: a shard's ids form one contiguous block of the sorted ids
        ordered = [shard_of(i, count) for i in sorted(ids)]
        assert ordered == sorted(ordered)
    # another N draws other boundaries; doubling N splits each range in two
    assert all(shard_of(i, 4) // 2 == shard_of(i, 2) for i in ids)
    assert sum(shard_of(i, 2) != shard_of(i, 3) for i in ids) > 0
    assert shard_of("0" * 32, 5) == 0 and shard_of("f" * 32, 5) == 4


def test_shard_names_are_checked() -> None:
    assert parse_shard("1/2") == (1, 2)
    for bad, says in [("2/2", "counts from 0 to 1"), ("1-2", "INDEX/COUNT"), ("0/0", "1 to 1024")]:
        with pytest.raises(ConfigError, match=says):
            parse_shard(bad)


# ---- one process (Prefect's test harness) --------------------------------------------------------------------
def test_two_shards_run_alone_make_every_call_and_the_whole_run_then_makes_none(prefect_harness, tmp_path) -> None:
    """`--shard 0/2` and `--shard 1/2` in turn, then the whole config: the shards made the calls a one-process
    run makes (on another warehouse), curated nothing, and the whole run found every call and made its pairs."""
    from prefsynth.api import run

    with CountingServer(latency_s=0.0) as server:
        config = _config(tmp_path, server.base_url, str(tmp_path / "shards.duckdb"))
        reference = run(config, db=tmp_path / "one.duckdb")
        calls = len(server.requests)
        assert reference.summary.pairs > 0 and calls == reference.summary.model_calls, "precondition: pairs, calls"
        halves = [run(config, shard=f"{i}/2") for i in range(2)]
        assert [h.summary.pairs for h in halves] == [0, 0] and all(not h.summary.exports for h in halves)
        assert sum(h.summary.prompts for h in halves) == len(PROMPTS) and min(h.summary.prompts for h in halves) > 0
        assert sum(h.summary.model_calls for h in halves) == calls and len(server.requests) == 2 * calls
        whole = run(config)
        assert whole.summary.model_calls == 0 and len(server.requests) == 2 * calls
    assert _pairs(str(tmp_path / "shards.duckdb"), whole.run_id) == _pairs(str(tmp_path / "one.duckdb"),
                                                                          reference.run_id)  # fmt: skip


def test_sharded_runs_need_a_shared_prefect_server(tmp_path, monkeypatch) -> None:
    import prefsynth.flows.deploy  # noqa: F401 - imported before the patch: it binds the real function
    import prefsynth.flows.prefect_api as prefect_api

    config = _config(tmp_path, "http://127.0.0.1:9/v1", str(tmp_path / "w.duckdb"))
    monkeypatch.setattr(prefect_api, "configured_api_url", lambda: None)
    result = CliRunner().invoke(app, ["run", str(config), "--shards", "2"])
    assert result.exit_code == 2 and "PREFECT_API_URL" in result.output and "prefect worker start --pool prefsynth" \
        in " ".join(result.output.split()), result.output  # fmt: skip
    monkeypatch.undo()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing answers there
    result = CliRunner().invoke(app, ["run", str(config), "--shards", "2"])
    assert result.exit_code == 2 and "does not answer" in " ".join(result.output.split()), result.output
    result = CliRunner().invoke(app, ["run", str(config), "--shards", "2", "--shard", "0/2"])
    assert result.exit_code == 2 and "not both" in " ".join(result.output.split()), result.output


# ---- a real Prefect server, two process workers, a DuckLake on PostgreSQL ----------------------------------
@pytest.mark.prefect_server
@pytest.mark.postgres
def test_two_shards_on_two_workers_equal_one_process_and_a_rerun_makes_no_call(pg, tmp_path, monkeypatch) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefsynth.api import run, run_shards
    from prefsynth.flows.prefect_api import _drain as drain
    from tests.prefect_server import PrefectServer, kill_group

    lake = pg.create_db(f"s_{uuid.uuid4().hex[:12]}") + f"?data_path={tmp_path / 'lake-data'}"
    catalog = lake.split("?")[0]
    prefect_home = tmp_path / "prefect"
    prefect_home.mkdir()
    with CountingServer(latency_s=0.01) as model, PrefectServer(prefect_home) as server:
        config = _config(tmp_path, model.base_url, lake)
        for key in ("PREFECT_API_URL", "PREFECT_HOME"):
            monkeypatch.setenv(key, server.env[key])
        workers = []
        with temporary_settings(updates={PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
            # the one-process run of the same config, on a single file
            reference = run(config, db=tmp_path / "one.duckdb")
            calls = len(model.requests)
            assert reference.summary.pairs > 0 and calls > 0, "precondition: the one-process run made pairs"

            client.create_work_pool(WorkPoolCreate(name="shards-test", type="process"))
            try:
                for n in range(2):  # one flow run at a time each: the two shards run on the two workers
                    workers.append(subprocess.Popen(
                        [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", "shards-test",
                         "--type", "process", "--limit", "1", "--name", f"worker-{n}"], cwd=tmp_path, env=server.env,
                        start_new_session=True, stdout=(tmp_path / f"worker-{n}.log").open("wb"),
                        stderr=subprocess.STDOUT))  # fmt: skip
                result = CliRunner().invoke(app, ["run", str(config), "--shards", "2", "--pool", "shards-test"])
                assert result.exit_code == 0, result.output + server.tail()
                sharded_calls = len(model.requests) - calls
                again = run_shards(config, 2, pool="shards-test")
            finally:
                for worker in workers:
                    kill_group(worker, grace_s=3)
            children = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["prefsynth-shards"])))  # fmt: skip
            drain()  # this process's flow logs, while the server answers

    assert sharded_calls == calls, "the shards made the calls of one process, each once"
    assert len(model.requests) == 2 * calls and again.summary.model_calls == 0
    assert [row["calls"] for row in again.shards] == [0, 0] and [r["state"] for r in again.shards] == ["Completed"] * 2
    assert "Completed" in result.output and "shard" in result.output
    # two child runs per parent run, all completed, each on a worker (which one is the workers' race)
    assert len(children) == 4 and all(c.state is not None and c.state.is_completed() for c in children)
    logs = [(tmp_path / f"worker-{n}.log").read_text(errors="replace") for n in range(2)]
    first = sorted(children, key=lambda c: c.created)[:2]
    ran = {str(c.id): [n for n, log in enumerate(logs) if _ran(log, c.id)] for c in children}
    assert all(len(on) == 1 for on in ran.values()), logs  # each run on one worker (both may try: one wins)
    with Store(catalog, read_only=True) as store:
        ends = store.con.execute("SELECT r.run_id, r.flow_run_id, e.summary FROM runs r JOIN run_ends e "
                                 "USING (run_id)").fetchall()  # fmt: skip
    by_flow = {flow_run: (run_id, json.loads(summary)) for run_id, flow_run, summary in ends}
    shard_runs = [by_flow[str(c.id)] for c in first]
    assert sum(s["prompts"] for _, s in shard_runs) == len(PROMPTS) and all(s["pairs"] == 0 for _, s in shard_runs)
    finals = [(run_id, s) for run_id, s in by_flow.values() if s["pairs"]]
    assert len(finals) == 2 and all(sum(st["model_calls"] for st in s["stages"]) == 0 for _, s in finals)
    expected = _pairs(str(tmp_path / "one.duckdb"), reference.run_id)
    assert all(_pairs(catalog, run_id) == expected for run_id, _ in finals)
