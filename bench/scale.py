"""Warehouse scale without models: ingest, curation and export of 10k, 100k and 1M synthetic responses.

Each size runs in its own process so that its peak RSS is its own. Rows go through the same code as the
pipeline: `Store.write` (Arrow, one statement per batch), `Store.scores_for` + `best_vs_worst`, and
`Store.export_rows` + `write_dataset` (Hugging Face Parquet). Then rows/s through `Store.write_frames`
(the engine's batch writer: 1M rows in batches of 50k, half responses, half scores), "n/a" where the Store
has no such method yet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PER_PROMPT = 4
BATCH = 50_000


def one_size(n: int) -> dict[str, float]:
    import polars as pl
    from bench.common import peak_rss_mib

    from prefsynth.schemas.config import CurationSpec
    from prefsynth.tasks.curate import best_vs_worst
    from prefsynth.tasks.export import write_dataset
    from prefsynth.warehouse.store import Store, frame

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "scale.duckdb")
        prompts = n // PER_PROMPT
        start = time.perf_counter()
        for lo in range(0, prompts, BATCH):
            hi = min(prompts, lo + BATCH)
            pids = [f"p{i:09d}" for i in range(lo, hi)]
            msgs = [json.dumps([{"role": "user", "content": f"Synthetic prompt number {i}?"}]) for i in range(lo, hi)]
            store.con.register("_p", pl.DataFrame({"prompt_id": pids, "messages": msgs}).to_arrow())
            store.con.execute("INSERT INTO prompts (prompt_id, messages, source, source_ref, run_id) "
                              "SELECT prompt_id, messages, 'bench', '', 'bench' FROM _p")  # fmt: skip
            store.con.unregister("_p")
        for lo in range(0, n, BATCH):
            rows = range(lo, min(n, lo + BATCH))
            responses = frame("responses", []).vstack(pl.DataFrame({
                "response_id": [f"r{i:010d}" for i in rows], "prompt_id": [f"p{i // PER_PROMPT:09d}" for i in rows],
                "model": "m", "model_identity": "m@1", "sampling": "{}", "sample_index": [i % PER_PROMPT for i in rows],
                "seed": [i % PER_PROMPT for i in rows], "text": [f"Synthetic response {i} " * 8 for i in rows],
                "finish_reason": "stop", "prompt_tokens": 12, "completion_tokens": 40, "latency_ms": 1.0,
                "call_id": [f"c{i:010d}" for i in rows],
                "source": "sampled"}, schema=frame("responses", []).schema))  # fmt: skip
            scores = pl.DataFrame({
                "score_id": [f"s{i:010d}" for i in rows], "response_id": [f"r{i:010d}" for i in rows],
                "scorer_id": "judge", "scorer": "judge", "value": [float((i * 7919) % 10 + 1) for i in rows],
                "rationale": None, "raw": "{}", "call_ids": [[f"c{i:010d}"] for i in rows], "details": None,
            }, schema=frame("scores", []).schema)  # fmt: skip
            store._transaction(lambda r=responses, s=scores: (store._insert("responses", r, "bench"),
                                                              store._insert("scores", s, "bench")))  # fmt: skip
        ingest_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = store.con.execute(
            "SELECT r.prompt_id, s.response_id, s.value FROM scores s JOIN responses r USING (response_id) "
            "WHERE s.scorer_id = 'judge'").pl()  # fmt: skip
        pairs = best_vs_worst(scores, "judge", CurationSpec(min_margin=1))
        store.begin_run("run", "bench", "{}", None)
        store.write_pairs("run", pairs)
        store.end_run("run", "completed", {})
        curate_s = time.perf_counter() - start
        start = time.perf_counter()
        _, rows = store.export_rows()
        done = write_dataset(rows, Path(tmp) / "out", "trl")
        export_s = time.perf_counter() - start
        store.close()
        assert done.n_pairs == len(pairs)
    return {"responses": n, "pairs": float(len(pairs)), "ingest_rows_per_s": (2 * n) / ingest_s,
            "ingest_s": ingest_s, "curate_s": curate_s, "export_s": export_s,
            "peak_rss_mib": peak_rss_mib()}  # fmt: skip


def write_frames_rate(n: int) -> dict[str, float | str]:
    """Rows/s of `Store.write_frames` over `n` rows (frames built before the clock starts), per wall second and
    per CPU second of the process (all its threads: steadier than wall time on a shared machine)."""
    from bench.common import frame_batches

    from prefsynth.warehouse.store import Store

    if not hasattr(Store, "write_frames"):
        return {"write_frames_rows_per_s": "n/a (Store.write_frames does not exist yet)"}
    batches = frame_batches(n, BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "frames.duckdb")
        start, cpu = time.perf_counter(), time.process_time()
        written = sum(sum(store.write_frames("bench", b).values()) for b in batches)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        store.close()
    return {"write_frames_rows": float(written), "write_frames_s": seconds,
            "write_frames_rows_per_s": written / seconds, "write_frames_cpu_s": cpu,
            "write_frames_rows_per_cpu_s": written / cpu}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--write-frames-rows", type=int, default=1_000_000, help="0 skips the write_frames rate")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one)))
        return
    if args.frames:
        print(json.dumps(write_frames_rate(args.frames)))
        return
    from bench.common import append_results, emit

    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in results:
        n = r["responses"]
        for key in ("ingest_rows_per_s", "curate_s", "export_s", "peak_rss_mib"):
            emit(f"scale_{n}_{key}", r[key])
    if len(results) > 1:
        a, b = results[0], results[-1]
        growth = b["responses"] / a["responses"]
        emit("scale_curate_growth_per_size_growth", (b["curate_s"] / a["curate_s"]) / growth)
        emit("scale_export_growth_per_size_growth", (b["export_s"] / a["export_s"]) / growth)
    frames: dict[str, float | str] = {}
    if args.write_frames_rows:
        out = subprocess.run([sys.executable, __file__, "--frames", str(args.write_frames_rows)], check=True,
                             capture_output=True, text=True)  # fmt: skip
        frames = json.loads(out.stdout.strip().splitlines()[-1])
        for key, value in frames.items():
            emit(f"scale_{key}", value)
        emit("goal_write_frames_rows_per_s", ">= 500000")
    if args.record:
        header = "| responses | pairs | ingest rows/s | ingest s | curate s | export s | peak RSS MiB |"
        table = [header, "|---|---|---|---|---|---|---|"] + [
            f"| {r['responses']:,} | {int(r['pairs']):,} | {r['ingest_rows_per_s']:,.0f} | {r['ingest_s']:.2f} | "
            f"{r['curate_s']:.2f} | {r['export_s']:.2f} | {r['peak_rss_mib']:,.0f} |" for r in results]  # fmt: skip
        notes = ["ingest counts responses + scores rows; curation = read scores + best_vs_worst + write pairs",
                 *[f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in frames.items()]]
        if frames:
            notes.append("goal write_frames_rows_per_s: >= 500000 (batches of 50k rows, half responses, half scores)")
        append_results("Warehouse scale (no models)", f"python bench/scale.py --record --sizes {args.sizes}",
                       notes, table)  # fmt: skip


if __name__ == "__main__":
    main()
