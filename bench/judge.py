"""Pairwise judging: SmolLM2-135M as judge on LLMBar, with and without Balanced Position Calibration, and the
pipeline's judging throughput against the same requests sent straight to the server.

1. Accuracy: `evaluate` with two scorers that differ only in `balanced_position` on natural.json and
   processed-faireval.json. Eval judges both orders for both, so the second shares every call; reported:
   accuracy, ties, position consistency, first-position rate, flips, calls and tokens per pair.
2. Variants on the first 20 pairs of natural.json, both orders: the answer_tag style (free reasoning ending
   in <answer>X</answer>) and Multiple Evidence Calibration (k = 3 samples per order at temperature 0.7).
3. Throughput: K labelled pairs judged (both orders) through the Prefect score task, the client, the
   caches and the warehouse writes, on a fresh embedded server; then the exact requests it made (from the
   model_calls ledger, in order) replayed by a minimal HTTP client on a fresh server, same concurrency.
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

from prefsynth.backends.local import LocalServers  # noqa: E402
from prefsynth.flows.evaluate import eval_items, evaluate  # noqa: E402
from prefsynth.schemas.config import ModelSpec, parse_config  # noqa: E402
from prefsynth.schemas.records import Score  # noqa: E402
from prefsynth.tasks._async import run_async  # noqa: E402
from prefsynth.tasks.labelled import load_labelled  # noqa: E402
from prefsynth.tasks.score import score_items  # noqa: E402
from prefsynth.tasks.scorers import build_scorer  # noqa: E402
from prefsynth.tasks.scorers.pairwise_judge import PairwiseJudgeSpec  # noqa: E402
from prefsynth.warehouse.store import Store  # noqa: E402

SMOL = {"gguf": "smollm2-135m-instruct", "n_ctx": 4096}
JUDGE = {"kind": "pairwise_judge", "model": SMOL, "max_tokens": 160}
FILES = ("natural.json", "processed-faireval.json")
KEYS = ("n", "accuracy", "accuracy_ties_half", "ties", "failed", "position_consistency", "first_position_rate",
        "flipped", "dropped", "repaired", "calls_per_pair", "tokens_per_pair")  # fmt: skip


TABLE_HEAD = ["| data | judge | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
ACCURACY = [{**JUDGE, "name": "bpc"}, {**JUDGE, "name": "one-order", "balanced_position": False}]
VARIANTS = [{**JUDGE, "name": "answer-tag-bpc", "style": "answer_tag", "max_tokens": 256},
            {**JUDGE, "name": "mec3-bpc", "samples_per_order": 3, "temperature": 0.7}]  # fmt: skip


def judge_eval(db: str, judges: list[dict], files: tuple[str, ...], limit: int | None, tag: str = "",
               ) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """Evaluate `judges` on each LLMBar file: `judge_<file><tag>_<judge>_<key>` values and table rows."""
    config = parse_config({"prompts": {"builtin": "quickstart"}, "generation": {"models": [SMOL]},
                           "scorers": judges, "warehouse": db})  # fmt: skip
    results: dict[str, float] = {}
    table = []
    for name in files:
        start = time.perf_counter()
        out = evaluate(config=config, data=str(SHARED / "llmbar" / name), fmt="llmbar", limit=limit)
        stem = name.removesuffix(".json") + tag
        results[f"judge_{stem}_seconds"] = time.perf_counter() - start
        for judge, report in out["scorers"].items():
            for key in KEYS:
                if report.get(key) is not None:
                    results[f"judge_{stem}_{judge}_{key}"] = float(report[key])
            table.append(f"| {stem} | {judge} | " + " | ".join(str(report.get(key)) for key in KEYS) + " |")
    return results, table


@flow(name="bench-judge")
def pipeline_stage(spec: PairwiseJudgeSpec, pairs: list, db: str) -> float:
    """Wall seconds of judging `pairs` in both orders (server already up and warm)."""
    with LocalServers() as servers, Store(db) as store:
        scorer = build_scorer(spec, servers.endpoint)
        asyncio.run(replay(servers.endpoint(spec.model).base_url, "/chat/completions",
                           [{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}], 1))  # fmt: skip
        items = eval_items(pairs, scorer)
        start = time.perf_counter()
        store.write("bench", run_async(score_items(scorer, items, store)).without(Score))
        return time.perf_counter() - start


def direct(db: str, spec: ModelSpec) -> tuple[float, int]:
    with Store(db, read_only=True) as store:
        bodies = [{**json.loads(r), "model": "x"} for (r,) in
                  store.con.execute("SELECT request FROM model_calls ORDER BY rowid").fetchall()]  # fmt: skip
    with LocalServers() as servers:
        ep = servers.endpoint(spec)
        asyncio.run(replay(ep.base_url, "/chat/completions",
                           [{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}], 1))  # fmt: skip
        return asyncio.run(replay(ep.base_url, "/chat/completions", bodies, ep.concurrency)), len(bodies)


def throughput(tmp: str, quick: bool) -> dict[str, float]:
    """Judging through the pipeline vs the same requests straight to the server."""
    pairs = load_labelled(SHARED / "llmbar" / "natural.json", "llmbar", limit=3 if quick else 12)
    spec = PairwiseJudgeSpec(**JUDGE)
    db = str(Path(tmp) / "speed.duckdb")
    t_pipe = pipeline_stage(spec, pairs, db)
    t_direct, n = direct(db, spec.model)
    return {"judge_throughput_pairs": float(len(pairs)), "judge_throughput_requests": float(n),
            "judge_pipeline_seconds": t_pipe, "judge_direct_seconds": t_direct,
            "judge_pipeline_vs_direct": t_pipe / t_direct}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 pairs per file and 3 for throughput")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    parser.add_argument("--db", help="warehouse to keep the judge calls in (default: a temporary one)")
    parser.add_argument("--parts", default="accuracy,variants,throughput", help="comma-separated parts to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"accuracy", "variants", "throughput"}:
        parser.error(f"--parts takes accuracy, variants, throughput; got {args.parts}")
    results: dict[str, float] = {}
    table: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or str(Path(tmp) / "acc.duckdb")
        if "accuracy" in parts:
            found, rows = judge_eval(db, ACCURACY, FILES, 5 if args.quick else None)
            results.update(found)
            table += rows
        if "variants" in parts:
            found, rows = judge_eval(db, VARIANTS, FILES[:1], 3 if args.quick else 20, "-first20")
            results.update(found)
            table += rows
        if "throughput" in parts:
            results.update(throughput(tmp, args.quick))
    for name, value in results.items():
        emit(name, value)
    if args.record:
        append_results(
            "Pairwise judge (SmolLM2-135M) on LLMBar, with and without calibration; judging throughput",
            "python bench/judge.py --record" + (" --quick" if args.quick else "")
            + (f" --parts {args.parts}" if parts != {"accuracy", "variants", "throughput"} else ""),
            [f"{k}: {v:.4f}" for k, v in results.items()],
            TABLE_HEAD + table if table else None,
        )


if __name__ == "__main__":
    main()
