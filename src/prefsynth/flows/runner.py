"""Where a run's in-process heavy steps run: on threads of the flow process (`runner: threads`, the default), or
as Prefect tasks on a Ray cluster through prefect-ray's `RayTaskRunner` (`runner: ray`, extra prefsynth[ray]).

The steps offloaded are an in-process reward model's forward passes (tokenization included) and the
screens before curation (dedup of prompts and of replies, decontamination). HTTP model calls stay on the
flow's event loop with their per-endpoint limiters: Ray adds nothing to waiting on a server.

A task sent to Ray takes plain data and returns plain data: a scorer's spec and a batch of conversations,
the run's prompts or replies and the curation spec; never the Store, a client or a closure. The flow
writes what comes back; workers never open the warehouse. Prefect sees batches, never one task per
response: the responses that reach a reward model while the others stream are gathered into batches of up
to `ITEMS_PER_TASK` (a whole number of its `batch_size`), each one task run; the forward passes inside are
`batch_size` at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import importlib.util
import os
import socket
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import Task

from prefsynth.backends.hf_reward import RewardResult, shared_model
from prefsynth.errors import ConfigError
from prefsynth.schemas.config import PipelineConfig
from prefsynth.tasks.scorers import Scorer
from prefsynth.tasks.scorers.reward_model import Conversation, RewardModelScorer, RewardModelSpec

RAY_HINT = "pip install 'prefsynth[ray]'"
MAX_IN_FLIGHT = 128  # task runs out at once per in-process model (2 per Ray CPU up to this; a thread each waits)
ITEMS_PER_TASK = 32  # items per task run (a whole number of the model's batches): amortizes Prefect's bookkeeping

X = TypeVar("X")
Y = TypeVar("Y")


@task(name="reward-batch", cache_policy=NO_CACHE)
def reward_batch(spec: RewardModelSpec, identity: str, conversations: list[Conversation]) -> list[RewardResult]:
    """Prefect task for a task runner's workers (Ray): the in-process rewards of a batch of conversations, from
    plain data only. The model loads once per worker process (`shared_model`); a worker whose copy of the
    folder is missing or differs fails the batch's items, never the run."""
    try:
        model = shared_model(str(spec.path), spec.max_length, identity)
    except ConfigError as err:
        return [RewardResult(error=f"on {socket.gethostname()}: {err}")] * len(conversations)
    return model.rewards(conversations, spec.label_index, spec.batch_size)



def require_ray() -> None:
    """ConfigError (the CLI exits 2) naming the install command when ray or prefect-ray is missing."""
    missing = [name for name in ("ray", "prefect_ray") if importlib.util.find_spec(name) is None]
    if missing:
        names = " and ".join(n.replace("_", "-") for n in missing)
        raise ConfigError(f"runner: ray needs {names}: {RAY_HINT}")


class RayRunner:
    """A started `RayTaskRunner`: `call` runs one task there, `batches` gathers items into task runs."""

    def __init__(self, runner: Any) -> None:
        import ray

        self.runner = runner
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._batches: list[Batches[Any, Any]] = []

    def call(self, task: Task[..., Y], **parameters: Any) -> Y:
        """Run `task` on a Ray worker with these (plain) parameters and wait for its result."""
        return self.runner.submit(task, parameters).result()

    def batches(self, task: Task[..., list[Y]], items: str, size: int, **fixed: Any) -> Batches[Any, Y]:
        """A gatherer of items for `task(**fixed, <items>=[...])`, `size` per task run."""
        in_flight = min(2 * self.cpus, MAX_IN_FLIGHT)
        batches: Batches[Any, Y] = Batches(self, task, items, size, fixed, in_flight=in_flight)
        self._batches.append(batches)
        return batches

    def close(self) -> None:
        for batches in self._batches:
            batches.close()


class Batches(Generic[X, Y]):
    """`await batches(items)` gives the task's results for `items`, computed in task runs of up to `size` items
    gathered from every caller. A batch goes at once while fewer than `in_flight` task runs are out; when all
    are busy, items wait and go together as the next batch (larger under load, no wait when idle). Each task
    run is waited on in a thread of its own."""

    def __init__(self, ray: RayRunner, task: Task[..., list[Y]], items: str, size: int, fixed: dict[str, Any],
                 in_flight: int) -> None:  # fmt: skip
        self._ray, self._task, self._items, self.size, self._fixed = ray, task, items, size, fixed
        self.in_flight = in_flight
        self._pending: list[tuple[X, asyncio.Future[Y]]] = []
        self._out = 0  # task runs submitted and not finished
        self._pool = concurrent.futures.ThreadPoolExecutor(in_flight, thread_name_prefix="prefsynth-ray")
        self._running: set[asyncio.Task[None]] = set()
        self.task_runs = 0

    @property
    def capacity(self) -> int:
        """Items the task runs can hold at once."""
        return self.in_flight * self.size

    async def __call__(self, items: list[X]) -> list[Y]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending += zip(items, futures, strict=True)
        self._send()
        return list(await asyncio.gather(*futures))

    def _send(self) -> None:
        while self._pending and self._out < self.in_flight:
            chunk, self._pending = self._pending[: self.size], self._pending[self.size :]
            self._out += 1
            job = asyncio.get_running_loop().create_task(self._run(chunk))
            self._running.add(job)
            job.add_done_callback(self._running.discard)

    async def _run(self, chunk: list[tuple[X, asyncio.Future[Y]]]) -> None:
        items = [item for item, _ in chunk]
        parameters = {**self._fixed, self._items: items}
        try:
            context = contextvars.copy_context()  # the flow run's context: each batch is one of its task runs
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._pool, context.run, self._submit, parameters)
            self.task_runs += 1
            if len(results) != len(items):
                raise RuntimeError(f"task {self._task.name} returned {len(results)} results for {len(items)} items")
        except BaseException as err:  # the callers raise it (a bug, not a failed item: those are results)
            for _, future in chunk:
                if not future.done():
                    future.set_exception(err)
            return
        finally:
            self._out -= 1
            self._send()  # what waited goes now, as one batch
        for (_, future), result in zip(chunk, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _submit(self, parameters: dict[str, Any]) -> list[Y]:
        return self._ray.call(self._task, **parameters)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def task_runner(config: PipelineConfig) -> Iterator[RayRunner | None]:
    """None for `runner: threads`; for `ray`, a RayTaskRunner on `ray_address` (or RAY_ADDRESS), else on a
    local Ray instance started for the run (and stopped after it)."""
    if config.runner != "ray":
        yield None
        return
    require_ray()
    from prefect_ray import RayTaskRunner

    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    local = {} if address else {"include_dashboard": False}
    with RayTaskRunner(address=address, init_kwargs=local) as runner:
        ray = RayRunner(runner)
        get_run_logger().info(f"runner: ray ({address or 'a local instance'}, {ray.cpus} CPUs)")
        try:
            yield ray
        finally:
            ray.close()


def on(ray: RayRunner | None, task: Task[..., Y], **parameters: Any) -> Y:
    """`task` run here (in the flow's process, as a plain call of a Prefect task) or on Ray."""
    return task(**parameters) if ray is None else ray.call(task, **parameters)


def offload(scorers: list[Scorer], ray: RayRunner | None) -> None:
    """Send the in-process work of `scorers` to Ray (in-process reward models); others are unchanged."""
    if ray is None:
        return
    for scorer in scorers:
        if isinstance(scorer, RewardModelScorer) and scorer.local is not None:
            size = scorer.spec.batch_size * max(1, ITEMS_PER_TASK // scorer.spec.batch_size)
            batches = ray.batches(reward_batch, "conversations", size, spec=scorer.spec, identity=scorer.local.identity)
            scorer.offload, scorer.extra_in_flight = batches, batches.capacity
