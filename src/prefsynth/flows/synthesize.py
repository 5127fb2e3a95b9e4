"""The pipeline: prompts -> generate -> score -> curate -> export, all into one DuckDB warehouse.

The flow holds no logic beyond wiring, progress and the summary: tasks compute, the store writes. It is
the only writer of the warehouse; every chunk's records are committed as soon as its task returns.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from prefsynth.backends.client import Endpoint, check_reachable
from prefsynth.backends.local import LocalServers
from prefsynth.flows.progress import StageProgress
from prefsynth.schemas.config import PipelineConfig
from prefsynth.schemas.records import Prompt, RunSummary, StageCounts, StageResult
from prefsynth.tasks._async import run_async
from prefsynth.tasks.compare import comparison_scores, plan_comparisons
from prefsynth.tasks.curate import curate
from prefsynth.tasks.diagnostics import diagnostics
from prefsynth.tasks.export import export
from prefsynth.tasks.generate import generate_chunk, plan_generation
from prefsynth.tasks.ingest import ingest
from prefsynth.tasks.panel import panel_id, run_panel
from prefsynth.tasks.score import plan_scores, score_chunk
from prefsynth.tasks.scorers import PairwiseScorer, Scorer, build_scorer
from prefsynth.warehouse.ids import canonical_json
from prefsynth.warehouse.store import Store

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def run_stage(
    name: str,
    todo: Sequence[T],
    total: int,
    chunk_size: int,
    work: Callable[[list[T], Callable[[int], None]], StageResult],
    store: Store,
    run_id: str,
) -> StageCounts:
    """Run `work` chunk by chunk, committing each chunk's records before the next starts."""
    logger = get_run_logger()
    counts = StageCounts(stage=name, total=total, reused=total - len(todo))
    progress = StageProgress(name, len(todo))
    if counts.reused:
        logger.info(f"{name}: {counts.reused} of {total} already in the warehouse")
    for chunk in chunks(todo, chunk_size):
        result = work(chunk, progress.advance)
        written = store.write(run_id, result)
        counts.new += written["responses"] + written["scores"] + written["comparisons"]
        counts.failed += len(result.failures)
        counts.model_calls += written["model_calls"]
        counts.tokens += sum((c.prompt_tokens or 0) + (c.completion_tokens or 0) for c in result.calls)
        logger.info(progress.line() + (f", {counts.failed} failed" if counts.failed else ""))
    return counts


def _merge(name: str, parts: list[StageCounts]) -> StageCounts:
    total = StageCounts(stage=name)
    for p in parts:
        total.total += p.total
        total.reused += p.reused
        total.new += p.new
        total.failed += p.failed
        total.model_calls += p.model_calls
        total.tokens += p.tokens
    return total


def generate_stage(
    store: Store, run_id: str, config: PipelineConfig, prompts: list[Prompt], policies: list[Endpoint]
) -> tuple[StageCounts, list[str]]:
    """Generate what is missing; returns the counts and the ids of every response this run planned."""
    gen = config.generation
    parts = []
    planned: list[str] = []
    for ep in policies:
        plan = plan_generation(prompts, ep, gen.sampling, gen.samples_per_prompt)
        planned += [i.response_id for i in plan]
        have = store.existing_ids("responses", [i.response_id for i in plan])
        todo = [i for i in plan if i.response_id not in have]
        parts.append(
            run_stage(
                f"generate[{ep.label}]", todo, len(plan), config.chunk_size,
                lambda chunk, done, ep=ep: generate_chunk(ep, chunk, gen.sampling, store, done),
                store, run_id,
            )
        )  # fmt: skip
    return _merge("generate", parts), planned


@dataclass
class Scored:
    """One scorer's stage in a run: its counts, and the values of this run's responses that it has."""

    counts: StageCounts
    items: int
    values: pl.DataFrame  # prompt_id, response_id, value
    comparisons: pl.DataFrame | None = None  # pairwise scorers


def score_stage(
    store: Store, run_id: str, config: PipelineConfig, scorer: Scorer, responses: pl.DataFrame
) -> Scored:
    store.register_scorer(scorer.scorer_id, scorer.name, scorer.kind, scorer.config_json)
    stage = f"score[{scorer.name}]"

    def work(chunk: list[Any], done: Callable[[int], None]) -> StageResult:
        return score_chunk(scorer, chunk, store, done)

    if isinstance(scorer, PairwiseScorer):
        pairs = plan_comparisons(responses, scorer.scorer_id)
        have = store.existing_ids("comparisons", [i.comparison_id for i in pairs])
        todo = [i for i in pairs if i.comparison_id not in have]
        counts = run_stage(stage, todo, len(pairs), config.chunk_size, work, store, run_id)
        comparisons = store.comparisons_by_ids([i.comparison_id for i in pairs])
        scores = comparison_scores(pairs, comparisons, scorer.scorer_id, scorer.name)
        store.write(run_id, StageResult(scores=scores))
        return Scored(counts, len(pairs), store.scores_by_ids([s.score_id for s in scores]), comparisons)
    items = plan_scores(responses, scorer.scorer_id)
    have = store.existing_ids("scores", [i.score_id for i in items])
    todo = [i for i in items if i.score_id not in have]
    counts = run_stage(stage, todo, len(items), config.chunk_size, work, store, run_id)
    return Scored(counts, len(items), store.scores_by_ids([i.score_id for i in items]))


@flow(name="prefsynth-synthesize")
def synthesize(config: PipelineConfig, db: str | None = None) -> RunSummary:
    """Generate, score, curate and export preference pairs as `config` says, into the warehouse `db`."""
    logger = get_run_logger()
    started = time.monotonic()
    warehouse = Path(db or config.warehouse)
    summary = RunSummary(run_id=uuid.uuid4().hex, name=config.name, warehouse=str(warehouse))
    with LocalServers() as servers:
        for model in config.all_models():  # a missing GGUF file fails before anything starts
            servers.check(model)
        table_rows = None
        if config.prompts.warehouse_table:
            with Store(warehouse) as reader:
                table_rows = reader.prompts_from_table(config.prompts.warehouse_table).to_dicts()
        ingested = ingest(config.prompts, config.generation.system_prompt, table_rows)
        summary.prompts_read, summary.duplicates_dropped = ingested.read, ingested.duplicates
        logger.info(f"ingest: {len(ingested.prompts)} prompts ({ingested.duplicates} duplicates dropped)")

        policies = [servers.endpoint(m) for m in config.generation.models]
        scorers = [build_scorer(s, servers.endpoint) for s in config.scorers]
        check_endpoints([*policies, *(e for s in scorers for e in s.endpoints.values())])

        with Store(warehouse) as store:
            store.begin_run(summary.run_id, config.name, canonical_json(config.model_dump()), _flow_run_id())
            try:
                _run(store, config, ingested.prompts, policies, scorers, summary)
            except BaseException as err:
                summary.status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                summary.seconds = time.monotonic() - started
                store.end_run(summary.run_id, summary.status, summary.model_dump())
                raise
            summary.seconds = time.monotonic() - started
            store.end_run(summary.run_id, summary.status, summary.model_dump())
    _publish(summary)
    return summary


def _run(
    store: Store, config: PipelineConfig, prompts: list[Prompt], policies: list[Endpoint],
    scorers: list[Scorer], summary: RunSummary,
) -> None:  # fmt: skip
    logger = get_run_logger()
    run_id = summary.run_id
    new_prompts = store.write_prompts(run_id, prompts)
    summary.stages.append(StageCounts(stage="ingest", total=len(prompts), new=new_prompts,
                                      reused=len(prompts) - new_prompts))  # fmt: skip
    generated, planned = generate_stage(store, run_id, config, prompts, policies)
    summary.stages.append(generated)
    responses = store.responses_by_ids(planned)  # this run's samples only, not earlier runs' other settings
    scored: dict[str, Scored] = {}
    for scorer in scorers:
        scored[scorer.name] = score_stage(store, run_id, config, scorer, responses)
        summary.stages.append(scored[scorer.name].counts)
    values = {name: s.values for name, s in scored.items()}
    ids = {s.name: s.scorer_id for s in scorers}
    if config.panel is not None:
        ids[config.panel.name], values[config.panel.name] = panel_stage(store, run_id, config, ids, values)
    diagnose(store, run_id, scorers, scored, responses)

    name = config.curation_scorer_name
    agree = {ids[n]: values[n] for n in config.curation.require_agreement}
    pairs = curate(values[name], ids[name], config.curation, agree)
    new_pairs = store.write_pairs(run_id, pairs)
    summary.pairs = len(pairs)
    summary.stages.append(StageCounts(stage="curate", total=len(pairs), new=new_pairs, reused=len(pairs) - new_pairs))
    logger.info(f"curate: {len(pairs)} pairs from {values[name]['prompt_id'].n_unique()} scored prompts")

    for target in config.export:
        _, rows = store.export_rows(run_id)
        done = export(rows, target.path, target.format)
        store.record_snapshot(done.snapshot_id, run_id, done.format, str(done.path), done.n_pairs)
        summary.exports.append(str(done.path))
        logger.info(f"export: {done.n_pairs} pairs -> {done.path}")


def panel_stage(
    store: Store, run_id: str, config: PipelineConfig, ids: dict[str, str], values: dict[str, pl.DataFrame]
) -> tuple[str, pl.DataFrame]:
    """Aggregate the panel's members and store their agreement; returns the panel's id and values."""
    assert config.panel is not None
    members = config.panel_members
    pid = panel_id([ids[m] for m in members], config.panel.aggregate)
    store.register_scorer(pid, config.panel.name, "panel",
                          canonical_json({"members": sorted(ids[m] for m in members),
                                          "aggregate": config.panel.aggregate}))  # fmt: skip
    scores, agreement, summary = run_panel({m: values[m] for m in members}, pid, config.panel.aggregate)
    store.write_panel(run_id, {**summary, "name": config.panel.name, "aggregate": config.panel.aggregate},
                      scores, agreement)  # fmt: skip
    alpha, tau = summary["alpha"], summary["mean_tau"]
    get_run_logger().info(
        f"panel[{config.panel.name}]: {summary['prompts']} prompts scored by all of {', '.join(members)}; "
        f"Krippendorff alpha {'n/a' if alpha is None else f'{alpha:.3f}'}, "
        f"mean Kendall tau {'n/a' if tau is None else f'{tau:.3f}'}"
    )
    return pid, scores.select("prompt_id", "response_id", "value")


def diagnose(
    store: Store, run_id: str, scorers: list[Scorer], scored: dict[str, Scored], responses: pl.DataFrame
) -> None:
    """Store (and log) each scorer's failure rate, length bias and position bias for this run."""
    lengths = store.response_lengths(responses["response_id"].to_list())
    rows = []
    for scorer in scorers:
        s = scored[scorer.name]
        comps = s.comparisons
        verdicts = store.verdicts_by_comparison(comps["comparison_id"].to_list()) if comps is not None else None
        results = len(comps) if comps is not None else len(s.values)
        rows.append(diagnostics(scorer.scorer_id, scorer.name, s.items, results, s.values, lengths, comps, verdicts))
        get_run_logger().info(f"diagnostics[{scorer.name}]: " + ", ".join(
            f"{k} {v}" for k, v in rows[-1].items() if k not in ("scorer_id", "scorer") and v is not None))
    store.write_diagnostics(run_id, rows)


def check_endpoints(endpoints: list[Endpoint]) -> None:
    """Fail fast, before anything is written, when an endpoint does not answer."""
    for ep in {e.base_url: e for e in endpoints if not e.is_local}.values():
        run_async(check_reachable(ep))


def _flow_run_id() -> str | None:
    value = flow_run.get_id()
    return str(value) if value else None


def _publish(summary: RunSummary) -> None:
    rows = [s.model_dump() for s in summary.stages]
    create_table_artifact(
        table=rows,
        key="prefsynth-run-summary",
        description=(
            f"run {summary.run_id}: {summary.pairs} pairs, {summary.model_calls} model calls, "
            f"{summary.failures} failures, {summary.seconds:.1f} s -> {summary.warehouse}"
        ),
    )
    get_run_logger().info(
        f"done: {summary.pairs} pairs, {summary.model_calls} new model calls, {summary.failures} failures"
    )
