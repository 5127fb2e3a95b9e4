"""`prefsynth report` at scale, without models: a synthetic run of N responses (4 per prompt, one judge, pairs
curated best-vs-worst with a length ratio), then the report's time, peak RSS and page size.

    python bench/report.py --responses 1000000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PER_PROMPT = 4


def build(db: Path, n: int) -> dict[str, float]:
    """The warehouse: prompts, responses (lengths 10-209 tokens), judge scores, the run's pairs and summary."""
    from prefsynth.schemas.config import CurationSpec
    from prefsynth.schemas.records import RunSummary
    from prefsynth.tasks.curate import sampled_pairs
    from prefsynth.warehouse.store import Store

    start = time.perf_counter()
    with Store(db) as store:
        con = store.con
        con.execute("INSERT INTO runs (run_id, name, config, kind) VALUES ('run', 'bench', '{}', 'synthesize')")
        con.execute("INSERT INTO prompts (prompt_id, messages, source, source_ref, run_id) SELECT 'p' || i, "
                    "'[{\"role\": \"user\", \"content\": \"Synthetic prompt ' || i || '?\"}]', 'bench', '', 'run' "
                    "FROM range($1) t(i)", [n // PER_PROMPT])  # fmt: skip
        con.execute("INSERT INTO run_prompts SELECT 'run', prompt_id FROM prompts")
        con.execute("INSERT INTO responses (response_id, prompt_id, model, model_identity, sampling, sample_index, "
                    "seed, text, finish_reason, completion_tokens, latency_ms, call_id, run_id) SELECT 'r' || i, "
                    "'p' || (i // 4), 'm', 'm', '{}', i % 4, 0, repeat('Synthetic response ' || i || ' ', 8), 'stop', "
                    "10 + (i * 7919) % 200, 1, 'c' || i, 'run' FROM range($1) t(i)", [n])  # fmt: skip
        con.execute("INSERT INTO scorers VALUES ('judge', 'judge', 'pointwise_judge', '{}', current_timestamp)")
        con.execute("INSERT INTO scores (score_id, response_id, scorer_id, scorer, value, raw, call_ids, run_id) "
                    "SELECT 's' || i, 'r' || i, 'judge', 'judge', 1 + (i * 104729) % 10, '', [], 'run' "
                    "FROM range($1) t(i)", [n])  # fmt: skip
        con.execute("INSERT INTO scorer_diagnostics (run_id, scorer_id, scorer, items, failed) "
                    "VALUES ('run', 'judge', 'judge', $1, 0)", [n])  # fmt: skip
        scores = con.execute("SELECT r.prompt_id, s.response_id, s.value FROM scores s "
                             "JOIN responses r USING (response_id)").pl()  # fmt: skip
        responses = con.execute("SELECT response_id, completion_tokens::INTEGER AS tokens, finish_reason "
                                "FROM responses").pl()  # fmt: skip
        curated = sampled_pairs(scores, responses, "judge", CurationSpec(max_length_ratio=3.0), 1.0)
        store.write_pairs("run", curated.pairs)
        summary = RunSummary(run_id="run", name="bench", warehouse=str(db), pairs=len(curated.pairs),
                             curation=curated.counts, lengths=curated.lengths)  # fmt: skip
        store.end_run("run", "completed", summary.model_dump())
        con.execute("CHECKPOINT")
    return {"pairs": float(len(curated.pairs)), "build_s": time.perf_counter() - start}


def one_size(n: int) -> dict[str, float]:
    from bench.common import peak_rss_mib

    from prefsynth.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "report.duckdb"
        built = build(db, n)
        before = peak_rss_mib()
        start = time.perf_counter()
        _, page = write_report(db, Path(tmp) / "report.html")
        report_s = time.perf_counter() - start
        return {"responses": n, **built, "report_s": report_s, "page_kib": page.stat().st_size / 1024,
                "peak_rss_mib": peak_rss_mib(), "peak_rss_before_report_mib": before}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=100_000)
    print(json.dumps(one_size(parser.parse_args().responses)))


if __name__ == "__main__":
    main()
