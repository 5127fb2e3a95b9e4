"""A run's head start (flows/headstart.py): opened and streaming before any flow run exists, on a loopback
endpoint with deterministic answers. No Prefect API is involved here: the head start must not need one."""

from __future__ import annotations

import json
import time

import duckdb
import pytest

from prefsynth.flows.headstart import HeadStart, HeldLog, claim, eligible, head_start
from prefsynth.schemas.config import parse_config
from tests.conftest import write_jsonl
from tests.fake_server import CountingServer


def _config(tmp_path, url: str, **extra):
    model = {"base_url": url, "model": "m", "max_concurrency": 2, "max_retries": 0}
    prompts = write_jsonl(tmp_path / "p.jsonl", [f"Question {i}?" for i in range(60)])
    return parse_config({
        "name": "early", "prompts": {"path": str(prompts)},
        "generation": {"models": [model], "samples_per_prompt": 2},
        "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
        "warehouse": str(tmp_path / "w.duckdb"), **extra,
    })  # fmt: skip


def _q(db, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def _wait_for_commits(early: HeadStart, n: int, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while early.writer is not None and early.writer.commits < n and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize(("stopped_by", "status"), [(KeyboardInterrupt(), "interrupted"), (None, "failed")])
def test_a_head_start_no_flow_run_adopts_is_stopped_and_recorded_with_its_rows(tmp_path, stopped_by, status):
    with CountingServer(latency_s=0.05) as server:  # 240 calls two at a time: about 6 s
        config = _config(tmp_path, server.base_url)
        early = HeadStart(config, config.warehouse)
        early.start()
        _wait_for_commits(early, 2)
        assert early.writer is not None and early.writer.commits >= 2  # the precondition: it streamed
        early.close(stopped_by)
        sent = len(server.requests)
        time.sleep(0.3)
        assert len(server.requests) == sent, "requests went on after close()"
    assert sent < 240, "the stream had ended before it was stopped"
    db = tmp_path / "w.duckdb"
    assert _q(db, "SELECT status FROM run_ends") == [(status,)]
    ok = _q(db, "SELECT count(*) FROM model_calls WHERE status = 'ok'")[0][0]
    assert 0 < ok <= sent
    assert _q(db, "SELECT count(*) FROM responses")[0][0] > 0
    recorded = json.loads(_q(db, "SELECT summary FROM run_ends")[0][0])  # what it did before it stopped
    calls = {s["stage"]: s["model_calls"] for s in recorded["stages"]}
    assert set(calls) == {"ingest", "generate[m]", "score[judge]"} and calls["generate[m]"] > 0
    assert sum(calls.values()) >= ok  # counted when answered; committed up to the stop


def test_only_the_flow_run_of_the_same_config_and_warehouse_claims_it_once(tmp_path):
    with CountingServer(latency_s=0.01) as server:
        config = _config(tmp_path, server.base_url)
        other = config.model_copy(update={"name": "other"})
        with head_start(config, None) as early:
            assert early is not None
            assert claim(other, config.warehouse, None) is None
            assert claim(config, str(tmp_path / "elsewhere.duckdb"), None) is None
            assert claim(config, config.warehouse, "0/2") is None  # a shard opens its own run
            assert claim(config, config.warehouse, None) is early
            assert claim(config, config.warehouse, None) is None  # once
            early.stop()


def test_runs_that_need_prefect_from_the_start_get_no_head_start(tmp_path):
    url = "http://127.0.0.1:9/v1"
    assert eligible(_config(tmp_path, url))
    assert not eligible(_config(tmp_path, url, runner="ray"))
    limited = _config(tmp_path, url).model_dump(exclude_none=True)
    limited["generation"]["models"][0]["global_limit"] = True
    assert not eligible(parse_config(limited))


def test_held_lines_reach_the_flow_runs_log_once_it_exists(caplog):
    import logging

    log = HeldLog()
    log.info("ingest: 3 prompts")
    with caplog.at_level(logging.INFO, logger="prefsynth.run"):
        log.warning("warehouse in use: waiting")  # shown at once, not only when a flow run adopts the run
    assert [r.getMessage() for r in caplog.records] == ["warehouse in use: waiting"]
    to = logging.getLogger("test.flow_run")
    with caplog.at_level(logging.INFO, logger="test.flow_run"):
        caplog.clear()
        log.attach(to)
        log.info("generate: 10/10 done")
    assert [r.getMessage() for r in caplog.records] == [
        "(before the flow run started) ingest: 3 prompts",
        "(before the flow run started) warehouse in use: waiting",
        "generate: 10/10 done",
    ]


def _no_server(cwd, **env) -> bool:
    """`no_server_configured()` in a new process (without Prefect imported, as at the CLI's start)."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("PREFECT_")}
    code = ("import sys; from prefsynth.flows.prefect_api import no_server_configured as f; "
            "print(f(), 'prefect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**base, **env}, capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    assert out[1] == "False", "the quick check imported Prefect"
    return out[0] == "True"


def test_the_quick_check_for_a_configured_prefect_server_errs_on_the_safe_side(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert _no_server(tmp_path, PREFECT_HOME=str(home))  # nothing configured: a temporary API, a head start
    assert not _no_server(tmp_path, PREFECT_HOME=str(home), PREFECT_API_URL="http://10.0.0.1:4200/api")
    assert not _no_server(tmp_path, PREFECT_HOME=str(home), prefect_api_url="http://10.0.0.1:4200/api")
    (home / "profiles.toml").write_text('active = "work"\n[profiles.work]\nprefect_api_url = "http://10.0.0.1/api"\n')
    assert not _no_server(tmp_path, PREFECT_HOME=str(home))
    (home / "profiles.toml").write_text('active = "mine"\n[profiles.mine]\nPREFECT_LOGGING_LEVEL = "INFO"\n'
                                        '[profiles.work]\nPREFECT_API_URL = "http://10.0.0.1/api"\n')  # fmt: skip
    assert _no_server(tmp_path, PREFECT_HOME=str(home))  # another profile names one, the active one does not
    (tmp_path / ".env").write_text("prefect_api_url=http://10.0.0.1/api\n")
    assert not _no_server(tmp_path, PREFECT_HOME=str(home))
    (tmp_path / ".env").unlink()
    (tmp_path / "pyproject.toml").write_text('[tool.prefect]\napi.url = "http://10.0.0.1/api"\n')
    assert not _no_server(tmp_path, PREFECT_HOME=str(home))


def test_the_temporary_api_starts_at_a_lower_cpu_priority_than_the_run():
    """Its start overlaps the run's first seconds: the stream comes first."""
    import os

    from prefsynth.flows.prefect_api import API_NICE, TemporaryAPI

    api = TemporaryAPI()
    api.launch()
    try:
        assert api.proc is not None
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, api.proc.pid) == min(ours + API_NICE, 19) > ours
    finally:
        api.stop()
