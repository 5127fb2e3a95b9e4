"""A run through the fault proxy against a clean run of the same job: completion, retries, and HTTP requests
per item (issue 13).

The model server is bench/engine.py's loopback server (its own process, a fixed 0.2 s a call, unlimited
parallelism, no faults of its own): this measures orchestration, not a model. The fault run puts
tests/fault_proxy.py in front of it, which answers a seeded share of requests with 429 (Retry-After 1 s),
500, a dropped connection, or forwards them and answers after 6 s (the client's timeout is 5 s: abandoned,
but served). Both runs use `prefsynth run` (the CLI) with max_concurrency 16, max_retries 3, on fresh
warehouses; the fault run is then rerun once, through the same proxy.

    python bench/faults.py [--prompts 250] [--record]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import engine  # noqa: E402
from bench.common import ROOT, append_results, command, emit_all, result_lines  # noqa: E402
from tests.fault_proxy import FaultProxy  # noqa: E402

RATES = {"rate_limit": 0.05, "error": 0.10, "slow": 0.02, "drop": 0.03}


def stats(db: Path) -> dict[str, Any]:
    """`prefsynth stats --json` of the warehouse: its per-endpoint retries row, summed."""
    cmd = [str(Path(sys.executable).parent / "prefsynth"), "stats", "--db", str(db), "--json"]
    out = subprocess.run(cmd, env=engine.prefsynth_env(), capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)["retries_by_endpoint"]
    return {k: sum(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], int | float)}


def done(db: Path, run_id: str | None = None) -> tuple[int, int]:
    """(responses, scores) in the warehouse (made by `run_id`, if given)."""
    where = " WHERE run_id = ?" if run_id else ""
    params = [run_id] if run_id else []
    return (engine.query(db, f"SELECT count(*) FROM responses{where}", params)[0][0],
            engine.query(db, f"SELECT count(*) FROM scores{where}", params)[0][0])  # fmt: skip


def clean_run(config: Path, db: Path, items: int, server: engine.Loopback, r: dict[str, Any]) -> None:
    server.reset()
    run = engine.prefsynth(config, db)
    engine.check(run, "prefsynth run (clean)")
    requests = server.stats().get("requests", 0)
    responses, scores = done(db)
    s = stats(db)
    r.update({"clean_seconds": run.seconds, "clean_completion": f"{responses + scores}/{items}",
              "clean_http_requests": requests, "clean_requests_per_item": requests / items,
              "clean_recorded_calls": s["calls"], "clean_failed_calls": s["errors"], "clean_retries": s["retries"]})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=250, help="prompts; items = 4 x prompts (2 samples + 2 scores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    engine.SRC = str(ROOT / "src")
    engine.PREFECT_HOME.mkdir(parents=True, exist_ok=True)
    items = 4 * args.prompts
    r: dict[str, Any] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=engine.BENCH_DIR) as tmp, engine.Loopback(latency=0.2) as server:
        folder = Path(tmp)
        clean = engine.write_job(folder / "clean", server.url, args.prompts, concurrency=16, timeout_s=5, retries=3)
        clean_run(clean, folder / "clean.duckdb", items, server, r)
        with FaultProxy(server.url, RATES, seed=args.seed, retry_after_s=1, slow_s=6) as proxy:
            faulty = engine.write_job(folder / "faults", proxy.base_url, args.prompts, concurrency=16, timeout_s=5,
                                      retries=3)  # fmt: skip
            db = folder / "faults.duckdb"
            server.reset()
            run = engine.prefsynth(faulty, db)
            engine.check(run, "prefsynth run (faults)")
            posts, served = proxy.posts, server.stats().get("requests", 0)
            responses, scores = done(db)
            s = stats(db)
            r.update({"faults_seconds": run.seconds, "faults_completion": f"{responses + scores}/{items}",
                      "faults_http_requests": posts, "faults_requests_per_item": posts / items,
                      "faults_served_by_server": served, "faults_injected": dict(proxy.faults),
                      "faults_recorded_calls": s["calls"], "faults_failed_calls": s["errors"],
                      "faults_requests_recorded": s["requests"]})  # fmt: skip
            for key in ("retries", "rate_limited", "server_errors", "timeouts", "dropped", "retry_wait_s"):
                r[f"faults_{key}"] = s[key]
            proxy.reset()
            rerun = engine.prefsynth(faulty, db)
            engine.check(rerun, "prefsynth rerun (faults)")
            responses, scores = done(db)
            r.update({"rerun_seconds": rerun.seconds, "rerun_http_requests": proxy.posts,
                      "rerun_completion": f"{responses + scores}/{items}",
                      "rerun_failed_calls_left": stats(db)["errors"] - s["errors"]})  # fmt: skip
    r["faults_vs_clean_requests_per_item"] = r["faults_requests_per_item"] / r["clean_requests_per_item"]
    r["faults_vs_clean_seconds"] = r["faults_seconds"] / r["clean_seconds"]
    emit_all(r)
    if args.record:
        lines = [f"job: {args.prompts} prompts x 2 samples + a pointwise judge = {items} items, `prefsynth run` on the "
                 "loopback server of bench/engine.py (0.2 s a call, unlimited parallelism; orchestration, no model), "
                 "max_concurrency 16, timeout_s 5, max_retries 3; the fault run goes through tests/fault_proxy.py "
                 f"with {RATES} (429 with Retry-After 1 s, 500, forwarded but answered after 6 s, connection "
                 f"closed), seed {args.seed}, then is rerun through the same proxy; took "
                 f"{time.perf_counter() - started:.0f} s",
                 "completion: responses + scores made / planned; requests: HTTP requests sent (the proxy's count for "
                 "the fault run, the server's for the clean one); retries etc. from `prefsynth stats --json`",
                 *result_lines(r)]  # fmt: skip
        append_results("Fault-proxy run vs a clean run (issue 13)", command("bench/faults.py"), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
