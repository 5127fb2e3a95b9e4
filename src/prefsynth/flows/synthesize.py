"""The pipeline: prompts -> generate -> score -> curate -> export, all into one DuckDB warehouse.

The run streams (see engine.py): prompts are planned in blocks against the warehouse (what exists is
reused), then each prompt flows through on its own: its samples are requested from every policy, each
response is scored by every pointwise scorer the moment it exists, and the prompt's pairwise comparisons
start as soon as all its responses are in. Requests to one server share its limiter, so the policy and
the judges are busy at the same time; results are committed by the writer every 256 rows or 2 s, each
commit a Prefect task run. Curation, panels and exports then read the warehouse. The flow process is the
only writer of the warehouse.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from prefsynth.backends.client import ClientPool, Endpoint, check_reachable
from prefsynth.backends.local import local_servers
from prefsynth.flows.engine import Stage, Writer, report_progress, run_bounded, writer_for
from prefsynth.schemas.config import PipelineConfig
from prefsynth.schemas.records import Prompt, RunSummary, StageCounts
from prefsynth.tasks._async import run_async
from prefsynth.tasks.compare import pairwise_values, prompt_pairs
from prefsynth.tasks.curate import curate
from prefsynth.tasks.diagnostics import diagnostics
from prefsynth.tasks.export import export
from prefsynth.tasks.generate import GenerationItem, generate_one, plan_generation
from prefsynth.tasks.ingest import no_prompts, read_prompts
from prefsynth.tasks.panel import panel_id, run_panel
from prefsynth.tasks.score import score_one
from prefsynth.tasks.scorers import PairwiseScorer, ScoreItem, Scorer, build_scorer
from prefsynth.warehouse.ids import canonical_json, score_id
from prefsynth.warehouse.store import Store

PROMPTS_PER_BLOCK = 256  # prompts planned against the warehouse in one read


@dataclass
class Scored:
    """One scorer's stage in a run: its counts, and the values of this run's responses that it has."""

    counts: StageCounts
    items: int
    values: pl.DataFrame  # prompt_id, response_id, value
    comparisons: pl.DataFrame | None = None  # pairwise scorers


@flow(name="prefsynth-synthesize")
def synthesize(config: PipelineConfig, db: str | None = None) -> RunSummary:
    """Generate, score, curate and export preference pairs as `config` says, into the warehouse `db`."""
    started = time.monotonic()
    warehouse = db or config.warehouse
    summary = RunSummary(run_id=uuid.uuid4().hex, name=config.name, warehouse=str(warehouse))
    with local_servers() as servers:
        for model in config.all_models():  # a missing GGUF file fails before anything starts
            servers.check(model)
        policies = [servers.endpoint(m) for m in config.generation.models]
        scorers = [build_scorer(s, servers.endpoint) for s in config.scorers]
        check_endpoints([*policies, *(e for s in scorers for e in s.endpoints.values())])

        with Store(warehouse) as store:
            ingest(store, config, summary)
            store.begin_run(summary.run_id, config.name, canonical_json(config.model_dump()), _flow_run_id())
            try:
                _run(store, config, policies, scorers, summary)
            except BaseException as err:
                stopped = isinstance(err, KeyboardInterrupt | asyncio.CancelledError)
                summary.status = "interrupted" if stopped else "failed"
                summary.seconds = time.monotonic() - started
                store.end_run(summary.run_id, summary.status, summary.model_dump())
                raise
            summary.seconds = time.monotonic() - started
            store.end_run(summary.run_id, summary.status, summary.model_dump())
    _publish(summary)
    return summary


def ingest(store: Store, config: PipelineConfig, summary: RunSummary) -> None:
    """Read the prompts into the warehouse as they come (one transaction: bad input leaves nothing)."""
    source = config.prompts
    rows = store.prompts_from_table(source.warehouse_table).to_dicts() if source.warehouse_table else None
    prompts = read_prompts(source, config.generation.system_prompt, rows)
    read, new, linked = store.ingest_prompts(summary.run_id, prompts)
    if not linked:
        raise no_prompts(source)
    summary.prompts = linked
    summary.prompts_read, summary.duplicates_dropped = read, read - linked
    summary.stages.append(StageCounts(stage="ingest", total=linked, new=new, reused=linked - new))
    get_run_logger().info(f"ingest: {linked} prompts ({read - linked} duplicates dropped)")


def _run(
    store: Store, config: PipelineConfig, policies: list[Endpoint], scorers: list[Scorer], summary: RunSummary
) -> None:
    logger = get_run_logger()
    run_id = summary.run_id
    for scorer in scorers:
        store.register_scorer(scorer.scorer_id, scorer.name, scorer.kind, scorer.config_json)

    writer = writer_for(store, run_id)
    streaming = Streaming(store, config, policies, scorers, writer)
    try:
        run_async(streaming.run(store.run_prompts(run_id, PROMPTS_PER_BLOCK), summary.prompts))
    finally:
        writer.close()  # whatever finished is committed, also on Ctrl-C
    logger.info(f"streamed: {writer.commits} commits")
    counts = {s.counts.stage: s.counts for s in streaming.stages}
    generated = _merge("generate", [counts[f"generate[{ep.label}]"] for ep in policies])
    summary.stages.append(generated)

    gen = config.generation
    responses = store.run_responses(run_id, [ep.identity for ep in policies],  # this run's samples only,
                                    canonical_json(gen.sampling.model_dump()), gen.samples_per_prompt)  # fmt: skip
    scored = {s.name: collect_scores(store, run_id, s, counts[f"score[{s.name}]"], responses) for s in scorers}
    summary.stages += [s.counts for s in scored.values()]
    if responses.is_empty() or any(s.items and s.values.is_empty() for s in scored.values()):
        summary.status = "failed"
        logger.error("this run produced no responses or no scores (see the failures table); no export replaced")
        return
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
        if rows.is_empty():
            logger.warning(f"export: this run made no pairs; {target.path} is left as it was")
            continue
        done = export(rows, target.path, target.format, overwrite=True)  # the config owns its paths
        store.record_snapshot(done.snapshot_id, run_id, done.format, str(done.path), done.n_pairs)
        summary.exports.append(str(done.path))
        logger.info(f"export: {done.n_pairs} pairs -> {done.path}")


def _merge(name: str, parts: list[StageCounts]) -> StageCounts:
    total = StageCounts(stage=name)
    for p in parts:
        for key in ("total", "reused", "new", "failed", "model_calls", "tokens"):
            setattr(total, key, getattr(total, key) + getattr(p, key))
    return total


@dataclass
class PromptWork:
    """One prompt's planned work and what the warehouse already has of it."""

    prompt: Prompt
    todo: list[tuple[Endpoint, GenerationItem]]  # samples still to generate
    responses: dict[str, str]  # response_id -> text, of this run's samples that exist
    done: set[str] = field(default_factory=set)  # score and comparison ids already in the warehouse


class Streaming:
    """The streaming part of a run: every prompt through generation and scoring, bounded in flight."""

    def __init__(
        self, store: Store, config: PipelineConfig, policies: list[Endpoint], scorers: list[Scorer], writer: Writer
    ) -> None:
        self.store, self.config, self.policies, self.scorers, self.writer = store, config, policies, scorers, writer
        self.pointwise = [s for s in scorers if not isinstance(s, PairwiseScorer)]
        self.pairwise = [s for s in scorers if isinstance(s, PairwiseScorer)]
        self.stages: list[Stage] = []
        self._stage: dict[str, Stage] = {}
        endpoints = [*policies, *(e for s in scorers for e in s.endpoints.values())]
        self.pool = ClientPool(endpoints, store)
        slots = sum({e.base_url: e.concurrency for e in endpoints}.values())
        self.window = 2 * slots + 2  # prompts in flight: enough to keep every slot busy between stages

    def _add_stage(self, name: str, total: int) -> Stage:
        self._stage[name] = Stage(name, total, self.writer)
        self.stages.append(self._stage[name])
        return self._stage[name]

    async def run(self, blocks: Iterator[list[Prompt]], prompts: int) -> None:
        """Stream every prompt of `blocks` (`prompts` in all, for progress totals) through the run."""
        n = prompts * self.config.generation.samples_per_prompt
        for ep in self.policies:
            self._add_stage(f"generate[{ep.label}]", n)
        k = self.config.generation.samples_per_prompt * len(self.policies)
        for s in self.scorers:
            self._add_stage(f"score[{s.name}]", prompts * (k * (k - 1) // 2 if s in self.pairwise else k))
        reporter = asyncio.create_task(report_progress(self.stages, get_run_logger().info))
        try:
            async with self.pool:
                await run_bounded(self._jobs(blocks), self.window)
        finally:
            reporter.cancel()
        for stage in self.stages:
            stage.counts.total = stage.counts.reused + stage.counts.new + stage.counts.failed
            get_run_logger().info(stage.progress.line())

    async def _jobs(self, blocks: Iterator[list[Prompt]]) -> AsyncIterator[Coroutine[Any, Any, None]]:
        """One job per prompt; the next block is read and planned (in a thread) while this one's jobs start."""

        def plan_next() -> tuple[list[PromptWork], dict[str, int]] | None:
            block = next(blocks, None)
            return None if block is None else self._plan(block)

        upcoming = asyncio.create_task(asyncio.to_thread(plan_next))
        while (planned := await upcoming) is not None:
            works, reused = planned
            upcoming = asyncio.create_task(asyncio.to_thread(plan_next))
            for name, n in reused.items():
                self._stage[name].reuse(n)
            for work in works:
                while self.writer.pending > 64 * self.writer.max_rows:  # the writer is behind: wait for it
                    await asyncio.sleep(0.05)
                yield self._prompt(work)

    def _plan(self, block: Sequence[Prompt]) -> tuple[list[PromptWork], dict[str, int]]:
        """What each prompt of the block still needs, from a few warehouse reads (runs in a thread), and how
        many items of each stage exist already."""
        gen = self.config.generation
        items = [(ep, i) for ep in self.policies
                 for i in plan_generation(block, ep, gen.sampling, gen.samples_per_prompt)]  # fmt: skip
        rids = [i.response_id for _, i in items]
        have = self.store.responses_by_ids(rids)
        texts = dict(zip(have["response_id"], have["text"], strict=True))
        by_prompt: dict[str, list[str]] = {}
        for _, i in items:
            by_prompt.setdefault(i.prompt.prompt_id, []).append(i.response_id)
        done = self.store.existing_ids("scores", [score_id(r, s.scorer_id) for s in self.pointwise for r in rids])
        pair_ids = [c.comparison_id for s in self.pairwise for r in by_prompt.values()
                    for c in prompt_pairs(s.scorer_id, "", [], [(x, "") for x in r])]  # fmt: skip
        done |= self.store.existing_ids("comparisons", pair_ids)
        reused = {f"generate[{ep.label}]": sum(i.response_id in texts for e, i in items if e is ep)
                  for ep in self.policies}  # fmt: skip
        reused |= {f"score[{s.name}]": sum(score_id(r, s.scorer_id) in done for r in rids) for s in self.pointwise}
        works = {p.prompt_id: PromptWork(p, [], {}, done) for p in block}
        for ep, i in items:
            work = works[i.prompt.prompt_id]
            if i.response_id in texts:
                work.responses[i.response_id] = texts[i.response_id]
            else:
                work.todo.append((ep, i))
        return list(works.values()), reused

    async def _prompt(self, work: PromptWork) -> None:
        """One prompt: its samples, each scored as it arrives, then its pairwise comparisons."""
        gen = self.config.generation

        async def sample(ep: Endpoint, item: GenerationItem) -> None:
            result = await generate_one(self.pool.client(ep), item, gen.sampling)
            self._stage[f"generate[{ep.label}]"].record(result)
            for r in result.responses:
                work.responses[r.response_id] = r.text
                await score_response(r.response_id, r.text)

        async def score_response(rid: str, text: str) -> None:
            items = [(s, ScoreItem(score_id(rid, s.scorer_id), rid, work.prompt.prompt_id, work.prompt.messages, text))
                     for s in self.pointwise]  # fmt: skip
            await asyncio.gather(*(self._score(s, i) for s, i in items if i.score_id not in work.done))

        await asyncio.gather(*(sample(ep, i) for ep, i in work.todo),
                             *(score_response(r, t) for r, t in list(work.responses.items())))  # fmt: skip
        pairs = [(s, i) for s in self.pairwise
                 for i in prompt_pairs(s.scorer_id, work.prompt.prompt_id, work.prompt.messages,
                                       list(work.responses.items()))]  # fmt: skip
        for s in self.pairwise:
            self._stage[f"score[{s.name}]"].reuse(sum(i.comparison_id in work.done for t, i in pairs if t is s))
        await asyncio.gather(*(self._score(s, i) for s, i in pairs if i.comparison_id not in work.done))

    async def _score(self, scorer: Scorer, item: Any) -> None:
        result = await score_one(scorer, self.pool.clients(scorer.endpoints), item)
        self._stage[f"score[{scorer.name}]"].record(result)


def collect_scores(store: Store, run_id: str, scorer: Scorer, counts: StageCounts, responses: pl.DataFrame) -> Scored:
    """A scorer's values for this run's responses, from the warehouse; pairwise values from the comparisons."""
    if isinstance(scorer, PairwiseScorer):
        comparisons = store.comparisons_among(responses["response_id"], scorer.scorer_id)
        scores = pairwise_values(responses, comparisons, scorer.scorer_id, scorer.name)
        store.write_frames(run_id, {"scores": scores.drop("prompt_id")})
        k = responses.group_by("prompt_id").len()["len"]
        return Scored(counts, int((k * (k - 1) // 2).sum()), scores.select("prompt_id", "response_id", "value"),
                      comparisons)  # fmt: skip
    return Scored(counts, len(responses), store.scores_of(responses["response_id"], scorer.scorer_id))


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
    lengths = responses.select("response_id", "tokens")
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
