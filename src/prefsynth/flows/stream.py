"""The streaming part of a run: every prompt through generation and scoring, a bounded number in flight.

Prompts are planned in blocks against the warehouse (what exists is reused), then each prompt flows on
its own: its samples are requested from every policy, each response is scored by every pointwise scorer
the moment it exists, and the prompt's pairwise comparisons start once all its responses are in. All
requests to one server share its limiter (`ClientPool`), so every endpoint stays busy; results go to the
writer, which commits them in batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Protocol

from prefsynth.backends.client import ClientPool, Endpoint
from prefsynth.flows.engine import Stage, Writer, report_progress, run_bounded
from prefsynth.schemas.config import PipelineConfig
from prefsynth.schemas.records import Prompt, Response
from prefsynth.tasks.compare import comparison_id, prompt_pairs
from prefsynth.tasks.generate import GenerationItem, generate_one, plan_generation
from prefsynth.tasks.score import score_one
from prefsynth.tasks.scorers import PairwiseScorer, ScoreItem, Scorer
from prefsynth.warehouse.ids import score_id
from prefsynth.warehouse.store import Store


@dataclass
class PromptWork:
    """One prompt's planned work and what the warehouse already has of it."""

    prompt: Prompt
    todo: list[tuple[Endpoint, GenerationItem]]  # samples still to generate
    responses: dict[str, str]  # response_id -> text, of this run's samples that exist
    done: set[str] = field(default_factory=set)  # score and comparison ids already in the warehouse


class Log(Protocol):
    """Where a run's lines go: the flow run's logger, or the lines held until it exists (headstart.py)."""

    def info(self, msg: str) -> None: ...
    def warning(self, msg: str) -> None: ...


class Streaming:
    """The streaming part of a run: every prompt through generation and scoring, bounded in flight."""

    def __init__(self, store: Store, config: PipelineConfig, policies: list[Endpoint], scorers: list[Scorer],
                 writer: Writer, log: Log) -> None:  # fmt: skip
        self.store, self.config, self.policies, self.scorers, self.writer = store, config, policies, scorers, writer
        self.log = log
        self.pointwise = [s for s in scorers if not isinstance(s, PairwiseScorer)]
        self.pairwise = [s for s in scorers if isinstance(s, PairwiseScorer)]
        self.stages: list[Stage] = []
        self._stage: dict[str, Stage] = {}
        endpoints = [*policies, *(e for s in scorers for e in s.endpoints.values())]
        self.pool = ClientPool(endpoints, store)
        slots = sum({e.base_url: e.concurrency for e in endpoints}.values())
        self.window = 2 * slots + 2  # prompts in flight: enough to keep every slot busy between stages
        per_prompt = config.generation.samples_per_prompt * len(policies)
        self.window += -(-sum(s.extra_in_flight for s in scorers) // per_prompt)  # and Ray's workers (runner.py)

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
        reporter = asyncio.create_task(report_progress(self.stages, self.log.info))
        try:
            async with self.pool:
                await run_bounded(self._jobs(blocks), self.window)
        finally:
            reporter.cancel()
        for stage in self.stages:
            stage.counts.tally()
            self.log.info(stage.progress.line())

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
        pair_ids = [comparison_id(s.scorer_id, a, b) for s in self.pairwise for r in by_prompt.values()
                    for a, b in combinations(sorted(r), 2)]  # fmt: skip
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
            for r in result.of(Response):
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
