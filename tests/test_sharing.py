"""One warehouse, several processes (issue 13): while a real `prefsynth run` process holds the file, stats,
the Python reader and export work from another process through it, a second run waits with a message and
then finishes, and a run that may not wait long enough gives up with a clear error. Nothing is corrupted.

The model endpoint is a loopback server whose answers stall after a number of requests until the test opens
a gate: the run is then mid-way and holding the file for as long as the test needs, on any machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from prefsynth.cli import app
from prefsynth.errors import WarehouseError
from prefsynth.warehouse.reader import Warehouse
from prefsynth.warehouse.sharing import serving, sidecar
from prefsynth.warehouse.store import Store
from tests.conftest import write_jsonl
from tests.fake_server import FakeOpenAI, Reply, deterministic_reply
from tests.test_crash import _env, _q, _start

PROMPTS = [f"Question number {i}: name a fruit." for i in range(12)]


class GatedServer(FakeOpenAI):
    """Deterministic answers; request number `open_for` + 1 and later wait until `gate` is set."""

    def __init__(self, open_for: int) -> None:
        self.gate, self.count, self.counting = threading.Event(), 0, threading.Lock()
        self.answered: dict[str, int] = {}  # per kind of request, before the gate opened

        def respond(body: dict[str, Any]) -> Reply:
            with self.counting:
                self.count += 1
                n = self.count
            if n > open_for:
                self.gate.wait(120)
            kind = (body.get("response_format") or {}).get("json_schema", {}).get("name", "generation")
            with self.counting:
                if not self.gate.is_set():
                    self.answered[kind] = self.answered.get(kind, 0) + 1
            return deterministic_reply(body)

        super().__init__(respond)


def _config(tmp: Path, url: str, db: Path, prompts: Path, name: str) -> Path:
    model = {"base_url": url, "model": "m", "max_concurrency": 4, "max_retries": 0, "timeout_s": 120}
    raw = {"name": name, "prompts": {"path": str(prompts)},
           "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"max_tokens": 16, "seed": 3}},
           "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
           "curation": {"min_margin": 1}, "warehouse": str(db)}  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Output:
    """A process's output lines, read as they come."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace"))

    def wait_for(self, text: str, limit_s: float = 90) -> bool:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.1)
        return any(text in line for line in self.lines)

    def finish(self, limit_s: float = 120) -> tuple[int, str]:
        code = self.proc.wait(timeout=limit_s)
        self.thread.join(timeout=10)
        return code, "".join(self.lines)


def test_readers_and_a_second_run_while_a_run_writes(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    db = tmp_path / "w.duckdb"
    with GatedServer(open_for=26) as server:  # the 24 generations, then the run stalls in its judge calls
        config = _config(tmp_path, server.base_url, db, prompts, "first")
        first = Output(_start(config, _env(tmp_path, uuid.uuid4().hex)))
        deadline = time.monotonic() + 90
        while server.count < 28 and first.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)  # the engine commits every 2 s: the generations are in the warehouse
        assert first.proc.poll() is None and serving(db) is not None, "precondition: a run holds the file"

        stats = CliRunner().invoke(app, ["stats", "--db", str(db), "--json"])
        assert stats.exit_code == 0, stats.output
        counts = json.loads(stats.output)
        generated = server.answered["generation"]
        assert counts["responses"] == generated > 0 and counts["runs"] == 1  # what the run has committed so far
        runs = Warehouse(db).runs()
        assert runs["name"].to_list() == ["first"] and runs["status"].to_list() == ["interrupted or running"]
        texts = Warehouse(db).sql("SELECT count(*) AS n FROM responses WHERE text LIKE $1", ["answer %"])
        assert texts["n"].to_list() == [generated]

        with pytest.raises(WarehouseError, match=r"still in use by another process after 1 s \(pid \d+\)"):
            Store(db, wait_s=1, notify=lambda _: None)

        second = Output(_start(_config(tmp_path, server.base_url, db, prompts, "second"),
                               _env(tmp_path, uuid.uuid4().hex)))  # fmt: skip
        assert second.wait_for("is in use by another process"), "".join(second.lines)
        assert first.proc.poll() is None, "precondition: the first run still holds the file"
        server.gate.set()
        code, out = first.finish()
        assert code == 0, out
        code, out = second.finish()
        assert code == 0, out

    assert not sidecar(db).exists()
    assert _q(db, "SELECT r.name, e.status, (SELECT count(*) FROM model_calls m WHERE m.run_id = r.run_id) "
                  "FROM runs r JOIN run_ends e USING (run_id) ORDER BY r.started_at") == [
        ("first", "completed", 48), ("second", "completed", 0)]  # fmt: skip
    assert _q(db, "SELECT call_id FROM model_calls GROUP BY call_id HAVING count(*) > 1") == []


def test_export_while_a_run_holds_the_file_records_its_snapshot_through_the_run(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    with GatedServer(open_for=1000) as server:
        prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:4])
        done = _start(_config(tmp_path, server.base_url, db, prompts, "done"), _env(tmp_path, uuid.uuid4().hex))
        assert done.wait(timeout=120) == 0
        pairs = _q(db, "SELECT count(*) FROM v_pairs_export")[0][0]
        assert pairs > 0, "precondition: a completed run with pairs"
    with Store(db, wait_s=0) as holder:  # a run's store: holds the file and serves it
        out = tmp_path / "export"
        cli = Path(sys.executable).with_name("prefsynth")
        result = subprocess.run([str(cli), "export", "--db", str(db), "--out", str(out)], capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{pairs} pairs from run" in result.stdout and (out / "train.parquet").exists()
        assert holder.con.execute("SELECT count(*) FROM dataset_snapshots").fetchone() == (1,)
