"""The data of `prefsynth report` and of the flow's report artifacts: one run's scores, pairs, judges, panel and
curation counts, read-only, as polars frames.

The SQL here picks and joins; polars (report/summary.py) aggregates. No Python loop runs over rows: at a million
responses the page still gets histograms and a bounded draw of points, never every row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from prefsynth.warehouse.store import Store

EXTREMES = 5  # pairs in each of the most and least confident tables

_RUN = """
SELECT r.run_id, r.name, r.kind, r.started_at, e.finished_at, coalesce(e.status, 'running or interrupted') AS status,
       e.summary, (SELECT count(*) FROM run_prompts x WHERE x.run_id = r.run_id) AS prompts
FROM runs r LEFT JOIN run_ends e USING (run_id) WHERE r.run_id = $run
"""
# the sampled responses to the run's prompts; the run's scorers are those it diagnosed (all, for a run that stopped
# before its diagnostics), its panel's values come from panel_scores
_SCORES = """
WITH resp AS (
    SELECT r.response_id, r.prompt_id, r.model, r.completion_tokens AS tokens, r.finish_reason
    FROM responses r JOIN run_prompts rp ON rp.prompt_id = r.prompt_id AND rp.run_id = $run
    WHERE r.source = 'sampled'),
used AS (SELECT DISTINCT scorer_id FROM scorer_diagnostics WHERE run_id = $run)
SELECT s.scorer_id, s.scorer, k.kind, resp.*, s.value
FROM scores s JOIN resp USING (response_id) JOIN scorers k USING (scorer_id)
WHERE NOT EXISTS (SELECT 1 FROM used) OR s.scorer_id IN (SELECT scorer_id FROM used)
UNION ALL
SELECT ps.panel_id AS scorer_id, pr.name AS scorer, 'panel' AS kind, resp.*, ps.value
FROM panel_scores ps JOIN panel_runs pr USING (run_id, panel_id) JOIN resp USING (response_id)
WHERE ps.run_id = $run
ORDER BY scorer, scorer_id, response_id
"""
_PAIRS = """
SELECT p.pair_id, p.source, p.scorer_id, coalesce(k.name, p.scorer_id) AS scorer, p.margin, p.score_chosen,
       p.score_rejected, c.completion_tokens AS chosen_tokens, r.completion_tokens AS rejected_tokens,
       json_extract(p.rule, '$.max_length_ratio') IS NOT NULL
           OR coalesce(json_extract(p.rule, '$.length_matched')::BOOLEAN, false) AS length_controlled
FROM run_pairs rp JOIN pairs p USING (pair_id) JOIN responses c ON c.response_id = p.chosen_id
JOIN responses r ON r.response_id = p.rejected_id LEFT JOIN scorers k ON k.scorer_id = p.scorer_id
WHERE rp.run_id = $run ORDER BY p.pair_id
"""
# confidence: the margin over the largest margin of the same source and scorer (export's `scaled` margin), so
# that pairs in different units rank together; a pair among the most confident is not listed again as least
_EXTREMES = """
WITH p AS (
    SELECT v.*, v.margin / nullif(max(abs(v.margin)) OVER (PARTITION BY v.source, v.scorer_id), 0) AS confidence
    FROM v_run_pairs v WHERE v.run_id = $run),
ranked AS (
    SELECT *, row_number() OVER (ORDER BY confidence DESC NULLS LAST, pair_id) AS hi,
              row_number() OVER (ORDER BY confidence ASC NULLS LAST, pair_id) AS lo FROM p)
SELECT CASE WHEN hi <= $n THEN 'most' ELSE 'least' END AS side, hi, lo, pair_id, source,
       coalesce(k.name, ranked.scorer_id) AS scorer, confidence, margin, score_chosen, score_rejected,
       json_extract_string(prompt_messages, '$[#-1].content') AS prompt, chosen_text, rejected_text,
       chosen_model, rejected_model
FROM ranked LEFT JOIN scorers k USING (scorer_id)
WHERE hi <= $n OR lo <= $n
ORDER BY side DESC, CASE WHEN hi <= $n THEN hi ELSE lo END
"""
_DIAGNOSTICS = """
SELECT d.scorer, k.kind, d.items, d.failed, d.failure_rate, d.length_corr, d.position_consistency,
       d.first_position_rate
FROM scorer_diagnostics d LEFT JOIN scorers k USING (scorer_id) WHERE d.run_id = $run ORDER BY d.scorer, d.scorer_id
"""
# the pairwise judges' comparisons among the run's responses (the run's judges, as in _SCORES)
_COMPARISONS = """
WITH resp AS (SELECT r.response_id FROM responses r JOIN run_prompts rp ON rp.prompt_id = r.prompt_id
              AND rp.run_id = $run),
used AS (SELECT DISTINCT scorer_id FROM scorer_diagnostics WHERE run_id = $run)
SELECT k.name AS scorer, c.comparison_id, c.winner, c.consistent, c.flipped
FROM comparisons c JOIN resp a ON a.response_id = c.response_a_id JOIN resp b ON b.response_id = c.response_b_id
JOIN scorers k USING (scorer_id)
WHERE NOT EXISTS (SELECT 1 FROM used) OR c.scorer_id IN (SELECT scorer_id FROM used)
ORDER BY k.name, c.comparison_id
"""
_PANELS = "SELECT name, aggregate, members, prompts, alpha, mean_tau FROM panel_runs WHERE run_id = $run ORDER BY name"
_AGREEMENT = """
SELECT pr.name AS panel, a.prompt_id, a.scorer_a, a.scorer_b, a.kendall_tau, a.alpha
FROM panel_agreement a JOIN panel_runs pr USING (run_id, panel_id) WHERE a.run_id = $run
ORDER BY pr.name, a.prompt_id, a.scorer_a, a.scorer_b
"""


@dataclass
class ReportData:
    """One run as the report shows it. `summary` is the run's final summary (empty while it runs)."""

    run: dict[str, Any]
    summary: dict[str, Any]
    scores: pl.DataFrame  # scorer_id, scorer, kind, response_id, prompt_id, model, tokens, finish_reason, value
    pairs: pl.DataFrame  # pair_id, source, scorer_id, scorer, margin, score_chosen/rejected, chosen/rejected_tokens,
    # length_controlled (its rule had max_length_ratio or length_matched)
    extremes: pl.DataFrame  # side (most, least), the most and least confident pairs with their texts
    diagnostics: pl.DataFrame
    comparisons: pl.DataFrame
    panels: pl.DataFrame
    agreement: pl.DataFrame


def report_data(store: Store, run_id: str | None = None, extremes: int = EXTREMES) -> ReportData:
    """Everything the report shows of one run (default: the newest completed pipeline run, else the newest at all:
    `Store.pipeline_run`), through the store's (read-only) connection."""
    run = store.pipeline_run(run_id, completed=False)
    params = {"run": run}

    def query(sql: str, extra: dict[str, Any] | None = None) -> pl.DataFrame:
        return store._query(sql, {**params, **(extra or {})})  # type: ignore[arg-type]

    info = query(_RUN).to_dicts()[0]
    summary = json.loads(info.pop("summary") or "{}")
    return ReportData(run=info, summary=summary, scores=query(_SCORES), pairs=query(_PAIRS),
                      extremes=query(_EXTREMES, {"n": extremes}), diagnostics=query(_DIAGNOSTICS),
                      comparisons=query(_COMPARISONS), panels=query(_PANELS), agreement=query(_AGREEMENT))  # fmt: skip
