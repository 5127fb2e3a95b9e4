"""CDR scoring through the pipeline versus the same forward passes sent straight to the servers.

1. K labelled replies (LLMBar natural) scored by CDR (SmolLM2-135M over Gemma-3-270M) through the Prefect
   score task, the client, the caches and the warehouse writes, on fresh embedded servers.
2. The exact requests it made (from the model_calls ledger, in order) replayed by a minimal HTTP client
   on fresh servers, with the same concurrency. Ratio (1)/(2): the pipeline's overhead (goal <= 1.10).
3. A new weak model added to the already-scored replies: only its passes are made; timed against the
   same passes replayed straight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from prefect import flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHARED, append_results, emit, replay  # noqa: E402

from prefsynth.backends.local import LocalServers, resolve_gguf  # noqa: E402
from prefsynth.flows.evaluate import eval_items  # noqa: E402
from prefsynth.schemas.config import ModelSpec  # noqa: E402
from prefsynth.schemas.records import Score  # noqa: E402
from prefsynth.tasks._async import run_async  # noqa: E402
from prefsynth.tasks.labelled import load_labelled  # noqa: E402
from prefsynth.tasks.score import score_items  # noqa: E402
from prefsynth.tasks.scorers import build_scorer  # noqa: E402
from prefsynth.tasks.scorers.cdr import CDRSpec  # noqa: E402
from prefsynth.warehouse.store import Store  # noqa: E402

SMOL = ModelSpec(gguf="smollm2-135m-instruct")
GEMMA = ModelSpec(gguf="gemma3-270m-base")


def warm(servers: LocalServers, specs: list[ModelSpec]) -> None:
    """One small request per server, so neither arm pays for first-request warm-up."""
    bodies = [{"prompt": "Hello there, warm-up.", "max_tokens": 1, "prompt_logprobs": 0}]
    for spec in specs:
        asyncio.run(replay(servers.endpoint(spec).base_url, "/completions", bodies, 1))


@flow(name="bench-cdr")
def pipeline_stage(spec: CDRSpec, pairs: list, db: str) -> float:
    """Wall seconds of the scoring stage (servers already up and warm)."""
    with LocalServers() as servers, Store(db) as store:
        scorer = build_scorer(spec, servers.endpoint)
        warm(servers, [spec.strong, spec.weak])
        items = eval_items(pairs, scorer)
        start = time.perf_counter()
        store.write("bench", run_async(score_items(scorer, items, store)).without(Score))
        return time.perf_counter() - start


def direct(db: str, models: dict[str, ModelSpec], since: int) -> tuple[float, int]:
    """Replay the ledger's requests (rows after `since`) per model on fresh servers, in parallel."""
    with Store(db, read_only=True) as store:
        rows = store.con.execute(
            "SELECT model, request FROM model_calls WHERE rowid >= ? ORDER BY rowid", [since]
        ).fetchall()
    with LocalServers() as servers:
        endpoints = {servers.endpoint(spec).identity: servers.endpoint(spec) for spec in models.values()}
        warm(servers, list(models.values()))
        per_model: dict[str, list[dict]] = {}
        for model, request in rows:
            per_model.setdefault(model, []).append({**json.loads(request), "model": "x"})

        async def all_models() -> float:
            start = time.perf_counter()
            await asyncio.gather(*(replay(endpoints[m].base_url, "/completions", bodies, endpoints[m].concurrency)
                                   for m, bodies in per_model.items()))  # fmt: skip
            return time.perf_counter() - start

        return asyncio.run(all_models()), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 labelled pairs instead of 12")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    pairs = load_labelled(SHARED / "llmbar" / "natural.json", "llmbar", limit=3 if args.quick else 12)
    new_weak = ModelSpec(gguf=str(resolve_gguf("smollm2-135m-instruct")[0]))  # same file, new identity
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "bench.duckdb")
        first = CDRSpec(strong=SMOL, weak=GEMMA)
        t_pipe = pipeline_stage(first, pairs, db)
        t_direct, n_first = direct(db, {"strong": SMOL, "weak": GEMMA}, 0)
        second = CDRSpec(strong=SMOL, weak=new_weak)
        t_new = pipeline_stage(second, pairs, db)
        t_new_direct, n_new = direct(db, {"weak": new_weak}, n_first)
    results = {
        "cdr_items": float(2 * len(pairs)),
        "cdr_pipeline_seconds": t_pipe,
        "cdr_direct_seconds": t_direct,
        "cdr_pipeline_vs_direct": t_pipe / t_direct,
        "cdr_requests_first": float(n_first),
        "cdr_new_weak_requests": float(n_new),
        "cdr_new_weak_vs_direct": t_new / t_new_direct,
        "cdr_new_weak_vs_first_run": t_new / t_pipe,
    }
    for name, value in results.items():
        emit(name, value)
    if args.record:
        append_results(
            "CDR scoring: pipeline vs straight to the server",
            "python bench/cdr.py --record" + (" --quick" if args.quick else ""),
            [f"{k}: {v:.3f}" for k, v in results.items()],
        )


if __name__ == "__main__":
    main()
