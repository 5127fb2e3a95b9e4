"""Teacher refinement against sampled best-vs-worst pairs, for the same prompts and the same judge/teacher model.

Runs examples/teacher-refinement.yaml (or its first --prompts prompts) into a fresh warehouse and reports, per
pair source: pairs, margin distribution, character edit distance between chosen and rejected, and model
calls per kept pair (sampled: generation + judge calls; refinement: the teacher's refine and score calls,
failed ones included; anchor: the teacher's answers and their judge scores).

    PYTHONPATH=src HF_HUB_OFFLINE=1 .venv/bin/python bench/teacher.py [--prompts 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import polars as pl
import yaml
from rapidfuzz.distance import Levenshtein

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prefsynth  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "teacher-refinement.yaml"
CALLS = {"sampled": ("generate", "score[judge]"), "teacher_refinement": ("refine[teacher]",),
         "teacher_anchor": ("anchor[teacher]",)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=None, help="use the first N built-in prompts")
    args = parser.parse_args()
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["export"] = []
    if args.prompts:
        raw["prompts"]["limit"] = args.prompts
    with tempfile.TemporaryDirectory() as tmp:
        result = prefsynth.run(raw, db=str(Path(tmp) / "bench.duckdb"), base_dir=EXAMPLE.parent)
        wh = prefsynth.Warehouse(str(Path(tmp) / "bench.duckdb"))
        refinements = wh.sql("SELECT count(*) AS n, count(*) FILTER (WHERE kept) AS kept, "
                             "count(*) FILTER (WHERE drop_reason = 'identical') AS identical, "
                             "count(*) FILTER (WHERE drop_reason = 'below_min_gap') AS below_min_gap FROM refinements")
        failed = wh.sql("SELECT count(*) AS n FROM failures WHERE stage = 'refine'")["n"][0]
        calls_by_stage = {s: c.model_calls for s, c in result.counts.items()}
    pairs = result.pairs.with_columns(edit_distance=pl.struct("chosen_text", "rejected_text").map_elements(
        lambda r: Levenshtein.distance(r["chosen_text"], r["rejected_text"]), return_dtype=pl.Int64))
    print(f"run {result.run_id}: {result.status}, {len(pairs)} pairs; refinements {refinements.to_dicts()[0]}, "
          f"{failed} unparsable after repair")
    for source, group in pairs.group_by("source", maintain_order=True):
        calls = sum(calls_by_stage.get(stage, 0) for stage in CALLS[source[0]])
        m, d = group["margin"], group["edit_distance"]
        print(f"{source[0]:>18}: {len(group):3d} pairs | margin mean {m.mean():.2f}, median {m.median():.1f}, "
              f"min {m.min():g}, max {m.max():g}, histogram {dict(sorted(m.value_counts().iter_rows()))} | "
              f"edit distance median {d.median():.0f}, mean {d.mean():.0f} | {calls} calls, "
              f"{calls / len(group):.1f} per kept pair")


if __name__ == "__main__":
    main()
