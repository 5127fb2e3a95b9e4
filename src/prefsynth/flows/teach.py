"""The teacher's stage of a run, after scoring and before curation: anchors, then refinements.

Per prompt (a bounded number in flight, every call through the run's cached clients): the teacher's own
answer when `anchors` is set (scored by the curation scorer when the `anchor_vs_sampled` rule needs it),
then a refinement of each chosen sampled response (shown the anchor when `reference` is set). Results are
committed by the writer as they finish; the stage returns what curation needs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import polars as pl
from prefect import get_run_logger

from prefsynth.backends.client import ClientPool
from prefsynth.flows.engine import Stage, Writer, run_bounded
from prefsynth.schemas.config import PipelineConfig
from prefsynth.schemas.records import (
    Failure,
    Message,
    ModelCall,
    Refinement,
    Response,
    RunAnchor,
    Score,
    StageCounts,
    StageResult,
    merge_results,
)
from prefsynth.tasks._async import run_async
from prefsynth.tasks.score import score_one
from prefsynth.tasks.scorers import ScoreItem, Scorer
from prefsynth.tasks.scorers.pointwise_judge import PointwiseJudge
from prefsynth.tasks.teacher import RefineItem, Teacher
from prefsynth.warehouse.ids import score_id
from prefsynth.warehouse.store import Store


@dataclass
class Taught:
    """What the teacher stage made for this run (reused or new)."""

    counts: list[StageCounts]
    refinements: list[Refinement] = field(default_factory=list)
    anchor_values: list[dict[str, Any]] = field(default_factory=list)  # prompt_id, response_id, value


def judge_scale(scorer: Scorer | None) -> bool:
    """Whether the curation scorer's values are 1-10 judge scores the teacher can calibrate against."""
    return isinstance(scorer, PointwiseJudge) and (scorer.spec.scale_min, scorer.spec.scale_max) == (1, 10)


def parents(values: pl.DataFrame, refine: str) -> pl.DataFrame:
    """The sampled responses to refine: each prompt's lowest-valued (ties: smaller id), or every one."""
    scored = values.filter(pl.col("value").is_not_null() & pl.col("value").is_not_nan())
    if refine == "every":
        return scored.sort("prompt_id", "response_id")
    if refine == "lowest":
        return scored.sort("value", "response_id").group_by("prompt_id", maintain_order=True).first().sort("prompt_id")
    return scored.clear()


def teach(
    store: Store, writer: Writer, config: PipelineConfig, teacher: Teacher, judge: Scorer | None,
    values: pl.DataFrame, judge_name: str,
) -> Taught:  # fmt: skip
    """Run the teacher over this run's scored responses; `judge` is the curation scorer when it is pointwise."""
    spec = config.teacher
    assert spec is not None
    chosen = parents(values, spec.refine)
    texts = store.responses_by_ids(values["response_id"].unique())
    messages = {p: [Message(**m) for m in json.loads(raw)] for p, raw in zip(texts["prompt_id"], texts["messages"],
                                                                               strict=True)}  # fmt: skip
    text_of = dict(zip(texts["response_id"], texts["text"], strict=True))
    calibrated = judge_scale(judge)
    by_prompt: dict[str, list[RefineItem]] = {p: [] for p in messages}
    for pid, rid, value in chosen.select("prompt_id", "response_id", "value").iter_rows():
        by_prompt[pid].append(RefineItem(pid, messages[pid], rid, text_of[rid], value if calibrated else None,
                                         f"scorer:{judge_name}" if calibrated else "teacher"))  # fmt: skip

    anchors = Stage("anchor[teacher]", len(by_prompt) if spec.anchors else 0, writer)
    refines = Stage("refine[teacher]", len(chosen), writer)
    taught = Taught(counts=[s.counts for s in (anchors, refines) if s.counts.total])
    score_anchors = "anchor_vs_sampled" in config.curation.rules and judge is not None
    endpoints = [teacher.endpoint, *(judge.endpoints.values() if judge else [])]

    def done(stage: Stage, result: StageResult, counted: StageResult | None = None) -> None:
        """Count a result (reused when it made no call and nothing failed) and hand it to the writer."""
        if result.of(ModelCall) or result.of(Failure):
            stage.record(counted or result, result)
        else:
            stage.reuse(1)
            writer.add(result)
        taught.refinements += result.of(Refinement)

    async def prompt(pool: ClientPool, pid: str, items: list[RefineItem]) -> None:
        client = pool.client(teacher.endpoint)
        reference = None
        if spec.anchors:
            result = await teacher.answer(client, pid, messages[pid])
            for anchor in result.of(Response):
                reference = (anchor.response_id, anchor.text)
                result.add(RunAnchor(response_id=anchor.response_id, prompt_id=pid))
                if score_anchors and judge is not None:
                    item = ScoreItem(score_id(anchor.response_id, judge.scorer_id), anchor.response_id, pid,
                                     messages[pid], anchor.text)  # fmt: skip
                    scored = await score_one(judge, pool.clients(judge.endpoints), item)
                    result = merge_results([result, scored])
                    taught.anchor_values += [{"prompt_id": pid, "response_id": s.response_id, "value": s.value}
                                             for s in scored.of(Score)]  # fmt: skip
            done(anchors, result, result.without(Score))
        if spec.reference and reference is None:  # the anchor failed: refine on a later run, with it
            for i in items:
                failure = Failure(stage="refine", item_id=teacher.refined_id(i), scorer_id=teacher.scorer_id,
                                  error="no reference: the teacher's own answer failed", raw=None)
                done(refines, StageResult(failure))
            return
        if not spec.reference:
            reference = None
        results = await asyncio.gather(*(teacher.refine(client, replace(i, reference=reference)) for i in items))
        for result in results:
            done(refines, result)

    async def jobs(pool: ClientPool) -> AsyncIterator[Coroutine[Any, Any, None]]:
        for pid, items in by_prompt.items():
            if items or spec.anchors:
                yield prompt(pool, pid, items)

    async def run() -> None:
        async with ClientPool(endpoints, store) as pool:
            slots = sum({e.base_url: e.concurrency for e in endpoints}.values())
            await run_bounded(jobs(pool), 2 * slots + 2)

    run_async(run())
    for stage in (anchors, refines):
        stage.counts.tally()
        if stage.progress.total:
            get_run_logger().info(stage.progress.line())
    kept = sum(r.kept for r in taught.refinements)
    get_run_logger().info(f"teacher: {len(taught.refinements)} refinements, {kept} kept (min_gap {spec.min_gap})")
    return taught
