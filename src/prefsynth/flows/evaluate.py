"""Evaluate scorers against human-labelled pairs: how often does each pick the labelled-better reply?

The CDR paper chose its model pair by measuring many pairs this way; `prefsynth eval` does the same for
any scorer of a config (CDR pairs, judges, reward models), side by side, into the warehouse and as a
report. A pointwise scorer scores both replies; a pairwise judge compares them, always in both orders so
that its position consistency is measured even when its verdict uses one order. Model calls and log-probs
go through the same caches as the pipeline, so a rerun makes no new requests.

Labelled files are screened on reading (`tasks/labelled.py`): a pair read twice is evaluated once and
counted as a duplicate, a pair with two identical replies is skipped, a pair with one empty reply is
evaluated; the report carries `pairs`, `duplicates`, `skipped` and `skipped_by_reason`. Every key the final
write uses (pair keys, scorer ids) is checked to be distinct before the first model call, so no evaluation
is lost to a constraint error after its calls.

An evaluation is a run of kind `eval` in `runs` and `run_ends`: its `eval_id` is the `run_id` of every row it
writes (model calls, judgments, comparisons, failures), so every run_id in the warehouse names a run.
"""

# No `from __future__ import annotations` here: a deployment's run process validates its parameters against
# the flow's annotations, and a string annotation does not resolve there (issue 13).
import json
import uuid
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from prefsynth.backends.local import LocalServers
from prefsynth.flows.commit import score_stream
from prefsynth.flows.opening import check_endpoints
from prefsynth.flows.synthesize import flow_run_id, interrupted
from prefsynth.schemas.config import PipelineConfig
from prefsynth.schemas.records import Comparison, Failure, Judgment, ModelCall, Score, StageResult
from prefsynth.tasks.compare import comparison_id
from prefsynth.tasks.diagnostics import pairwise_report
from prefsynth.tasks.labelled import LabelledPair, accuracy_report, better_share, check_keys, load_labelled_report
from prefsynth.tasks.scorers import PairItem, PairwiseScorer, ScoreItem, Scorer, build_scorer
from prefsynth.warehouse.ids import canonical_json, content_id, prompt_id, score_id
from prefsynth.warehouse.store import Store, frame

REPORT_COLUMNS = ("scorer", "n", "accuracy", "ties", "failed", "duplicates", "skipped", "position_consistency",
                  "model_calls")  # fmt: skip


def _rid(pair: LabelledPair, side: str) -> str:
    return content_id("labelled-response", pair.pair_key, side)


def _pid(pair: LabelledPair) -> str:
    return prompt_id([m.model_dump() for m in pair.prompt])


def eval_items(pairs: list[LabelledPair], scorer: Scorer) -> list[ScoreItem] | list[PairItem]:
    """Pointwise: two items per pair (better, worse). Pairwise: one comparison per pair, in the file's order."""
    if isinstance(scorer, PairwiseScorer):
        items = []
        for pair in pairs:
            better, worse = (_rid(pair, "better"), pair.better), (_rid(pair, "worse"), pair.worse)
            a, b = (better, worse) if pair.better_first else (worse, better)
            items.append(PairItem(comparison_id(scorer.scorer_id, a[0], b[0]), _pid(pair), pair.prompt, a, b, True))
        return items
    return [ScoreItem(score_id(_rid(pair, side), scorer.scorer_id), _rid(pair, side), _pid(pair), pair.prompt, text)
            for pair in pairs for side, text in (("better", pair.better), ("worse", pair.worse))]  # fmt: skip


@flow(name="prefsynth-evaluate")
def evaluate(
    config: PipelineConfig, data: str, fmt: str, limit: int | None = None, db: str | None = None
) -> dict[str, Any]:
    """Score every labelled pair with each scorer of `config`; report accuracy, ties and position consistency."""
    logger = get_run_logger()
    labelled = load_labelled_report(data, fmt, limit)
    pairs, counts = labelled.pairs, labelled.counts()
    logger.info(f"eval: {len(pairs)} labelled pairs from {data}; {labelled.duplicates} duplicates evaluated once, "
                f"{labelled.skipped} skipped {counts['skipped_by_reason']}")  # fmt: skip
    eval_id = uuid.uuid4().hex
    reports: dict[str, Any] = {}
    with LocalServers() as servers:
        for spec in config.scorers:
            for model in spec.models():
                servers.check(model)
        scorers = [build_scorer(s, servers.endpoint) for s in config.scorers]
        check_endpoints([e for s in scorers for e in s.endpoints.values()])
        check_keys(pairs, scorers)
        with Store(db or config.warehouse, wait_s=config.warehouse_wait_s, notify=logger.warning) as store:
            store.begin_run(eval_id, config.name, canonical_json(config.model_dump()), flow_run_id(), kind="eval")
            try:
                for scorer in scorers:
                    reports[scorer.name] = _evaluate_and_write(store, eval_id, scorer, pairs, data, fmt, counts)
            except BaseException as err:
                status = "interrupted" if interrupted(err) else "failed"
                store.end_run(eval_id, status, {"data": data, "format": fmt, "scorers": reports})
                raise
            store.end_run(eval_id, "completed", {"data": data, "format": fmt, **counts, "scorers": reports})
    create_table_artifact(
        key="prefsynth-eval",
        table=[{k: r.get(k) for k in REPORT_COLUMNS} for r in reports.values()],
        description=f"eval {eval_id} on {data} ({fmt})",
    )
    return {"eval_id": eval_id, "data": data, "format": fmt, **counts, "scorers": reports}


def _evaluate_and_write(
    store: Store, eval_id: str, scorer: Scorer, pairs: list[LabelledPair], data: str, fmt: str, counts: dict[str, Any]
) -> dict[str, Any]:
    """Evaluate one scorer, write its `evals` row and `eval_items`, and log its line; returns its report."""
    store.register_scorer(scorer.scorer_id, scorer.name, scorer.kind, scorer.config_json)
    report, items = _evaluate_scorer(store, eval_id, scorer, pairs)
    report.update(counts)
    store.write_eval(
        eval_id,
        {"scorer_id": scorer.scorer_id, "scorer": scorer.name, "data": str(Path(data)), "format": fmt,
         "n": report["n"], "accuracy": report["accuracy"], "ties": report["ties"],
         "failed": report["failed"], "report": json.dumps(report, sort_keys=True)},
        frame("eval_items", items),
    )  # fmt: skip
    consistency = report.get("position_consistency")
    swap = f", position consistency {consistency:.4f}" if consistency is not None else ""
    get_run_logger().info(f"eval[{scorer.name}]: accuracy {report['accuracy']:.4f} on {report['n']} pairs, "
                          f"{report['ties']} ties, {report['failed']} failed, "
                          f"{report['model_calls']} new model calls{swap}")  # fmt: skip
    return report


def _evaluate_scorer(
    store: Store, eval_id: str, scorer: Scorer, pairs: list[LabelledPair]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The scorer's report and one eval_items row per labelled pair."""
    items = eval_items(pairs, scorer)
    result = _score_all(store, eval_id, scorer, items)
    errors = {f.item_id: f.error for f in result.of(Failure)}
    rows = []
    if isinstance(scorer, PairwiseScorer):
        comps = {c.comparison_id: c for c in result.of(Comparison)}
        for pair, item in zip(pairs, items, strict=True):
            assert isinstance(item, PairItem)
            c = comps.get(item.comparison_id)
            better = better_share(pair, c)
            rows.append(_row(eval_id, scorer, pair, better, None if better is None else 1 - better,
                             errors.get(item.comparison_id), None if c is None else c.consistent))  # fmt: skip
    else:
        values = {s.score_id: s.value for s in result.of(Score)}
        for pair in pairs:
            ids = [score_id(_rid(pair, side), scorer.scorer_id) for side in ("better", "worse")]
            error = errors.get(ids[0]) or errors.get(ids[1])
            rows.append(_row(eval_id, scorer, pair, values.get(ids[0]), values.get(ids[1]), error, None))
    report = {"scorer": scorer.name, "scorer_id": scorer.scorer_id,
              **accuracy_report([(r["subset"], r["score_better"], r["score_worse"]) for r in rows]),
              "model_calls": len(result.of(ModelCall))}  # fmt: skip
    if isinstance(scorer, PairwiseScorer):
        comparisons, judgments = frame("comparisons", result.of(Comparison)), frame("judgments", result.of(Judgment))
        report.update(pairwise_report(comparisons, judgments, scorer.orders, scorer.calls_per_comparison))
    return report, rows


def _row(
    eval_id: str, scorer: Scorer, pair: LabelledPair, better: float | None, worse: float | None, error: str | None,
    consistent: bool | None,
) -> dict[str, Any]:  # fmt: skip
    return {"eval_id": eval_id, "scorer_id": scorer.scorer_id, "pair_key": pair.pair_key, "subset": pair.subset,
            "source_ref": pair.source_ref, "score_better": better, "score_worse": worse, "error": error,
            "consistent": consistent}  # fmt: skip


def _score_all(store: Store, eval_id: str, scorer: Scorer, items: list[Any]) -> StageResult:
    """Score every item as the pipeline does; returns everything scored. Calls, failures and judgments are
    written; scores of labelled replies are kept in eval_items, not in the scores table."""
    return score_stream(f"eval[{scorer.name}]", scorer, items, store, eval_id, keep_scores=False)


def summary_frame(result: dict[str, Any]) -> pl.DataFrame:
    """One row per scorer: n, accuracy, ties, failed, the data's duplicates and skipped pairs, position
    consistency, then accuracy per subset."""
    rows = []
    for name, r in result["scorers"].items():
        row = {"scorer": name, "n": r["n"], "accuracy": r["accuracy"], "ties": r["ties"], "failed": r["failed"],
               "duplicates": result["duplicates"], "skipped": result["skipped"],
               "position_consistency": r.get("position_consistency")}  # fmt: skip
        row.update({f"acc[{k}]": v["accuracy"] for k, v in r["by_subset"].items()})
        rows.append(row)
    return pl.DataFrame(rows)
