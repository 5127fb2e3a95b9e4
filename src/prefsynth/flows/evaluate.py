"""Evaluate scorers against human-labelled pairs: how often does each pick the labelled-better reply?

The CDR paper chose its model pair by measuring many pairs this way; `prefsynth eval` does the same for
any scorer of a config (CDR pairs, judges), side by side, into the warehouse and as a report. Model calls
and log-probs go through the same caches as the pipeline, so a rerun makes no new requests.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from prefsynth.backends.local import LocalServers
from prefsynth.flows.progress import StageProgress
from prefsynth.flows.synthesize import check_endpoints, chunks
from prefsynth.schemas.config import PipelineConfig
from prefsynth.schemas.records import StageResult
from prefsynth.tasks.labelled import LabelledPair, accuracy_report, load_labelled
from prefsynth.tasks.score import score_chunk
from prefsynth.tasks.scorers import PointwiseScorer, ScoreItem, build_scorer
from prefsynth.warehouse.ids import content_id, prompt_id, score_id
from prefsynth.warehouse.store import Store, frame


def eval_items(pairs: list[LabelledPair], scorer: PointwiseScorer) -> list[ScoreItem]:
    """Two items per labelled pair: the better reply and the worse one."""
    items = []
    for pair in pairs:
        pid = prompt_id([m.model_dump() for m in pair.prompt])
        for side, text in (("better", pair.better), ("worse", pair.worse)):
            rid = content_id("labelled-response", pair.pair_key, side)
            items.append(ScoreItem(score_id(rid, scorer.scorer_id), rid, pid, pair.prompt, text))
    return items


@flow(name="prefsynth-evaluate")
def evaluate(
    config: PipelineConfig, data: str, fmt: str, limit: int | None = None, db: str | None = None
) -> dict[str, Any]:
    """Score both replies of every labelled pair with each scorer of `config`; report accuracy and ties."""
    logger = get_run_logger()
    pairs = load_labelled(data, fmt, limit)
    logger.info(f"eval: {len(pairs)} labelled pairs from {data}")
    eval_id = uuid.uuid4().hex
    reports: dict[str, Any] = {}
    with LocalServers() as servers:
        for spec in config.scorers:
            for model in spec.models():
                servers.check(model)
        scorers = [build_scorer(s, servers.endpoint) for s in config.scorers]
        check_endpoints([e for s in scorers for e in s.endpoints.values()])
        with Store(db or config.warehouse) as store:
            for scorer in scorers:
                store.register_scorer(scorer.scorer_id, scorer.name, scorer.kind, scorer.config_json)
                values, errors, calls = _score_all(store, eval_id, scorer, eval_items(pairs, scorer), config.chunk_size)
                rows, items = [], []
                for pair in pairs:
                    better, worse = (values.get(content_id("labelled-response", pair.pair_key, s)) for s in
                                     ("better", "worse"))  # fmt: skip
                    error = errors.get(content_id("labelled-response", pair.pair_key, "better")) or errors.get(
                        content_id("labelled-response", pair.pair_key, "worse"))
                    rows.append((pair.subset, better, worse))
                    items.append({"eval_id": eval_id, "scorer_id": scorer.scorer_id, "pair_key": pair.pair_key,
                                  "subset": pair.subset, "source_ref": pair.source_ref, "score_better": better,
                                  "score_worse": worse, "error": error})  # fmt: skip
                report = {"scorer": scorer.name, "scorer_id": scorer.scorer_id, **accuracy_report(rows),
                          "model_calls": calls}  # fmt: skip
                store.write_eval(
                    eval_id,
                    {"scorer_id": scorer.scorer_id, "scorer": scorer.name, "data": str(Path(data)), "format": fmt,
                     "n": report["n"], "accuracy": report["accuracy"], "ties": report["ties"],
                     "failed": report["failed"], "report": json.dumps(report, sort_keys=True)},
                    frame("eval_items", items),
                )  # fmt: skip
                reports[scorer.name] = report
                logger.info(f"eval[{scorer.name}]: accuracy {report['accuracy']:.4f} on {report['n']} pairs, "
                            f"{report['ties']} ties, {report['failed']} failed, {calls} new model calls")  # fmt: skip
    create_table_artifact(
        key="prefsynth-eval",
        table=[{k: r[k] for k in ("scorer", "n", "accuracy", "ties", "failed", "model_calls")}
               for r in reports.values()],  # fmt: skip
        description=f"eval {eval_id} on {data} ({fmt})",
    )
    return {"eval_id": eval_id, "data": data, "format": fmt, "pairs": len(pairs), "scorers": reports}


def _score_all(
    store: Store, eval_id: str, scorer: PointwiseScorer, items: list[ScoreItem], chunk_size: int
) -> tuple[dict[str, float], dict[str, str], int]:
    """{response_id: value}, {response_id: error} and the number of new model calls."""
    logger = get_run_logger()
    progress = StageProgress(f"eval[{scorer.name}]", len(items))
    values: dict[str, float] = {}
    errors: dict[str, str] = {}
    calls = 0
    by_score = {i.score_id: i.response_id for i in items}
    for chunk in chunks(items, chunk_size):
        result = score_chunk(scorer, chunk, store, progress.advance)
        values.update({s.response_id: s.value for s in result.scores})
        errors.update({by_score[f.item_id]: f.error for f in result.failures})
        # scores of labelled replies are kept in eval_items, not in the pipeline's scores table
        written = store.write(eval_id, StageResult(calls=result.calls, failures=result.failures,
                                                   logprobs=result.logprobs, routes=result.routes))  # fmt: skip
        calls += written["model_calls"]
        logger.info(progress.line())
    return values, errors, calls


def summary_frame(result: dict[str, Any]) -> pl.DataFrame:
    """One row per scorer: n, accuracy, ties, failed, then accuracy per subset."""
    rows = []
    for name, r in result["scorers"].items():
        row = {"scorer": name, "n": r["n"], "accuracy": r["accuracy"], "ties": r["ties"], "failed": r["failed"]}
        row.update({f"acc[{k}]": v["accuracy"] for k, v in r["by_subset"].items()})
        rows.append(row)
    return pl.DataFrame(rows)
