"""Two replicas against one (issue 15): throughput, and the requests each replica served.

The servers are bench/engine.py's loopback server (each its own process, 127.0.0.1 only, 0.2 s an answer)
with a fixed number of slots (`--slots`, default 8): each computes that many answers at once and queues the
rest, so one replica saturates at slots / 0.2 s. This measures the client's spreading and failover, not a
model. Arms, each on fresh servers:
  client    N chat calls through prefsynth's client (`ClientPool`, no warehouse) with every replica's
            max_concurrency = its slots: one replica, two replicas, and two with one SIGKILLed after a third
            of the calls (its requests in flight move to the other)
  run       `prefsynth run` (the CLI, fresh warehouse) of P prompts x 2 samples + a pointwise judge (4P calls)
            on one replica and on two (`base_urls`): whole command, and the flow alone (its `timings:` line)

    python bench/replicas.py [--calls 1200] [--prompts 200] [--slots 8] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import engine  # noqa: E402
from bench.common import ROOT, append_results, command, emit_all, result_lines  # noqa: E402

LATENCY_S = 0.2


def endpoint(urls: list[str], slots: int) -> Any:
    from prefsynth.backends.client import Endpoint

    return Endpoint(label="loop", identity="loop@bench", base_url=urls[0], model="loop", api_key="none",
                    concurrency=slots * len(urls), timeout_s=60, max_retries=3, is_local=False,
                    replicas=tuple((u, slots) for u in urls) if len(urls) > 1 else ())  # fmt: skip


async def drive(urls: list[str], slots: int, calls: int, kill: engine.Loopback | None = None) -> dict[str, Any]:
    """`calls` chat calls through one ClientPool; SIGKILL `kill`'s process after a third have answered."""
    from prefsynth.backends.client import ClientPool

    ep = endpoint(urls, slots)
    done = 0
    killed_at = None

    async with ClientPool([ep]) as pool:
        client = pool.client(ep)

        async def one(i: int) -> Any:
            nonlocal done, killed_at
            outcome = await client.chat({"messages": [{"role": "user", "content": f"replica bench {i}"}],
                                         "max_tokens": 16})  # fmt: skip
            done += 1
            if kill is not None and killed_at is None and done >= calls // 3:
                killed_at = time.perf_counter()
                os.kill(kill.proc.pid, signal.SIGKILL)
            return outcome.call

        start = time.perf_counter()
        records = await asyncio.gather(*(one(i) for i in range(calls)))
        seconds = time.perf_counter() - start
    answered: dict[str, int] = {}
    for c in records:
        if c.status == "ok":
            answered[c.endpoint] = answered.get(c.endpoint, 0) + 1
    return {"seconds": seconds, "calls_per_s": calls / seconds, "errors": sum(c.status != "ok" for c in records),
            "answered": [answered.get(u, 0) for u in urls], "moved": sum(bool(c.failed_on) for c in records),
            "requests": sum(c.attempts or 0 for c in records)}  # fmt: skip


def client_arms(calls: int, slots: int, r: dict[str, Any]) -> None:
    for name, n, kill in (("one", 1, False), ("two", 2, False), ("two_one_killed", 2, True)):
        servers = [engine.Loopback(latency=LATENCY_S, slots=slots) for _ in range(n)]
        try:
            out = asyncio.run(drive([s.url for s in servers], slots, calls, servers[1] if kill else None))
        finally:
            for s in servers:
                s.close()
        r[f"client_{name}_calls_per_s"] = out["calls_per_s"]
        r[f"client_{name}_seconds"] = out["seconds"]
        r[f"client_{name}_answered_per_replica"] = "/".join(map(str, out["answered"]))
        r[f"client_{name}_errors"] = out["errors"]
        if kill:
            r[f"client_{name}_calls_moved"] = out["moved"]
            r[f"client_{name}_http_requests"] = out["requests"]
    r["client_two_vs_one"] = r["client_two_calls_per_s"] / r["client_one_calls_per_s"]
    r["client_ceiling_per_replica_calls_per_s"] = slots / LATENCY_S


def run_arms(folder: Path, prompts: int, slots: int, r: dict[str, Any]) -> None:
    import yaml

    for name, n in (("one", 1), ("two", 2)):
        servers = [engine.Loopback(latency=LATENCY_S, slots=slots) for _ in range(n)]
        try:
            config = engine.write_job(folder / name, servers[0].url, prompts, concurrency=slots)
            raw = yaml.safe_load(config.read_text())
            if n > 1:
                for model in (raw["generation"]["models"][0], raw["scorers"][0]["model"]):
                    model.pop("base_url", None)  # the two may be one YAML anchor
                    model["base_urls"] = [s.url for s in servers]
                    model["revision"] = "bench"
            config.write_text(yaml.safe_dump(raw))
            db = folder / f"{name}.duckdb"
            run = engine.prefsynth(config, db)
            engine.check(run, f"prefsynth run ({name})")
            served = [int(s.stats().get("requests", 0)) for s in servers]
        finally:
            for s in servers:
                s.close()
        r[f"run_{name}_seconds"] = run.seconds
        r[f"run_{name}_calls_per_s"] = 4 * prompts / run.seconds
        flow = run.timings.get("flow")  # the flow alone: no imports, no Prefect API start
        if flow:
            r[f"run_{name}_flow_seconds"] = flow
            r[f"run_{name}_flow_calls_per_s"] = 4 * prompts / flow
        r[f"run_{name}_requests_per_replica"] = "/".join(map(str, served))
    r["run_two_vs_one"] = r["run_two_calls_per_s"] / r["run_one_calls_per_s"]
    if "run_two_flow_calls_per_s" in r and "run_one_flow_calls_per_s" in r:
        r["run_two_vs_one_flow"] = r["run_two_flow_calls_per_s"] / r["run_one_flow_calls_per_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1200, help="calls of each client arm")
    parser.add_argument("--prompts", type=int, default=200, help="prompts of each run arm (4 calls each)")
    parser.add_argument("--slots", type=int, default=8, help="slots of each replica (its max_concurrency too)")
    parser.add_argument("--parts", default="client,run")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    engine.SRC = str(ROOT / "src")  # the CLI runs this checkout's prefsynth, whatever the venv installed
    engine.BENCH_DIR.mkdir(parents=True, exist_ok=True)
    engine.PREFECT_HOME.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=engine.BENCH_DIR) as tmp:
        if "client" in args.parts:
            client_arms(args.calls, args.slots, r)
        if "run" in args.parts:
            run_arms(Path(tmp), args.prompts, args.slots, r)
    emit_all(r)
    if args.record:
        lines = [f"servers: bench/engine.py's loopback server, {LATENCY_S} s an answer, {args.slots} slots each "
                 f"(one replica saturates at {args.slots / LATENCY_S:.0f} calls/s); max_concurrency = slots per "
                 f"replica; took {time.perf_counter() - started:.0f} s; machine shared with other jobs, so compare "
                 "ratios within this run",
                 *result_lines(r)]  # fmt: skip
        append_results("Replicas bench", command("bench/replicas.py"), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
