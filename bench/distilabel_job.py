"""The benchmark job expressed as a distilabel pipeline; run by bench/pipeline.py in distilabel's own venv.

Text generation (N samples per prompt) + UltraFeedback overall rating + DPO formatting, against the same
OpenAI-compatible server prefsynth uses. Prints one JSON line: pairs produced and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distilabel.models.llms import OpenAILLM
from distilabel.pipeline import Pipeline
from distilabel.steps import FormatTextGenerationDPO, GroupColumns, LoadDataFromDicts
from distilabel.steps.tasks import TextGeneration, UltraFeedback


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of prompt texts")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rating-tokens", type=int, default=96)
    parser.add_argument("--cache-dir", required=True)
    args = parser.parse_args()
    prompts = json.loads(Path(args.prompts).read_text())

    def llm(temperature: float, max_tokens: int) -> OpenAILLM:
        # A one-slot local server queues requests: a long timeout keeps queued requests from being retried.
        return OpenAILLM(model="smollm2", base_url=args.base_url, api_key="not-needed", timeout=1800,
                         generation_kwargs={"temperature": temperature, "max_new_tokens": max_tokens})  # fmt: skip

    with Pipeline(name="prefsynth-bench", cache_dir=args.cache_dir) as pipeline:
        load = LoadDataFromDicts(data=[{"instruction": p} for p in prompts])
        # One TextGeneration per sample: `num_generations` sends OpenAI's `n`, which llama.cpp servers ignore
        # (one reply comes back, so chosen == rejected).
        generate = [TextGeneration(name=f"generate_{i}", llm=llm(0.9, args.max_tokens)) for i in range(args.samples)]
        group = GroupColumns(columns=["generation", "model_name"], output_columns=["generations", "generation_models"])
        rate = UltraFeedback(llm=llm(0.0, args.rating_tokens), aspect="overall-rating")
        dpo = FormatTextGenerationDPO()
        load >> generate >> group >> rate >> dpo
    start = time.perf_counter()
    distiset = pipeline.run(use_cache=True)
    seconds = time.perf_counter() - start
    rows = distiset["default"]["train"]
    pairs = sum(1 for r in rows if r.get("chosen") and r.get("rejected"))
    distinct = sum(1 for r in rows if r.get("chosen") and r.get("rejected") and r["chosen"] != r["rejected"])
    texts = sum(len([g for g in r.get("generations") or [] if g]) for r in rows)
    rated = sum(1 for r in rows if any(x is not None for x in r.get("ratings") or []))
    print(json.dumps({"seconds": seconds, "rows": len(rows), "pairs": pairs, "distinct_pairs": distinct,
                      "generations": texts, "rows_with_ratings": rated}))


if __name__ == "__main__":
    main()
