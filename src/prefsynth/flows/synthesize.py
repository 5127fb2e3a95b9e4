"""The pipeline: prompts -> generate -> score -> curate -> export, all into one DuckDB warehouse.

Prompts are read into the warehouse as they come, then stream through generation and scoring (stream.py:
each response is scored the moment it exists, every server busy at once) while the writer commits results
every 256 rows or 2 s, each commit a Prefect task run (engine.py). A teacher, if configured, then refines
scored responses and answers prompts (teach.py). Curation, panels and exports then read the warehouse. The
flow process is the only writer of the warehouse.
"""

# No `from __future__ import annotations` here: a deployment's run process validates its parameters against
# the flow's annotations, and a string annotation does not resolve there (issue 13).
import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from logging import Logger, LoggerAdapter

import polars as pl
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from prefsynth.backends import budget
from prefsynth.backends.hub import hub_token, push
from prefsynth.errors import ExportError, RunFailed
from prefsynth.flows.commit import committer, writer_for
from prefsynth.flows.exclusive import warehouse_turn
from prefsynth.flows.headstart import HeadStart, claim
from prefsynth.flows.opening import Opened, finish, opened, stream
from prefsynth.flows.runner import on
from prefsynth.flows.shards import parse_shard
from prefsynth.flows.teach import Taught, teach
from prefsynth.report.summary import artifact_table, markdown
from prefsynth.schemas.config import ExportTarget, PipelineConfig
from prefsynth.schemas.records import RunSummary, StageCounts, StageResult, columns
from prefsynth.tasks.compare import pairwise_values
from prefsynth.tasks.curate import anchor_vs_sampled, curate, refined_vs_original, threshold
from prefsynth.tasks.diagnostics import diagnostics
from prefsynth.tasks.export import Exported, export
from prefsynth.tasks.panel import agreed_only, panel_id, run_panel
from prefsynth.tasks.review import decisions, human_override
from prefsynth.tasks.scorers import PairwiseScorer, Scorer
from prefsynth.tasks.screen import same_text, screen, screen_responses
from prefsynth.tasks.teacher import Teacher
from prefsynth.warehouse.ids import canonical_json
from prefsynth.warehouse.report import ReportData, report_data
from prefsynth.warehouse.store import Store


@dataclass
class Scored:
    """One scorer's stage in a run: its counts, and the values of this run's responses that it has."""

    counts: StageCounts
    items: int
    values: pl.DataFrame  # prompt_id, response_id, value
    comparisons: pl.DataFrame | None = None  # pairwise scorers


@flow(name="prefsynth-synthesize")
def synthesize(config: PipelineConfig, db: str | None = None, shard: str | None = None) -> RunSummary:
    """Generate, score, curate and export preference pairs as `config` says, into the warehouse `db`.

    `shard` ("i/N", flows/shards.py): only the prompts of shard i of N, generated and scored; the screens,
    teacher, curation and exports, which need every prompt, are left to the run over the whole config."""
    part = parse_shard(shard) if shard is not None else None
    warehouse = db or config.warehouse
    early = claim(config, warehouse, shard)  # the run's head start, streaming since before this flow run
    opening = early.adopted() if early else opened(config, warehouse, part, get_run_logger(), flow_run_id())
    with warehouse_turn(warehouse), opening as run:  # one run per warehouse on a shared server
        store, summary = run.store, run.summary
        try:
            if summary.prompts:  # a shard's range may hold no prompt
                _run(run, early)
        except BaseException as err:
            if early is not None:
                early.stop()  # no row may land after the run's end
            summary.status = "interrupted" if interrupted(err) else "failed"
            summary.seconds = time.monotonic() - run.started
            store.end_run(summary.run_id, summary.status, summary.model_dump())
            run.ended = True
            raise
        summary.seconds = time.monotonic() - run.started
        summary.budget = run.run_budget.spent() if run.run_budget is not None else None
        store.end_run(summary.run_id, summary.status, summary.model_dump())
        run.ended = True
        report = _report(store, summary.run_id)
    _publish(summary, report)
    check_outcome(summary, config)
    return summary


def check_outcome(summary: RunSummary, config: PipelineConfig) -> None:
    """Fail the flow run (its Prefect state, the CLI's exit code) when it produced no responses or scores, or
    when items failed and the config sets `failures_fatal`; the summary is recorded and published first. A
    spent budget is not a failure: the run stops cleanly, and a rerun continues."""
    if summary.status == "budget_exhausted":
        return
    if summary.status != "completed":
        raise RunFailed(f"run {summary.run_id} {summary.status}: it produced no responses or no scores (see "
                        "`prefsynth stats` and the failures table); no export was replaced", summary)  # fmt: skip
    if summary.failures and config.failures_fatal:
        raise RunFailed(f"run {summary.run_id}: {summary.failures} items failed and the config sets failures_fatal",
                        summary)  # fmt: skip


def _run(run: Opened, early: HeadStart | None) -> None:
    logger = get_run_logger()
    store, config, summary, policies, scorers = run.store, run.config, run.summary, run.policies, run.scorers
    run_id, teacher, ray = summary.run_id, run.teacher, run.ray
    if early is not None:
        streaming, writer = early.join(committer(store, run_id)), early.writer
    else:
        writer = writer_for(store, run_id)
        streaming = stream(run, logger, writer)
    logger.info(f"streamed: {writer.commits} commits")
    counts = {s.counts.stage: s.counts for s in streaming.stages}
    generated = _merge("generate", [counts[f"generate[{ep.label}]"] for ep in policies])
    summary.stages.append(generated)
    check_budget(summary)

    gen = config.generation
    responses = store.run_responses(run_id, [ep.identity for ep in policies],  # this run's samples only,
                                    canonical_json(gen.sampling.model_dump()), gen.samples_per_prompt)  # fmt: skip
    scored = {s.name: collect_scores(store, run_id, s, counts[f"score[{s.name}]"], responses) for s in scorers}
    summary.stages += [s.counts for s in scored.values()]
    if responses.is_empty() or any(s.items and s.values.is_empty() for s in scored.values()):
        summary.status = "failed" if summary.status == "completed" else summary.status
        logger.error("this run produced no responses or no scores (see the failures table); no export replaced")
        return
    if run.shard:  # the rest needs every prompt: the run over the whole config does it
        logger.info("shard: generated and scored; screens, curation and exports happen in the run over all shards")
        return
    values = {name: s.values for name, s in scored.items()}
    ids = {s.name: s.scorer_id for s in scorers}
    if config.panel is not None:
        ids[config.panel.name], values[config.panel.name], agreement = panel_stage(store, run_id, config, ids, values)
        if (least := config.curation.min_panel_agreement) is not None:
            values, left_out = agreed_only(values, agreement, least, config.panel.name)
            summary.curation = {**summary.curation, "panel_disagreement": left_out}
            logger.info(f"panel: {left_out} prompts below min_panel_agreement {least:g} left out of curation")
    if summary.status != "budget_exhausted":  # a stopped run's unfinished items would read as scorer failures
        diagnose(store, run_id, scorers, scored, responses)

    name = config.curation_scorer_name
    flags = on(ray, screen, prompts=store.prompt_messages(run_id), spec=config.curation)
    store.write(run_id, StageResult(*flags))
    if flags:  # duplicates and contaminated prompts are left out of the teacher's work and of curation
        left_out = sorted({f.prompt_id for f in flags})
        values = {n: v.filter(~pl.col("prompt_id").is_in(left_out)) for n, v in values.items()}
        kinds = dict(sorted(Counter(f.kind for f in flags).items()))
        logger.info(f"screen: {len(left_out)} prompts left out of curation {kinds} (table prompt_flags)")
    if config.curation.dedup_responses:  # replies that duplicate a reply to another prompt
        texts = store.responses_by_ids(values[name]["response_id"])
        copies = on(ray, screen_responses, texts=texts, spec=config.curation)
        store.write(run_id, StageResult(*copies))
        dropped = [f.response_id for f in copies]
        values = {n: v.filter(~pl.col("response_id").is_in(dropped)) for n, v in values.items()}
        summary.curation = {**summary.curation, "duplicate_responses": len(dropped)}
        logger.info(f"screen: {len(dropped)} replies duplicate a reply to another prompt (table prompt_flags)")
    on_budget = summary.status != "budget_exhausted"  # a spent budget makes no teacher call
    taught = teacher_stage(store, run_id, config, teacher, scorers, values[name]) if teacher and on_budget else None
    if taught is not None:
        summary.stages += taught.counts
        check_budget(summary)
    agree = {ids[n]: values[n] for n in config.curation.require_agreement}
    curated = curation(config, values[name], responses, ids[name], agree, teacher, taught, summary)
    pairs = pl.concat(curated) if curated else pl.DataFrame(schema=columns("pairs"))
    texts = store.responses_by_ids(pl.concat([pairs["chosen_id"], pairs["rejected_id"]]).unique())
    same = same_text(pairs, texts.select("response_id", "text"), config.curation)
    pairs = pairs.filter(~pl.col("pair_id").is_in(same))
    if config.curation.human_override:  # people's verdicts (prefsynth review import) flip or drop pairs
        pairs, by_people = human_override(pairs, decisions(store.human_labels()))
        summary.curation = {**summary.curation, **{k: v for k, v in by_people.items() if v}}
    summary.curation = {**summary.curation, "left_out_prompts": len({f.prompt_id for f in flags}),
                        "same_text": len(same)}  # fmt: skip
    new_pairs = store.write_pairs(run_id, pairs)
    summary.pairs = len(pairs)
    summary.stages.append(StageCounts(stage="curate", total=len(pairs), new=new_pairs, reused=len(pairs) - new_pairs))
    by_source = dict(pairs.group_by("source").len().sort("source").iter_rows())
    logger.info(f"curate: {len(pairs)} pairs {by_source} from {values[name]['prompt_id'].n_unique()} scored prompts")

    if summary.status == "budget_exhausted" and config.export:
        logger.warning(f"budget reached: no export replaced; `prefsynth export --run {run_id}` writes this run's "
                       f"{len(pairs)} pairs, and a rerun continues where it stopped")  # fmt: skip
        return
    for target in config.export:
        _, rows = store.export_rows(run_id, target.format)
        what = "anchors" if target.format == "sft" else "pairs"
        if rows.is_empty():
            logger.warning(f"export: this run made no {what}; {target.path} is left as it was")
            continue
        # the config owns its paths: overwrite
        done = export(rows, target.path, target.format, target.margin, store.card_scorers(rows), run_id,
                      overwrite=True, splits=target.split_spec)  # fmt: skip
        store.record_snapshot(done.snapshot_id, run_id, done.format, str(done.path), target.margin, done.row_ids,
                              done.file_sha256, done.card_sha256, done.counts, done.row_splits,
                              done.splits)  # fmt: skip
        summary.exports.append(str(done.path))
        logger.info(f"export: {done.n_pairs} {what} -> {done.path} (margin: {target.margin})")
        if done.removed:
            logger.warning(f"export: deleted {', '.join(done.removed)} from {target.path}: an earlier export's files "
                           "of this format, which this one replaces")  # fmt: skip
        if target.push_to_hub is not None:  # the token was checked before the run started (api.py)
            push_export(done, target, logger)


def push_export(done: Exported, target: ExportTarget, logger: Logger | LoggerAdapter) -> str | None:
    """Push an export to target.push_to_hub; the commit's URL, or None after logging why it failed and how to
    push again: the run and its export stand."""
    try:
        url, deleted = push(done, target.push_to_hub or "", target.private, hub_token())
    except ExportError as err:
        logger.error(f"{err}. Push it again: prefsynth export --snapshot {done.snapshot_id[:12]} --out "
                     f"{target.path} --overwrite --push-to-hub {target.push_to_hub}")  # fmt: skip
        return None
    gone = f" (deleted {', '.join(deleted)}: an earlier push's files of this format)" if deleted else ""
    logger.info(f"export: pushed to {target.push_to_hub}: {url}{gone}")
    return url


def check_budget(summary: RunSummary) -> None:
    """Mark the run budget_exhausted (once, with a log line) when its budget held work back."""
    spent = budget.active()
    if spent is not None and spent.stopped and summary.status == "completed":
        summary.status = "budget_exhausted"
        get_run_logger().warning(f"budget reached: {spent.spent()}. No new call is sent after it; what finished "
                                 "is kept, and a rerun continues where this run stopped (cached calls are free)")


def teacher_stage(
    store: Store, run_id: str, config: PipelineConfig, teacher: Teacher, scorers: list[Scorer], values: pl.DataFrame
) -> Taught:
    """Anchors and refinements of this run's scored responses, committed as they finish."""
    store.register_scorer(teacher.scorer_id, "teacher", "teacher", teacher.config_json)
    judge = {s.name: s for s in scorers if not isinstance(s, PairwiseScorer)}.get(config.curation_scorer_name)
    writer = writer_for(store, run_id)
    try:
        return teach(store, writer, config, teacher, judge, values, config.curation_scorer_name)
    finally:
        finish(writer)


def curation(
    config: PipelineConfig, values: pl.DataFrame, responses: pl.DataFrame, scorer_id: str,
    agree: dict[str, pl.DataFrame], teacher: Teacher | None, taught: Taught | None, summary: RunSummary,
) -> list[pl.DataFrame]:  # fmt: skip
    """The pairs of each configured rule (a config is validated to have a teacher for the teacher rules)."""
    spec, logger = config.curation, get_run_logger()
    margin = threshold(spec, values, scaled=_scaled(config, config.curation_scorer_name))
    out = []
    if spec.sampled_rule is not None:
        curated = curate(values, responses, scorer_id, spec, margin, agree)
        summary.curation = {**summary.curation, **curated.counts}
        summary.lengths = curated.lengths
        out.append(curated.pairs)
        steps = ", ".join(f"{k} {v}" for k, v in curated.counts.items())
        logger.info(f"curate[{spec.sampled_rule}]: margin >= {margin:g}; {steps}")
        if (why := curated.empty_because()) is not None:
            logger.warning(f"curate: 0 pairs from {curated.counts['prompts_scored']} scored prompts; `{why}` removed "
                           f"the most ({curated.counts[why]}): see curation.min_margin, allow_truncated, "
                           "max_length_ratio, require_agreement")  # fmt: skip
    if teacher is not None and taught is not None and config.teacher is not None:
        if "refined_vs_original" in spec.rules:
            out.append(refined_vs_original(taught.refinements, teacher.scorer_id, config.teacher.min_gap))
        if "anchor_vs_sampled" in spec.rules:
            anchors = pl.DataFrame(taught.anchor_values, schema=values.schema)
            out.append(anchor_vs_sampled(anchors, values, scorer_id, margin))
    return out


def _scaled(config: PipelineConfig, name: str) -> bool:
    """Whether the scorer (or panel) `name` gives values on a fixed scale, such as a judge's 1-10."""
    spec = {s.name: s for s in config.scorers}.get(name)
    return spec is not None and hasattr(spec, "scale_min") and not spec.compares


def interrupted(err: BaseException) -> bool:
    """Ctrl-C or SIGTERM (Prefect's flow engine turns it into TerminationSignal), also when it landed inside a
    DuckDB query (which turns it into an error)."""
    return isinstance(err, KeyboardInterrupt | asyncio.CancelledError | TerminationSignal) or (
        isinstance(err, RuntimeError) and "Query interrupted" in str(err))


def _merge(name: str, parts: list[StageCounts]) -> StageCounts:
    total = StageCounts(stage=name)
    for p in parts:
        for key in ("total", "reused", "new", "failed", "model_calls", "tokens"):
            setattr(total, key, getattr(total, key) + getattr(p, key))
    return total


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
) -> tuple[str, pl.DataFrame, pl.DataFrame]:
    """Aggregate the panel's members and store their agreement; returns the panel's id, values and agreement
    rows (alpha per prompt where scorer_a is '*')."""
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
    return pid, scores.select("prompt_id", "response_id", "value"), agreement


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


def flow_run_id() -> str | None:
    value = flow_run.get_id()
    return str(value) if value else None


def _report(store: Store, run_id: str) -> ReportData | None:
    """The run as `prefsynth report` shows it, for the artifacts; None (with a warning) if it cannot be read."""
    try:
        return report_data(store, run_id)
    except Exception as err:  # noqa: BLE001 - the run is recorded; only its report artifacts are missing
        get_run_logger().warning(f"the report artifacts of run {run_id} are left out: {type(err).__name__}: {err}")
        return None


def _publish(summary: RunSummary, report: ReportData | None = None) -> None:
    rows = [s.model_dump() for s in summary.stages]
    create_table_artifact(
        table=rows,
        key="prefsynth-run-summary",
        description=(
            f"run {summary.run_id}: {summary.pairs} pairs, {summary.model_calls} model calls, "
            f"{summary.failures} failures, {summary.seconds:.1f} s -> {summary.warehouse}"
            + (f"; {summary.status}" if summary.status != "completed" else "")
            + (f"; budget: {summary.budget}" if summary.budget else "")
        ),
    )
    if summary.curation:  # what each curation step removed, as a markdown report next to the table
        lines = ["| curation step | count |", "|---|---|", *(f"| {k} | {v} |" for k, v in summary.curation.items())]
        create_markdown_artifact(key="prefsynth-curation", markdown="\n".join(
            [f"# Curation of run {summary.run_id}", "", f"{summary.pairs} pairs.", "", *lines]),
            description="what each curation step kept and removed")  # fmt: skip
    if report is not None:  # `prefsynth report`'s numbers: per scorer as a table, everything as markdown
        create_table_artifact(table=artifact_table(report), key="prefsynth-report-scorers",
                              description=f"run {summary.run_id}: each scorer's values and length correlation")
        create_markdown_artifact(key="prefsynth-report", markdown=markdown(report),
                                 description=f"run {summary.run_id}: scorers, margins, lengths, judges, panels, "
                                 "curation filters (the HTML page: prefsynth report)")  # fmt: skip
    get_run_logger().info(
        f"done{'' if summary.status == 'completed' else f' ({summary.status})'}: {summary.pairs} pairs, "
        f"{summary.model_calls} new model calls, "
        f"{summary.failures} failures" + (f"; budget: {summary.budget}" if summary.budget else "")
    )
