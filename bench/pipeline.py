"""The pipeline against the limit and against distilabel, on one embedded SmolLM2 server.

The bench starts one llama.cpp server and a counting proxy in front of it; every arm talks to the proxy.
A fixed job: P built-in prompts x 2 samples (max_tokens 48) + an UltraFeedback-style rating (96 tokens).
  direct     the requests prefsynth made (read back from its ledger) sent one after another by a minimal client
  prefsynth  `prefsynth run CONFIG` (a fresh process: Prefect's temporary API, warehouse writes)
  distilabel the same job as a distilabel 1.5.3 pipeline (TextGeneration, UltraFeedback, FormatTextGenerationDPO)
             in its own virtual environment (.bench/distilabel-venv, created here)
Then a rerun of each, and 10% more prompts for prefsynth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, CountingProxy, append_results, emit, replay, tree_peak_rss  # noqa: E402

from prefsynth.backends.local import LocalServers  # noqa: E402
from prefsynth.schemas.config import ModelSpec, PromptSource  # noqa: E402
from prefsynth.tasks.ingest import load_prompts  # noqa: E402

DISTILABEL_VENV = ROOT / ".bench" / "distilabel-venv"


def job(url: str, prompts: int, warehouse: str) -> dict:
    model = {"base_url": url, "model": "smollm2", "server": "llama-cpp", "max_concurrency": 1}
    return {
        "name": "bench",
        "prompts": {"builtin": "quickstart", "limit": prompts},
        "generation": {"models": [model], "samples_per_prompt": 2,
                       "sampling": {"temperature": 0.9, "max_tokens": 48, "seed": 0}},
        "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model, "max_tokens": 96}],
        "warehouse": warehouse,
    }  # fmt: skip


def prefsynth_run(config: Path) -> tuple[float, float]:
    start = time.perf_counter()
    _, peak = tree_peak_rss([str(Path(sys.executable).parent / "prefsynth"), "run", str(config)], cwd=config.parent)
    return time.perf_counter() - start, peak


def ledger(db: str) -> list[str]:
    import duckdb

    with duckdb.connect(db, read_only=True) as con:
        return [r for (r,) in con.execute("SELECT request FROM model_calls ORDER BY rowid").fetchall()]


def distilabel_python() -> Path:
    python = DISTILABEL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(DISTILABEL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "distilabel[openai]==1.5.3", "requests"], check=True)
    return python


def distilabel_run(python: Path, url: str, prompts: Path, cache: Path) -> tuple[dict, float]:
    cmd = [str(python), str(ROOT / "bench" / "distilabel_job.py"), "--base-url", url, "--prompts", str(prompts),
           "--cache-dir", str(cache)]  # fmt: skip
    start = time.perf_counter()
    result, peak = tree_peak_rss(cmd, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                           "HOME": str(cache)})  # fmt: skip
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["wall"] = time.perf_counter() - start
    return out, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts instead of 24")
    parser.add_argument("--no-distilabel", action="store_true", help="skip the distilabel arm")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    n = 4 if args.quick else 24
    r: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, LocalServers() as servers:
        folder = Path(tmp)
        proxy = CountingProxy(servers.endpoint(ModelSpec(gguf="smollm2-135m-instruct")).base_url)
        db, config = str(folder / "bench.duckdb"), folder / "job.yaml"
        config.write_text(yaml.safe_dump(job(proxy.url, n, db)))
        asyncio.run(replay(proxy.url, "/chat/completions", [{"messages": [{"role": "user", "content": "Hi"}],
                                                               "max_tokens": 4}], 1))  # warm-up  # fmt: skip
        proxy.count = 0
        r["prefsynth_seconds"], r["prefsynth_peak_rss_mib"] = prefsynth_run(config)
        r["prefsynth_calls"] = proxy.count
        requests = ledger(db)
        proxy.count = 0
        start = time.perf_counter()
        asyncio.run(replay(proxy.url, "/chat/completions", [{**json.loads(b), "model": "x"} for b in requests], 1))
        r["direct_seconds"], r["direct_calls"] = time.perf_counter() - start, proxy.count
        r["overhead_vs_limit_wall"] = r["prefsynth_seconds"] / r["direct_seconds"]
        r["overhead_vs_limit_calls"] = r["prefsynth_calls"] / r["direct_calls"]
        proxy.count = 0
        r["prefsynth_rerun_seconds"], _ = prefsynth_run(config)
        r["prefsynth_rerun_calls"] = proxy.count
        grown = n + max(1, n // 10)
        config.write_text(yaml.safe_dump(job(proxy.url, grown, db)))
        proxy.count = 0
        r["grow_seconds"], _ = prefsynth_run(config)
        r["grow_new_prompts"], r["grow_calls"] = grown - n, proxy.count
        r["grow_vs_first_wall"] = r["grow_seconds"] / r["prefsynth_seconds"]
        if not args.no_distilabel:
            python = distilabel_python()
            texts = [p.messages[-1].content for p in load_prompts(PromptSource(builtin="quickstart", limit=n)).prompts]
            (folder / "prompts.json").write_text(json.dumps(texts))
            for label in ("distilabel", "distilabel_rerun"):
                proxy.count = 0
                out, peak = distilabel_run(python, proxy.url, folder / "prompts.json", folder / "dl-cache")
                r[f"{label}_seconds"], r[f"{label}_calls"], r[f"{label}_pairs"] = out["wall"], proxy.count, out["pairs"]
                r[f"{label}_distinct_pairs"], r[f"{label}_generations"] = out["distinct_pairs"], out["generations"]
                r[f"{label}_rows_with_ratings"] = out["rows_with_ratings"]
                if label == "distilabel":
                    r["distilabel_peak_rss_mib"] = peak
            r["prefsynth_vs_distilabel_wall"] = r["prefsynth_seconds"] / r["distilabel_seconds"]
        import duckdb

        with duckdb.connect(db, read_only=True) as con:
            first_run = con.execute("SELECT run_id FROM runs ORDER BY started_at LIMIT 1").fetchone()[0]
            sql = "SELECT count(*) FROM run_pairs WHERE run_id = ?"
            r["prefsynth_pairs"] = con.execute(sql, [first_run]).fetchone()[0]
            r["prefsynth_generations"] = con.execute("SELECT count(*) FROM responses WHERE run_id = ?",
                                                     [first_run]).fetchone()[0]  # fmt: skip
        proxy.close()
    for name, value in r.items():
        emit(name, float(value))
    if args.record:
        append_results("Pipeline vs the limit and vs distilabel (same server, same run)",
                       "python bench/pipeline.py --record" + (" --quick" if args.quick else ""),
                       [f"job: {n} quickstart prompts x 2 samples (max_tokens 48) + rating, SmolLM2-135M, "
                        "llama.cpp server behind a counting proxy",
                        *[f"{k}: {float(v):.3f}" for k, v in r.items()]])  # fmt: skip


if __name__ == "__main__":
    main()
