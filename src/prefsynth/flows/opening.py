"""Opening a run and streaming it: what the pipeline flow does first, also before its flow run exists (a run's
head start, headstart.py). Nothing here imports Prefect: a run starts streaming while Prefect is imported.

A run is opened by checking its models and endpoints, opening the warehouse, reading the prompts into it
(one transaction: bad input leaves nothing) and recording the run. Its stream then takes every prompt
through generation and scoring (stream.py) while the writer commits results in batches (engine.py).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefsynth.backends.budget import Budget, spending
from prefsynth.backends.client import Endpoint, check_reachable
from prefsynth.backends.local import local_servers
from prefsynth.flows.engine import Writer
from prefsynth.flows.stream import Log, Streaming
from prefsynth.schemas.config import PipelineConfig
from prefsynth.schemas.records import Prompt, RunSummary, StageCounts
from prefsynth.tasks._async import run_async
from prefsynth.tasks.ingest import no_prompts, read_prompts
from prefsynth.tasks.scorers import Scorer, build_scorer
from prefsynth.tasks.teacher import Teacher
from prefsynth.warehouse.ids import canonical_json
from prefsynth.warehouse.store import Store

if TYPE_CHECKING:
    from prefsynth.flows.runner import RayRunner

PROMPTS_PER_BLOCK = 256  # prompts planned against the warehouse in one read


@dataclass
class Opened:
    """A run ready to stream: its endpoints checked, its warehouse open, its prompts read, its row begun."""

    config: PipelineConfig
    summary: RunSummary
    started: float  # time.monotonic() at its start
    store: Store
    policies: list[Endpoint]
    scorers: list[Scorer]
    teacher: Teacher | None
    ray: RayRunner | None  # with `runner: ray`
    run_budget: Budget | None
    shard: bool
    ended: bool = False  # its end is recorded (run_ends)
    streaming: Streaming | None = None  # its stream, once started


@contextlib.contextmanager
def opened(config: PipelineConfig, warehouse: str, part: tuple[int, int] | None, log: Log,
           flow_run: str | None) -> Iterator[Opened]:  # fmt: skip
    """Open a run of `flow_run` (the flow does, or the run's head start before its flow run exists)."""
    started = time.monotonic()
    summary = RunSummary(run_id=uuid.uuid4().hex, name=config.name, warehouse=str(warehouse))
    # `runner: ray` starts (or joins) Ray before anything is written
    with local_servers() as servers, _ray(config) as ray:
        for model in config.all_models():  # a missing GGUF file fails before anything starts
            servers.check(model)
        policies = [servers.endpoint(m) for m in config.generation.models]
        scorers = [build_scorer(s, servers.endpoint) for s in config.scorers]
        if ray is not None:
            from prefsynth.flows.runner import offload

            offload(scorers, ray)  # in-process reward models compute on Ray workers
        teacher = Teacher(config.teacher, servers.endpoint(config.teacher.model)) if config.teacher else None
        check_endpoints([*policies, *(e for s in scorers for e in s.endpoints.values()),
                         *([teacher.endpoint] if teacher else [])])  # fmt: skip
        with (Store(warehouse, wait_s=config.warehouse_wait_s, notify=log.warning) as store,
              spending(config.budget) as run_budget):
            announce_revisions(store, config, log)
            ingest(store, config, summary, part, log)
            for scorer in scorers:
                store.register_scorer(scorer.scorer_id, scorer.name, scorer.kind, scorer.config_json)
            store.begin_run(summary.run_id, config.name, canonical_json(config.model_dump()), flow_run)
            yield Opened(config, summary, started, store, policies, scorers, teacher, ray, run_budget,
                         part is not None)  # fmt: skip


def announce_revisions(store: Store, config: PipelineConfig, log: Log) -> None:
    """Warn when an endpoint model was called before under another revision: its old answers are not reused."""
    for spec in {m.identity: m for m in config.all_models() if m.revision}.values():
        url_identity = spec.model_copy(update={"revision": None}).identity
        for old in store.other_revisions(spec.identity, url_identity, str(spec.model)):
            was = old.split("@", 1)[1] if "@" in old else "none (known by its URL)"
            log.warning(f"model {spec.model}: revision {spec.revision} is new here (was {was}); "
                        "its cached answers are not reused, it is called again")


def ingest(store: Store, config: PipelineConfig, summary: RunSummary, shard: tuple[int, int] | None,
           log: Log) -> None:  # fmt: skip
    """Read the prompts into the warehouse as they come (one transaction: bad input leaves nothing); a shard's
    run reads every prompt (bad input fails every shard alike) and keeps its own."""
    source = config.prompts
    rows = store.prompts_from_table(source.warehouse_table).to_dicts() if source.warehouse_table else None
    prompts = read_prompts(source, config.generation.system_prompt, rows)
    if shard is not None:
        from prefsynth.flows.shards import shard_of

        index, count = shard
        seen = [0]

        def counted(items: Iterator[Prompt]) -> Iterator[Prompt]:
            for p in items:
                seen[0] += 1
                yield p

        prompts = (p for p in counted(prompts) if shard_of(p.prompt_id, count) == index)
    read, new, linked = store.ingest_prompts(summary.run_id, prompts)
    if shard is not None:
        if not seen[0]:
            raise no_prompts(source)
        log.info(f"shard {shard[0]}/{shard[1]}: {linked} of the source's prompts are in its range")
    elif not linked:
        raise no_prompts(source)
    summary.prompts = linked
    summary.prompts_read, summary.duplicates_dropped = read, read - linked
    summary.stages.append(StageCounts(stage="ingest", total=linked, new=new, reused=linked - new))
    log.info(f"ingest: {linked} prompts ({read - linked} duplicates dropped)")


def stream(run: Opened, log: Log, writer: Writer,
           runner: Callable[[Coroutine[Any, Any, None]], Any] = run_async) -> Streaming:  # fmt: skip
    """Stream every prompt of the run through generation and scoring; the writer is closed after."""
    blocks = None
    try:
        blocks = run.store.run_prompts(run.summary.run_id, PROMPTS_PER_BLOCK)
        streaming = run.streaming = Streaming(run.store, run.config, run.policies, run.scorers, writer, log)
        runner(streaming.run(blocks, run.summary.prompts))
    finally:
        if blocks is not None:
            blocks.close()  # deletes the prompts' temporary file
        finish(writer)  # whatever finished is committed, also on Ctrl-C
    return streaming


def finish(writer: Writer) -> None:
    """Close the writer even through further Ctrl-Cs: its last batch is committed."""
    patiently(writer.close)


def patiently(wait: Callable[[], None], patience_s: float = 30.0) -> None:
    """`wait()` to the end, through further Ctrl-Cs for up to `patience_s` (what is stopping gets to finish)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            wait()
            return
        except KeyboardInterrupt:
            if time.monotonic() > deadline:
                raise


def check_endpoints(endpoints: list[Endpoint]) -> None:
    """Fail fast, before anything is written, when an endpoint does not answer."""
    for ep in {e.base_url: e for e in endpoints if not e.is_local}.values():
        run_async(check_reachable(ep))


@contextlib.contextmanager
def _ray(config: PipelineConfig) -> Iterator[RayRunner | None]:
    """Ray for `runner: ray` (started or joined before anything is written), else None."""
    if config.runner != "ray":
        yield None
        return
    from prefsynth.flows.runner import task_runner

    with task_runner(config) as ray:
        yield ray
