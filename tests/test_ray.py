"""The Ray runner (issue 15, part 3): in-process reward models and dedup as Prefect tasks on a real local Ray
instance through prefect-ray, against the threads runner on the same responses (real SmolLM2 on llama.cpp,
real DuckDB, real Prefect, a small transformers classifier built by the test)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from prefsynth.backends.client import ClientPool, ModelClient
from prefsynth.backends.hf_reward import HFRewardModel, shared_model
from prefsynth.cli import app
from prefsynth.flows.runner import Batches, RayRunner, reward_batch
from prefsynth.schemas.records import Failure, Score
from prefsynth.tasks.score import score_items
from prefsynth.tasks.scorers.reward_model import RewardModelScorer, RewardModelSpec
from prefsynth.warehouse.store import Store
from tests.conftest import write_jsonl
from tests.test_reward_model import items, make_model

cli = CliRunner()
CONVERSATIONS = [[{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": text}]
                 for text in ("Paris.", "The capital of France is Paris.", "Lyon, I think.")]  # fmt: skip


def _q(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance for the module (it takes seconds to start); RayTaskRunner joins it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """The flow process computes with one torch thread, as a Ray worker does (Ray sets OMP_NUM_THREADS=1 for a
    one-CPU task): the same arithmetic on both sides, so the values can be compared bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _job(tmp_path: Path, folder: Path) -> Path:
    """Three prompts (two of them duplicates once normalized, which the screen flags) x 2 SmolLM2 samples,
    scored by the in-process reward model one response per forward pass (as the threads runner streams);
    replies are screened for duplicates across prompts too."""
    prompts = write_jsonl(tmp_path / "p.jsonl", ["Name a fruit.", "name a FRUIT!", "What is 5 - 2?"])
    raw = {"name": "ray", "prompts": {"path": str(prompts)},
           "generation": {"models": [{"gguf": "smollm2-135m-instruct"}], "samples_per_prompt": 2,
                          "sampling": {"temperature": 1.0, "max_tokens": 12, "seed": 1}},
           "scorers": [{"kind": "reward_model", "name": "reward", "path": str(folder), "batch_size": 1}],
           "curation": {"min_margin": 0.0, "allow_truncated": True, "dedup_responses": True},
           "warehouse": str(tmp_path / "threads.duckdb")}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _plain(value: Any) -> None:
    """Fails on anything live in a task's parameters: the Store, a client, a pool."""
    assert not isinstance(value, Store | ModelClient | ClientPool), type(value)
    for inner in value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else []:
        _plain(inner)


@pytest.mark.model
@pytest.mark.transformers
@pytest.mark.ray
def test_ray_runner_gives_exactly_the_threads_runners_scores(tmp_path, prefect_harness, local_ray, one_torch_thread,
                                                             monkeypatch):  # fmt: skip
    folder = make_model(tmp_path / "rm")
    config = _job(tmp_path, folder)
    threads_db, ray_db = tmp_path / "threads.duckdb", tmp_path / "ray.duckdb"
    done = cli.invoke(app, ["run", str(config)])  # the default runner: threads
    assert done.exit_code == 0, done.output
    rewards = "SELECT response_id, value, details FROM scores WHERE scorer = 'reward' ORDER BY response_id"
    threads = _q(threads_db, rewards)
    assert len(threads) == 6 and len({v for _, v, _ in threads}) == 6  # distinct values: a mix-up would show
    # the same responses (and the flow's warehouse) without the reward scores: the Ray run computes them again
    shutil.copy(threads_db, ray_db)
    with duckdb.connect(str(ray_db)) as con:
        con.execute("DELETE FROM scores WHERE scorer = 'reward'")

    sent: list[tuple[str, dict[str, Any]]] = []
    call = RayRunner.call

    def recorded(self: RayRunner, task: Any, **parameters: Any) -> Any:
        sent.append((task.name, parameters))
        return call(self, task, **parameters)

    monkeypatch.setattr(RayRunner, "call", recorded)
    done = cli.invoke(app, ["run", str(config), "--runner", "ray", "--db", str(ray_db)])
    assert done.exit_code == 0, done.output
    runs = [r for (r,) in _q(ray_db, "SELECT run_id FROM runs ORDER BY started_at")]
    assert len(runs) == 2
    summary = json.loads(_q(ray_db, f"SELECT summary FROM run_ends WHERE run_id = '{runs[1]}'")[0][0])
    stages = {s["stage"]: s for s in summary["stages"]}
    assert (stages["generate"]["reused"], stages["generate"]["new"]) == (6, 0)  # the same responses
    assert (stages["score[reward]"]["reused"], stages["score[reward]"]["new"]) == (0, 6)  # scored again, on Ray
    ray_rows = _q(ray_db, rewards)
    assert ray_rows == threads  # every value (and its logits) bit for bit, per response id
    # the scores came from Ray task runs, in batches, with plain data only; the screen ran there too
    names = [name for name, _ in sent]
    assert names.count("reward-batch") >= 1 and names.count("screen") == names.count("screen-responses") == 1
    assert sum(len(p["conversations"]) for n, p in sent if n == "reward-batch") == 6
    for _, parameters in sent:
        _plain(parameters)
        pickle.dumps(parameters)  # plain pickle: no closure, lambda or live connection
    # the screens' flags and the curated pairs are those of the threads run
    flags = "SELECT prompt_id, response_id, kind, of_id FROM prompt_flags WHERE run_id = '{}' ORDER BY ALL"
    assert _q(ray_db, flags.format(runs[1])) == _q(ray_db, flags.format(runs[0])) != []
    pairs = "SELECT pair_id FROM run_pairs WHERE run_id = '{}' ORDER BY pair_id"
    assert _q(ray_db, pairs.format(runs[1])) == _q(ray_db, pairs.format(runs[0])) != []


@pytest.mark.transformers
@pytest.mark.ray
def test_a_task_given_the_store_is_refused_and_the_model_loads_once_per_process(
    tmp_path, prefect_harness, local_ray, one_torch_thread
):
    from prefect_ray import RayTaskRunner

    folder = make_model(tmp_path / "rm")
    spec = RewardModelSpec(path=str(folder), batch_size=1)
    identity = HFRewardModel(folder, spec.max_length).identity
    with Store(tmp_path / "w.duckdb") as store, RayTaskRunner() as runner:
        with pytest.raises(TypeError, match="pickle"):  # a live DuckDB connection cannot travel to a worker
            runner.submit(reward_batch, {"spec": spec, "identity": store, "conversations": CONVERSATIONS})
        on_ray = RayRunner(runner).call(reward_batch, spec=spec, identity=identity, conversations=CONVERSATIONS)
    here = reward_batch.fn(spec, identity, CONVERSATIONS)
    assert all(r.value is not None for r in here) and len({r.value for r in here}) == 3
    assert [(r.value, r.details) for r in on_ray] == [(r.value, r.details) for r in here]  # one task, three items
    # one instance per process and folder identity: a worker loads the model once for all its batches
    assert shared_model(str(folder), spec.max_length, identity) is shared_model(str(folder), spec.max_length, identity)
    wrong = reward_batch.fn(spec, "hf:sha256:other", CONVERSATIONS)
    assert all(r.value is None and "other files" in (r.error or "") for r in wrong)


class FakeRay:
    """Stands in for a RayRunner: runs the 'task' here (doubling numbers), keeps each batch, and holds the
    first task run until released, so that items arrive while all task runs are busy."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()

    def call(self, task: Any, **parameters: Any) -> list[int]:
        self.batches.append(parameters["items"])
        if len(self.batches) == 1:
            assert self.release.wait(10)
        return [2 * x for x in parameters["items"]]


def test_batches_go_at_once_when_a_task_run_is_free_and_together_when_all_are_busy():
    fake = FakeRay()
    task = SimpleNamespace(name="double")
    batches = Batches(fake, task, "items", size=3, fixed={}, in_flight=1)  # type: ignore[arg-type]

    async def main() -> list[list[int]]:
        first = asyncio.create_task(batches([1]))
        await asyncio.sleep(0)  # the first goes alone, at once; the rest wait for its task run
        rest = [asyncio.create_task(batches([x])) for x in (2, 3, 4, 5)]
        await asyncio.sleep(0)
        fake.release.set()
        return [await first, *[await r for r in rest]]

    try:
        assert asyncio.run(main()) == [[2], [4], [6], [8], [10]]  # each caller gets its own results
    finally:
        batches.close()
    assert fake.batches == [[1], [2, 3, 4], [5]]  # at most `size` per task run
    assert batches.task_runs == 3


@pytest.mark.transformers
def test_a_lost_offloaded_batch_fails_its_items_not_the_run(tmp_path):
    scorer = RewardModelScorer(RewardModelSpec(path=str(make_model(tmp_path / "rm"))), {})
    sent: list[int] = []

    async def lost(conversations: list[Any]) -> list[Any]:
        sent.append(len(conversations))
        raise ConnectionError("worker died")

    scorer.offload = lost
    result = asyncio.run(score_items(scorer, items()))
    assert sent == [3] and not result.of(Score)
    assert [f.error for f in result.of(Failure)] == ["reward model: offloaded batch failed: ConnectionError: worker "
                                                     "died"] * 3  # fmt: skip


def test_runner_ray_without_the_extra_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("ray", "prefect_ray") else real(n, *a))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"prompts": {"path": "p.jsonl"}, "generation": {"models": [{"gguf": "x.gguf"}]},
                                      "scorers": [{"kind": "reward_model", "path": "rm"}]}))  # fmt: skip
    done = cli.invoke(app, ["run", str(config), "--runner", "ray"])
    assert done.exit_code == 2
    assert "runner: ray needs ray and prefect-ray: pip install 'prefsynth[ray]'" in done.output
    assert "Traceback" not in done.output
    bad = cli.invoke(app, ["run", str(config), "--runner", "dask"])
    assert bad.exit_code == 2 and "runner must be threads or ray, got 'dask'" in bad.output
