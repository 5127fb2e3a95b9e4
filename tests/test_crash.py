"""Real `prefsynth run` processes killed (SIGKILL to the process group) and interrupted (SIGINT, as a terminal
sends Ctrl-C) at several points, then resumed: nothing committed is paid again, the final pairs equal an
uninterrupted run's, and no process (llama.cpp server, Prefect's API) outlives the run.

The model endpoint is a loopback server with deterministic answers (a hash of the request) and a fixed
latency: this tests the engine under injected faults, not a model. One test kills a run on the real local
model inside the first run of a new warehouse.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
import pytest
import yaml

from prefsynth.flows.engine import ROWS_PER_COMMIT
from tests.conftest import local_job, write_jsonl
from tests.fake_server import CountingServer

PROMPTS = [f"Question number {i}: name a fruit." for i in range(40)]
CALLS = 40 * 2 + 40 * 2 + 40 * 2  # samples, their ratings, one comparison per prompt in both orders


def _config(tmp: Path, url: str, db: Path, prompts: Path) -> Path:
    model = {"base_url": url, "model": "m", "max_concurrency": 4, "max_retries": 0}
    raw = {
        "name": "crash",
        "prompts": {"path": str(prompts)},
        "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"max_tokens": 16, "seed": 3}},
        "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model},
                    {"kind": "pairwise_judge", "name": "pair", "model": model, "balanced_position": True}],
        "curation": {"scorer": "judge", "min_margin": 1},
        "export": [{"format": "trl", "path": str(tmp / "export")}],
        "warehouse": str(db),
    }  # fmt: skip
    path = tmp / f"{db.stem}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cli = Path(sys.executable).with_name("prefsynth")
    return subprocess.Popen([str(cli), "run", str(config)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def _marked(mark: str) -> list[int]:
    """Live processes whose environment carries `mark` (the run and everything it started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark.encode() in (proc / "environ").read_bytes() and b"State:\tZ" not in (proc / "status").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _none_left(mark: str, within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _marked(mark):
            return True
        time.sleep(0.2)
    return False


def _q(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def _env(tmp: Path, mark: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFSYNTH_TEST_MARK": mark,
            "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}  # fmt: skip


def _wait_for_requests(server: CountingServer, n: int, proc: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while len(server.requests) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def _final_pairs(db: Path) -> set[tuple[str, str, str]]:
    """The latest run's pairs as texts (ids name the endpoint's URL, which differs between servers)."""
    return set(_q(db, "SELECT prompt_messages, chosen_text, rejected_text FROM v_pairs_export"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its pairs are what every resumed run must reach."""
    tmp = tmp_path_factory.mktemp("reference")
    prompts = write_jsonl(tmp / "p.jsonl", PROMPTS)
    with CountingServer() as server:
        config = _config(tmp, server.base_url, tmp / "ref.duckdb", prompts)
        proc = _start(config, _env(tmp, uuid.uuid4().hex))
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()
    pairs = _final_pairs(tmp / "ref.duckdb")
    assert len(server.requests) == CALLS and len(pairs) > 10  # the precondition: a real job with pairs
    return pairs


def test_sigkill_at_any_moment_then_resume_pays_nothing_twice(tmp_path, reference):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    db = tmp_path / "w.duckdb"
    # kill points: before the first request (start-up, migrations of a new warehouse), during generation,
    # rating and pairwise judging (by requests seen so far), and after the last request (curation, export)
    kill_after_requests = [0, 25, 70, 120, 190, CALLS]
    with CountingServer() as server:
        config = _config(tmp_path, server.base_url, db, prompts)
        for i, n in enumerate(kill_after_requests):
            mark = uuid.uuid4().hex
            proc = _start(config, _env(tmp_path, mark))
            if n == 0:
                time.sleep(1.5 if i == 0 else 0.5)
            else:
                _wait_for_requests(server, n, proc)
            assert proc.poll() is None, f"the run ended before kill point {n}: {proc.communicate()[0].decode()}"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert _none_left(mark), f"processes outlived the killed run: {_marked(mark)}"
        mark = uuid.uuid4().hex
        proc = _start(config, _env(tmp_path, mark))
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()
        assert _none_left(mark)
    paid_twice = _q(db, "SELECT call_id FROM model_calls WHERE status = 'ok' GROUP BY call_id HAVING count(*) > 1")
    assert paid_twice == []
    assert _q(db, "SELECT count(DISTINCT call_id) FROM model_calls WHERE status = 'ok'") == [(CALLS,)]
    # a kill loses the calls in flight (4 slots) and the finished ones not committed yet: at most one batch,
    # and every call adds at least two rows to it (the call and its response, score or judgment)
    assert len(server.requests) <= CALLS + len(kill_after_requests) * (4 + ROWS_PER_COMMIT // 2)
    assert _final_pairs(db) == reference


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_in_seconds_marks_the_run_and_keeps_committed_rows(tmp_path, how):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    db = tmp_path / "w.duckdb"
    mark = uuid.uuid4().hex
    with CountingServer(latency_s=0.2) as server:  # about 12 s of calls
        proc = _start(_config(tmp_path, server.base_url, db, prompts), _env(tmp_path, mark))
        _wait_for_requests(server, 30, proc)
        assert proc.poll() is None and len(server.requests) >= 30  # the precondition: mid-run
        time.sleep(2.5)  # at least one commit (every 2 s) after the first rows
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground group
        else:
            proc.send_signal(signal.SIGTERM)  # what `timeout`, `docker stop` or a scheduler sends
        started = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - started
    text = out.decode()
    assert proc.returncode == 130, text
    assert stopped_in < 20, f"took {stopped_in:.1f} s to stop"
    assert "interrupted" in text and "Traceback" not in text
    assert _none_left(mark), f"processes outlived the interrupted run: {_marked(mark)}"
    assert _q(db, "SELECT status FROM run_ends") == [("interrupted",)], text
    assert _q(db, "SELECT count(*) FROM responses")[0][0] > 0


def test_a_run_streams_while_prefects_api_starts_and_keeps_its_rows_when_the_api_fails(tmp_path, reference):
    """The run streams before Prefect's API answers (flows/headstart.py); an API that cannot start (its home
    under a file) fails the command with the way out, the run is recorded failed, what it committed stays, and
    a rerun with a working API pays nothing twice and reaches the uninterrupted run's pairs."""
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    db = tmp_path / "w.duckdb"
    (tmp_path / "a-file").write_text("")
    mark = uuid.uuid4().hex
    with CountingServer() as server:
        config = _config(tmp_path, server.base_url, db, prompts)
        proc = _start(config, {**_env(tmp_path, mark), "PREFECT_HOME": str(tmp_path / "a-file" / "home")})
        out, _ = proc.communicate(timeout=120)
        text = out.decode()
        assert proc.returncode == 2, text
        assert "Prefect's temporary API exited at start" in text and "Traceback" not in text
        assert _none_left(mark), f"processes outlived the failed run: {_marked(mark)}"
        assert _q(db, "SELECT status FROM run_ends") == [("failed",)]
        assert _q(db, "SELECT flow_run_id FROM runs") == [(None,)]  # no flow run ever adopted it
        committed = _q(db, "SELECT count(*) FROM model_calls WHERE status = 'ok'")[0][0]
        assert committed > 0, "the precondition: the run streamed before the API failed"
        before = len(server.requests)
        proc = _start(config, _env(tmp_path, uuid.uuid4().hex))
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()
        assert len(server.requests) - before == CALLS - committed  # only what was not committed
    assert _q(db, "SELECT call_id FROM model_calls WHERE status = 'ok' GROUP BY call_id HAVING count(*) > 1") == []
    assert _final_pairs(db) == reference
    adopted = _q(db, "SELECT r.flow_run_id FROM runs r JOIN run_ends e USING (run_id) WHERE e.status = 'completed'")
    assert len(adopted) == 1 and adopted[0][0], "the completed run records the flow run that adopted it"


@pytest.mark.model
def test_kill_inside_the_first_run_of_a_new_warehouse_on_the_local_model(tmp_path):
    config = local_job(tmp_path, "first", ["Name a color.", "What is 2 + 3?", "Say hello."])
    for delay in (1.0, 6.0, 12.0):  # start-up, model load and first calls, mid-run
        mark = uuid.uuid4().hex
        proc = _start(config, _env(tmp_path, mark))
        time.sleep(delay)
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _none_left(mark), f"processes outlived the killed run: {_marked(mark)}"
    proc = _start(config, _env(tmp_path, uuid.uuid4().hex))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()
    db = tmp_path / "w.duckdb"
    assert _q(db, "SELECT count(*) FROM responses") == [(6,)]
    assert _q(db, "SELECT call_id FROM model_calls WHERE status = 'ok' GROUP BY call_id HAVING count(*) > 1") == []
