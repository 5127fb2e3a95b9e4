"""A new user's first run: the CLI as a subprocess with a fresh, empty PREFECT_HOME (Prefect builds its
database while the local model loads), on the real embedded model; then the cached rerun's split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.conftest import local_job


def _run(config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("prefsynth")
    env = {**os.environ, "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([str(cli), "run", str(config)], env=env, capture_output=True, text=True, timeout=600)


def _timings(out: str) -> dict[str, float]:
    line = next(line for line in out.splitlines() if line.startswith("timings: "))
    return {k: float(v) for k, v in (part.split("=") for part in line.removeprefix("timings: ").split())}


@pytest.mark.model
def test_first_run_with_an_empty_prefect_home_succeeds(tmp_path):
    config = local_job(tmp_path, "fresh", ["Name a color.", "What is 2 + 3?"])
    home = tmp_path / "prefect-home"
    assert not home.exists()
    first = _run(config, home)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (home / "prefect.db").exists()  # the run really built Prefect's database from nothing
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM responses").fetchone() == (4,)
        assert con.execute("SELECT status FROM run_ends").fetchall() == [("completed",)]
    split = _timings(first.stdout)
    assert {"imports", "servers", "api", "flow", "total"} <= set(split) and split["api"] > 0

    again = _run(config, home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 new model calls" in again.stdout
    assert _timings(again.stdout)["total"] > 0
