"""The synthesis loop (Anyprefer, arXiv 2504.19276): rounds of the pipeline whose prompts are rewritten.

Each round runs the pipeline as a subflow with the round's target system prompt (`generation.system_prompt`)
and judge rubric (the curation judge's `rubric`): the target samples C answers per prompt, the judge scores
them, best_vs_worst pairs them. A check then scores each pair 1-10 for its use in preference training and
accepts those at or above `accept_threshold`. Below `target_rate`, an optimizer rewrites both prompts from the
rejected pairs' rationales, and the next round runs with them, until `max_rounds`.

A prompt version is data (`prompt_versions`, id H(role, text)) and part of the identity of what it made:
the system prompt is in each prompt's messages (so its prompt_id, response ids and call ids), the rubric in
the judge's template and so its scorer_id. Every call goes through the cache: a rerun of a loop makes no
call, and only a new prompt version costs calls.
"""

# No `from __future__ import annotations` here: a deployment's run process validates its parameters against
# the flow's annotations, and a string annotation does not resolve there (issue 13).
import asyncio
import json
import time
import uuid

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prefsynth.backends import budget
from prefsynth.backends.budget import spending
from prefsynth.backends.client import ClientPool
from prefsynth.backends.local import local_servers, sharing
from prefsynth.backends.templates import conversation_text
from prefsynth.errors import RunFailed
from prefsynth.flows.exclusive import warehouse_turn
from prefsynth.flows.runner import task_runner
from prefsynth.flows.synthesize import synthesize
from prefsynth.schemas.config import PipelineConfig
from prefsynth.schemas.records import (
    Failure,
    LoopPair,
    LoopRound,
    LoopSummary,
    ModelCall,
    PromptVersion,
    RoundSummary,
    StageResult,
    merge_results,
)
from prefsynth.tasks._async import run_async
from prefsynth.tasks.loop import DEFAULT_TARGET, LoopJudges, Proposal, RoundPair, stop_reason
from prefsynth.tasks.scorers.judging import Parsed
from prefsynth.warehouse.ids import canonical_json, content_id
from prefsynth.warehouse.store import Store


def version(role: str, text: str, parent: PromptVersion | None, loop_id: str, round_no: int) -> PromptVersion:
    return PromptVersion(version_id=content_id("prompt_version", role, text), role=role, text=text,
                         parent_id=parent.version_id if parent else None, loop_id=loop_id, round=round_no)  # fmt: skip


def round_config(config: PipelineConfig, target: str, rubric: str, round_no: int) -> PipelineConfig:
    """The pipeline of one round: the config with this round's prompts, no loop and no export of its own."""
    scorers = [s.model_copy(update={"rubric": rubric}) if s.name == config.curation_scorer_name else s
               for s in config.scorers]  # fmt: skip
    generation = config.generation.model_copy(update={"system_prompt": target})
    return config.model_copy(update={"name": f"{config.name}:round{round_no}", "generation": generation,
                                     "scorers": scorers, "loop": None, "export": [],
                                     "failures_fatal": False})  # fmt: skip


def round_pairs(store: Store, run_id: str) -> list[RoundPair]:
    """A round's pairs, the prompt shown as its non-system turns (the target's system prompt is not data)."""
    out = []
    for row in store.round_pairs(run_id).iter_rows(named=True):
        turns = [m for m in json.loads(row["prompt_messages"]) if m["role"] != "system"]
        out.append(RoundPair(row["pair_id"], conversation_text(turns), row["chosen_text"], row["rejected_text"],
                             row["score_chosen"], row["score_rejected"], row["why_chosen"],
                             row["why_rejected"]))  # fmt: skip
    return out


@task(name="check-pairs", cache_policy=NO_CACHE)
def check_pairs(store: Store, judges: LoopJudges, round_id: str, pairs: list[RoundPair]) -> StageResult:
    """Prefect task: the pair-quality check of a round's pairs (cached calls)."""

    async def run() -> StageResult:
        async with ClientPool([judges.checker], store) as pool:
            client = pool.client(judges.checker)
            return merge_results(await asyncio.gather(*(judges.check(client, round_id, p) for p in pairs)))

    return run_async(run())


@task(name="optimize-prompts", cache_policy=NO_CACHE)
def optimize(store: Store, judges: LoopJudges, target: str, rubric: str,
             rejected: list[tuple[RoundPair, LoopPair]]) -> Parsed[Proposal]:  # fmt: skip
    """Prefect task: the optimizer's new target system prompt and judge rubric (a cached call)."""

    async def run() -> Parsed[Proposal]:
        async with ClientPool([judges.optimizer], store) as pool:
            return await judges.optimize(pool.client(judges.optimizer), target, rubric, rejected)

    return run_async(run())


@flow(name="prefsynth-loop")
def synthesis_loop(config: PipelineConfig, db: str | None = None) -> LoopSummary:
    """Run `config` as a synthesis loop (its `loop` section) into the warehouse `db`."""
    spec = config.loop
    assert spec is not None, "a loop config has a `loop` section"
    started = time.monotonic()
    logger = get_run_logger()
    warehouse = str(db or config.warehouse)
    judge_spec = {s.name: s for s in config.scorers}[config.curation_scorer_name]
    # the rounds' pipelines use these servers, this warehouse's turn (flows/exclusive.py), one budget and, with
    # runner: ray, one Ray (its workers keep their models from round to round)
    with (warehouse_turn(warehouse), local_servers() as servers, sharing(servers), spending(config.budget),
          task_runner(config)):  # fmt: skip
        checker, optimizer = spec.checker or judge_spec.model, spec.optimizer or judge_spec.model  # type: ignore[attr-defined]
        for model in (checker, optimizer):
            servers.check(model)
        judges = LoopJudges(spec, servers.endpoint(checker), servers.endpoint(optimizer))
        stored = config.model_dump(exclude={"warehouse", "runner", "ray_address"})  # not where it runs
        loop_id = content_id("loop", canonical_json(stored), judges.template)
        summary = LoopSummary(loop_id=loop_id, run_id=uuid.uuid4().hex, name=config.name, warehouse=warehouse)
        target = version("target", config.generation.system_prompt or DEFAULT_TARGET, None, loop_id, 1)
        judge = version("judge", judge_spec.rubric, None, loop_id, 1)  # type: ignore[attr-defined]
        for round_no in range(1, spec.max_rounds + 1):
            try:
                run = synthesize(config=round_config(config, target.text, judge.text, round_no), db=warehouse)
            except RunFailed as err:  # a round with no responses or scores has no pairs: the check says so
                run = err.summary
            if run.status == "budget_exhausted":  # the round is not written: a rerun replays it and goes on
                summary.rounds.append(RoundSummary(round=round_no, target_version=target.version_id,
                                                   judge_version=judge.version_id, pipeline_run_id=run.run_id,
                                                   pairs=run.pairs, accepted=0, acceptance_rate=None,
                                                   model_calls=run.model_calls, stop_reason="budget_exhausted"))
                logger.warning(f"loop round {round_no}: budget reached ({run.budget}); the loop stops here")
                break
            round_id = content_id("loop_round", loop_id, round_no)
            with Store(warehouse, wait_s=config.warehouse_wait_s, notify=logger.warning) as store:
                pairs = round_pairs(store, run.run_id)
                checked = check_pairs(store, judges, round_id, pairs)
                for call in checked.of(ModelCall):
                    call.stage = "loop[check]"
                rows = checked.of(LoopPair)
                accepted = sum(r.accepted for r in rows)
                rate = accepted / len(rows) if rows else None
                reason = stop_reason(spec, round_no, rate)
                result = merge_results([StageResult(target, judge), checked])
                proposal = None
                if reason is None:
                    rejected = [(p, c) for p, c in zip(pairs, rows, strict=True) if not c.accepted]
                    proposal = optimize(store, judges, target.text, judge.text, rejected)
                    result.add(*(o.call.model_copy(update={"stage": "loop[optimize]"})
                                 for o in proposal.outcomes if not o.cached))
                    if proposal.value is None:
                        reason = "optimizer_failed"
                        error = proposal.error or "no proposal"
                        result.add(Failure(stage="optimize", item_id=round_id, scorer_id=None, error=error,
                                           raw=proposal.raw or None))  # fmt: skip
                    elif (new := proposal.value).target_system_prompt == target.text and new.judge_rubric == judge.text:
                        reason = "unchanged"
                if (spent := budget.active()) is not None and spent.stopped:
                    # the budget held back some of this round's checks: its paid calls are kept, the round is
                    # not written (checks are keyed by round and pair), and a rerun redoes it from the cache
                    store.write(summary.run_id, StageResult(*result.of(ModelCall)))
                    reason = "budget_exhausted"
                else:
                    result.add(LoopRound(round_id=round_id, loop_id=loop_id, round=round_no,
                                         target_version=target.version_id, judge_version=judge.version_id,
                                         pipeline_run_id=run.run_id, pairs=len(rows), accepted=accepted,
                                         acceptance_rate=rate, stop_reason=reason))  # fmt: skip
                    store.write(summary.run_id, result)
            calls = run.model_calls + len(result.of(ModelCall))
            summary.rounds.append(RoundSummary(round=round_no, target_version=target.version_id,
                                               judge_version=judge.version_id, pipeline_run_id=run.run_id,
                                               pairs=len(rows), accepted=accepted, acceptance_rate=rate,
                                               model_calls=calls, stop_reason=reason))  # fmt: skip
            shown = "n/a" if rate is None else f"{rate:.2f}"
            logger.info(f"loop round {round_no}: {accepted}/{len(rows)} pairs accepted (rate {shown}), "
                        f"{calls} new calls" + (f"; stop: {reason}" if reason else ""))  # fmt: skip
            if reason is not None:
                break
            assert proposal is not None and proposal.value is not None
            target = next_version(target, proposal.value.target_system_prompt, loop_id, round_no + 1)
            judge = next_version(judge, proposal.value.judge_rubric, loop_id, round_no + 1)
    summary.seconds = time.monotonic() - started
    return summary


def next_version(current: PromptVersion, text: str, loop_id: str, round_no: int) -> PromptVersion:
    """The version the next round uses: the same one when the optimizer left its text as it was."""
    return current if text == current.text else version(current.role, text, current, loop_id, round_no)
