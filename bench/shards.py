"""N shards on N Prefect process workers against one process (issue 15).

The model server is bench/engine.py's loopback server (its own process, 127.0.0.1 only, 0.2 s an answer) with
more slots (`--slots`, default 1024) than one client fills, so what limits a run is its own process (the
client, the stream, the writer), which is what shards multiply. Both arms run against one real
`prefect server start` on loopback, write a new DuckLake on a real PostgreSQL (tests/postgres.py; a single
file would make the shards take turns), and run P prompts x 2 samples + a pointwise judge (4P calls):
  one       `prefsynth run CONFIG` (the CLI): one process does everything
  sharded   `prefsynth run CONFIG --shards N` with N `prefect worker start --type process --limit 1`
            running: the shards on the workers, then curation and export in the command's process
Reported: each arm's whole command, the calls per second over it, and for the sharded arm the shard phase
(first shard started to last ended, from Prefect's flow runs), each shard's run time, and the final run's
(ingest, every call found in the warehouse, curation, export).

    python bench/shards.py [--prompts 2000] [--shards 2] [--slots 1024] [--concurrency 256] [--record]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import engine  # noqa: E402
from bench.common import ROOT, append_results, command, emit_all, result_lines  # noqa: E402

LATENCY_S = 0.2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000, help="prompts (4 calls each)")
    parser.add_argument("--shards", type=int, default=2, help="shards, and workers")
    parser.add_argument("--slots", type=int, default=1024, help="the loopback server's parallel slots")
    parser.add_argument("--concurrency", type=int, default=256, help="the endpoint's max_concurrency per process")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    from tests.postgres import PASSWORD, PostgresServer
    from tests.prefect_server import PrefectServer, kill_group

    engine.SRC = str(ROOT / "src")  # the commands run this checkout's prefsynth, whatever the venv installed
    engine.BENCH_DIR.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {}
    started = time.perf_counter()
    with (tempfile.TemporaryDirectory(dir=engine.BENCH_DIR) as tmp, PostgresServer() as pg,
          engine.Loopback(latency=LATENCY_S, slots=args.slots) as model):  # fmt: skip
        folder = Path(tmp)
        (home := folder / "prefect").mkdir()
        config = engine.write_job(folder / "job", model.url, args.prompts, concurrency=args.concurrency)
        calls = 4 * args.prompts
        with PrefectServer(home) as server:
            env = {**server.env, "PYTHONPATH": engine.SRC, "HF_HUB_OFFLINE": "1", "PGPASSWORD": PASSWORD}
            lakes = {arm: pg.create_db(f"b_{arm}_{uuid.uuid4().hex[:8]}") + f"?data_path={folder / arm}"
                     for arm in ("one", "sharded")}  # fmt: skip
            one = engine.run_cmd([str(Path(sys.executable).parent / "prefsynth"), "run", str(config), "--db",
                                  lakes["one"]], env)  # fmt: skip
            engine.check(one, "prefsynth run (one process)")
            r["one_seconds"] = one.seconds
            r["one_calls_per_s"] = calls / one.seconds
            if flow := one.timings.get("flow"):
                r["one_flow_seconds"], r["one_flow_calls_per_s"] = flow, calls / flow
            served = int(model.stats().get("requests", 0))

            workers = [subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool",
                                         "bench", "--type", "process", "--limit", "1"], env=env, cwd=folder,
                                        stdout=(engine.BENCH_DIR / f"shards-worker-{n}.log").open("wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
                       for n in range(args.shards)]  # fmt: skip
            try:
                time.sleep(5)  # the workers register with the pool (and create it) before the run starts
                sharded = engine.run_cmd([str(Path(sys.executable).parent / "prefsynth"), "run", str(config),
                                          "--db", lakes["sharded"], "--shards", str(args.shards), "--pool",
                                          "bench"], env)  # fmt: skip
            finally:
                for worker in workers:
                    kill_group(worker, grace_s=3)
            engine.check(sharded, "prefsynth run --shards")
            r["sharded_seconds"] = sharded.seconds
            r["sharded_calls_per_s"] = calls / sharded.seconds
            r["sharded_vs_one"] = r["sharded_calls_per_s"] / r["one_calls_per_s"]
            if found := re.search(r"0 new model calls, \d+ failures, ([0-9.]+) s", sharded.out):
                r["sharded_final_run_seconds"] = float(found.group(1))  # the curation run over all shards
            r["calls_one_then_sharded"] = f"{served}/{int(model.stats().get('requests', 0)) - served}"
            r.update(shard_times(server.url))
            if "shard_phase_seconds" in r:
                r["shard_phase_calls_per_s"] = calls / r["shard_phase_seconds"]
                if "one_flow_calls_per_s" in r:
                    r["shard_phase_vs_one_flow"] = r["shard_phase_calls_per_s"] / r["one_flow_calls_per_s"]
    emit_all(r)
    if args.record:
        lines = [f"loopback server: {LATENCY_S} s an answer, {args.slots} slots (max_concurrency {args.concurrency} "
                 f"per process: one process cannot fill them); {args.prompts} prompts x 2 samples + a judge = {calls} "
                 f"calls; DuckLake on PostgreSQL 15 (loopback) for both arms; `prefect server start` on loopback; "
                 f"{os.cpu_count()} cores shared with other jobs; took {time.perf_counter() - started:.0f} s",
                 *result_lines(r)]  # fmt: skip
        append_results("Sharded runs on Prefect workers vs one process (issue 15)", command("bench/shards.py"), lines)
    return 0


def shard_times(url: str) -> dict[str, Any]:
    """The shards' flow runs on the server: the phase from the first start to the last end, each one's time."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["prefsynth-shards"])))  # fmt: skip
    if not runs or any(r.start_time is None or r.end_time is None for r in runs):
        return {}
    phase = max(r.end_time for r in runs) - min(r.start_time for r in runs)
    return {"shard_phase_seconds": phase.total_seconds(),
            "shard_run_seconds": "/".join(f"{r.total_run_time.total_seconds():.1f}" for r in runs)}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
