"""Deployments against a real `prefect server start` on loopback (its own PREFECT_HOME, a free port).

`prefsynth serve` serves a config whose paths are relative; two runs are started through the API at once
(they take turns on the warehouse: a Prefect concurrency limit) and others come from the schedule;
`prefsynth deploy` registers the same config on a process work pool, and a real `prefect worker` runs it;
the shipped examples/prefect.yaml registers with `prefect deploy`. Every run completes with its summary
artifact, only the first one calls the model endpoint, and every later run is answered from the warehouse.
The model endpoint is the loopback server with deterministic answers (this tests deployment and
orchestration, not a model): the runs happen in processes that Prefect starts, which reach it by its URL.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from typer.testing import CliRunner

from prefsynth.cli import app
from prefsynth.flows.exclusive import limit_name
from tests.conftest import write_jsonl
from tests.fake_server import CountingServer
from tests.prefect_server import PrefectServer, kill_group

pytestmark = pytest.mark.prefect_server

PROMPTS = [f"Question {i}: name a colour." for i in range(6)]
CALLS = 6 * 2 + 6 * 2  # two samples per prompt, one rating each


def _config(folder: Path, url: str) -> Path:
    """A config with relative paths: prompts next to it, warehouse and export where the command runs."""
    model = {"base_url": url, "model": "m", "max_retries": 0}
    raw = {"name": "deployed", "prompts": {"path": "p.jsonl"},
           "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"max_tokens": 16, "seed": 1}},
           "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}], "curation": {"min_margin": 1},
           "export": [{"format": "trl", "path": "export"}], "warehouse": "w.duckdb"}  # fmt: skip
    write_jsonl(folder / "p.jsonl", PROMPTS)
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _wait(what: str, check: Any, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _runs(client: Any, deployment_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _summary(client: Any, flow_run_id: UUID) -> dict[str, Any]:
    """The run's summary artifact: its description and its table (one row per stage)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=["prefsynth-run-summary"])))
    assert len(found) == 1, f"flow run {flow_run_id} has {len(found)} summary artifacts"
    rows = found[0].data if isinstance(found[0].data, list) else yaml.safe_load(found[0].data)
    return {"description": found[0].description, "calls": sum(r["model_calls"] for r in rows),
            "stages": [r["stage"] for r in rows]}  # fmt: skip


def test_served_and_worker_deployments_run_to_completion_and_reuse_the_warehouse(tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work = tmp_path / "work"  # where the commands run: relative outputs go here
    work.mkdir()
    (tmp_path / "cfg").mkdir()
    cli = Path(sys.executable).with_name("prefsynth")
    with CountingServer(latency_s=0.01) as model, PrefectServer(tmp_path / "home") as server, \
            temporary_settings(updates={PREFECT_API_URL: server.url}), \
            get_client(sync_client=True) as client:  # fmt: skip
        config = _config(tmp_path / "cfg", model.base_url)
        serving = subprocess.Popen([str(cli), "serve", str(config), "--name", "served", "--interval", "10"], cwd=work,
                                   env=server.env, start_new_session=True, stdout=(tmp_path / "serve.log").open("wb"),
                                   stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deployment = _wait("the served deployment", lambda: _deployment(client, "prefsynth-run/served"))
            assert deployment.entrypoint == "prefsynth.flows.deploy.run_config"
            assert deployment.parameters == {"config": str(config), "base_dir": str(work), "db": None}
            # the test holds the warehouse's slot while two API runs start: both must wait, saying so
            from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
            from prefect.concurrency.sync import concurrency
            from prefect.deployments import run_deployment

            name = limit_name(work / "w.duckdb")
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            with concurrency(name, lease_duration=60, strict=True):
                by_api = run_deployment("prefsynth-run/served", timeout=0)
                second = run_deployment("prefsynth-run/served", timeout=0)  # at once: they take turns
                _wait("both API runs waiting for the warehouse", lambda: _logs(client, [by_api.id, second.id])
                      .count("is in use by another run: waiting for it to finish") == 2)  # fmt: skip
                assert model.requests == []  # nothing ran while the slot was held
            assert not by_api.auto_scheduled
            done = _wait("the API run and a scheduled run completed", lambda: _completed(client, deployment.id))
            client.pause_deployment(deployment.id)  # no new run; let the one in flight (if any) finish
            _wait("no run in flight", lambda: not any(r.state and (r.state.is_running() or r.state.is_pending())
                                                      for r in _runs(client, deployment.id)))  # fmt: skip
            ended = [r.id for r in _runs(client, deployment.id) if r.state is not None and r.state.is_completed()]
            held = _holding(client, ended)  # before stopping serve: a run's last logs follow its state
        finally:
            kill_group(serving, grace_s=3)
        runs = _runs(client, deployment.id)
        completed = [r for r in runs if r.state is not None and r.state.is_completed()]
        assert {by_api.id, second.id} <= {r.id for r in completed}, [(r.name, r.state) for r in runs]
        assert any(r.auto_scheduled for r in completed), "a run of the schedule completed"
        summaries = {r.id: _summary(client, r.id) for r in completed}
        first = [s for s in summaries.values() if s["calls"]]
        assert len(first) == 1 and first[0]["calls"] == CALLS, summaries  # one run called the model, once per item
        assert len(model.requests) == CALLS  # and no other run sent a request
        assert all("curate" in s["stages"] for s in summaries.values())
        assert (work / "w.duckdb").is_file() and (work / "export" / "train.parquet").is_file()
        limit = client.read_global_concurrency_limit_by_name(limit_name(work / "w.duckdb"))
        assert limit.limit == 1 and limit.active_slots == 0  # runs took turns on the warehouse; none holds it now
        assert len(done) >= 3
        assert set(ended) == {r.id for r in completed}
        assert all(a[1] < b[0] for a, b in zip(held, held[1:], strict=False)), held  # no two runs overlapped

        # `prefsynth deploy` on a process work pool, run by a real worker: the same warehouse, no new call
        monkeypatch.chdir(work)  # as the user would, from the same folder as `serve`
        result = CliRunner().invoke(app, ["deploy", str(config), "--name", "nightly", "--cron", "0 3 * * *",
                                          "--pool", "prefsynth"], env={"PREFECT_API_URL": server.url})  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "created the process work pool" in result.output
        nightly = client.read_deployment_by_name("prefsynth-run/nightly")
        assert nightly.work_pool_name == "prefsynth" and client.read_work_pool("prefsynth").type == "process"
        assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
        worker = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool",
                                   "prefsynth", "--type", "process"], cwd=tmp_path, env=server.env,
                                  start_new_session=True, stdout=(tmp_path / "worker.log").open("wb"),
                                  stderr=subprocess.STDOUT)  # fmt: skip
        try:
            run = run_deployment("prefsynth-run/nightly", timeout=0)
            state = _wait("the worker's run", lambda: _final(client, run.id))
        finally:
            kill_group(worker, grace_s=3)
        assert state.is_completed(), state
        assert client.read_flow_run(run.id).parameters["base_dir"] == str(work)
        assert _summary(client, run.id)["calls"] == 0 and len(model.requests) == CALLS

        # the shipped prefect.yaml registers the same entry point with `prefect deploy`
        shipped = Path(__file__).parents[1] / "examples" / "prefect.yaml"
        done_deploy = subprocess.run([str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy",
                                      "--prefect-file", str(shipped), "--all"], cwd=work,
                                     env={**server.env, "PWD": str(work)}, capture_output=True, text=True)  # fmt: skip
        assert done_deploy.returncode == 0, done_deploy.stdout + done_deploy.stderr
        shipped_one = client.read_deployment_by_name("prefsynth-run/quickstart-nightly")
        assert shipped_one.entrypoint == "prefsynth.flows.deploy.run_config"
        assert shipped_one.parameters == {"config": "examples/quickstart.yaml", "base_dir": str(work), "db": None}
        assert [s.schedule.cron for s in shipped_one.schedules] == ["0 3 * * *"]


def _logs(client: Any, flow_run_ids: list[UUID]) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)), limit=200)
    return "\n".join(log.message for log in logs)


def _holding(client: Any, flow_run_ids: list[UUID]) -> list[tuple[Any, Any]]:
    """Per run, from its logs, the time it had the warehouse: from its ingest to its last line, sorted (a run's
    last logs reach the API shortly after its state)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    def span(flow_run_id: UUID) -> tuple[Any, Any] | None:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        starts = [log.timestamp for log in logs if log.message.startswith("ingest:")]
        ends = [log.timestamp for log in logs if log.message.startswith("done:")]
        return (min(starts), max(ends)) if starts and ends else None

    return sorted(_wait(f"the logs of run {i}", lambda i=i: span(i), timeout_s=30) for i in flow_run_ids)


def _deployment(client: Any, name: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


def _completed(client: Any, deployment_id: UUID) -> list[Any] | None:
    """The completed runs once API runs and a scheduled one are among them (a failed run fails the test)."""
    runs = _runs(client, deployment_id)
    failed = [r for r in runs if r.state is not None and (r.state.is_failed() or r.state.is_crashed())]
    assert not failed, [(r.name, r.state) for r in failed]
    done = [r for r in runs if r.state is not None and r.state.is_completed()]
    return done if any(r.auto_scheduled for r in done) and sum(not r.auto_scheduled for r in done) >= 2 else None


def _final(client: Any, flow_run_id: UUID) -> Any:
    state = client.read_flow_run(flow_run_id).state
    return state if state is not None and state.is_final() else None
