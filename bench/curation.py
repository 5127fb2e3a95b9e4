"""Curation at scale without models: screening (exact and near-duplicate prompts, duplicate responses across
prompts, decontamination with short and long evaluation items) and a sampled rule with length control over N
synthetic responses (4 per prompt), each size in its own process for its peak RSS.

The data is synthetic and seeded: prompts from a small vocabulary (so that duplicates and near duplicates
occur), responses of 20 words with one boilerplate reply planted in 5% of them, values on a 1-10 scale, token
counts and finish reasons drawn per response, 2,000 evaluation items (half of them 6-word windows of prompts:
short items caught by containment). The code is the pipeline's: `tasks/screen.duplicates`,
`response_duplicates`, `contaminated` and `tasks/curate.sampled_pairs`.

    python bench/curation.py [--sizes 100000,1000000] [--near-prompts 50000] [--record]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PER_PROMPT = 4
WORDS = [f"w{i}" for i in range(400)]


def one_size(n: int, near_prompts: int) -> dict[str, float]:
    import numpy as np
    import polars as pl
    from bench.common import peak_rss_mib

    from prefsynth.schemas.config import CurationSpec
    from prefsynth.tasks.curate import sampled_pairs
    from prefsynth.tasks.screen import contaminated, duplicates, response_duplicates

    rng = np.random.default_rng(0)
    prompts = n // PER_PROMPT
    words = rng.integers(0, len(WORDS), size=(prompts, 12))
    texts = [" ".join(WORDS[w] for w in row) for row in words]
    for i in range(0, prompts, 50):  # 2% exact duplicates (case and punctuation differ)
        texts[i] = texts[i - 1].upper() + "!" if i else texts[i]
    prompt_ids = [f"p{i:08d}" for i in range(prompts)]
    frame = pl.DataFrame({"prompt_id": prompt_ids, "text": texts})
    out: dict[str, float] = {"responses": float(n), "prompts": float(prompts)}

    start = time.perf_counter()
    exact = duplicates(frame, None)
    out["exact_dedup_s"], out["exact_duplicates"] = time.perf_counter() - start, float(len(exact))
    sub = frame.head(min(prompts, near_prompts))
    start = time.perf_counter()
    near = duplicates(sub, 0.85)
    out["near_dedup_s"], out["near_prompts"] = time.perf_counter() - start, float(len(sub))
    out["near_duplicates"] = float(len(near))

    items = [" ".join(t.split()[3:9]) for t in texts[1 : 2000 : 2]]  # 6-word windows of 1,000 prompts
    extra = np.random.default_rng(1)  # its own draws: the data of the earlier measurements stays the same
    items += [" ".join(WORDS[w] for w in row) for row in extra.integers(0, len(WORDS), size=(1000, 20))]
    evals = pl.DataFrame({"benchmark": "bench", "item": items})
    start = time.perf_counter()
    hits = contaminated(frame, evals, 13, 5)
    out["decontaminate_s"], out["contaminated"] = time.perf_counter() - start, float(len(hits))

    rids = [f"r{i:09d}" for i in range(n)]
    rtexts = [" ".join(WORDS[w] for w in row) for row in extra.integers(0, len(WORDS), size=(n, 20))]
    for i in range(0, n, 20):  # 5%: the same boilerplate reply to different prompts
        rtexts[i] = "I am sorry, but I cannot help with that request."
    replies = pl.DataFrame({"response_id": rids, "prompt_id": [prompt_ids[i // PER_PROMPT] for i in range(n)],
                            "text": rtexts})  # fmt: skip
    del rtexts
    start = time.perf_counter()
    copies = response_duplicates(replies, None)
    out["response_dedup_s"], out["duplicate_responses"] = time.perf_counter() - start, float(len(copies))
    start = time.perf_counter()
    near_copies = response_duplicates(replies.head(min(n, near_prompts)), 0.85)
    out["near_response_dedup_s"], out["near_duplicate_responses"] = time.perf_counter() - start, float(len(near_copies))
    del replies
    scores = pl.DataFrame({"prompt_id": [prompt_ids[i // PER_PROMPT] for i in range(n)], "response_id": rids,
                           "value": rng.integers(1, 11, size=n).astype(float)})  # fmt: skip
    responses = pl.DataFrame({"response_id": rids, "tokens": rng.integers(5, 400, size=n).astype("int32"),
                              "finish_reason": np.where(rng.random(n) < 0.2, "length", "stop")})  # fmt: skip
    kept = scores.join(exact.select("prompt_id"), on="prompt_id", how="anti")
    spec = CurationSpec(rule="above_margin", max_length_ratio=3, length_matched=True)
    start = time.perf_counter()
    curated = sampled_pairs(kept, responses, "judge", spec, 1.0)
    out["curate_s"], out["pairs"] = time.perf_counter() - start, float(len(curated.pairs))
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--near-prompts", type=int, default=50_000, help="prompts given to the MinHash pass")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.near_prompts)))
        return
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--near-prompts", str(args.near_prompts)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    if args.record:
        from bench.common import append_results

        keys = ["responses", "exact_dedup_s", "exact_duplicates", "near_prompts", "near_dedup_s", "near_duplicates",
                "response_dedup_s", "duplicate_responses", "near_response_dedup_s", "near_duplicate_responses",
                "decontaminate_s", "contaminated", "curate_s", "pairs", "peak_rss_mib"]  # fmt: skip
        table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        table += ["| " + " | ".join(f"{r[k]:.2f}" if r[k] % 1 else f"{r[k]:.0f}" for k in keys) + " |" for r in rows]
        notes = ["synthetic prompts (12 words of 400, 2% exact duplicates differing in case and punctuation), 4 "
                 "responses each; curation = above_margin, margin 1, max_length_ratio 3, length_matched, "
                 "after exact dedup; near dedup = MinHash LSH at 0.85 over the first --near-prompts prompts "
                 "(and as many responses); responses of 20 words, 5% one boilerplate reply (exact dedup across "
                 "prompts over all); decontamination: 2,000 items (1,000 6-word windows of prompts, caught by "
                 "containment, and 1,000 random 20-word items), ngram 13, ngram_min 5"]
        append_results("Curation at scale (issue 12)", "python bench/curation.py " + " ".join(sys.argv[1:]),
                       notes, table)  # fmt: skip


if __name__ == "__main__":
    main()
