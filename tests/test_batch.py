"""OpenAI-style batch endpoints (issue 13, cost control): a run whose model has `batch: true` sends its chat
requests as batch jobs through the files and batches API (a loopback server that implements their documented
shapes), and a run killed while its batch is running resumes that batch without submitting anything twice.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from prefsynth.schemas.config import ModelSpec
from tests.conftest import write_jsonl
from tests.fake_server import BatchServer
from tests.test_crash import _env, _none_left, _q, _start

PROMPTS = ["Name a fruit.", "Name a color.", "Name a planet.", "Name a river."]


def _config(tmp: Path, url: str, db: Path) -> Path:
    model = {"base_url": url, "model": "m", "batch": True, "max_concurrency": 5000}
    raw = {"name": "batch", "prompts": {"path": str(write_jsonl(tmp / "p.jsonl", PROMPTS))},
           "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"max_tokens": 16, "seed": 1}},
           "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
           "curation": {"min_margin": 1}, "warehouse": str(db)}  # fmt: skip
    path = tmp / "batch.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _batch_env(tmp: Path, mark: str) -> dict[str, str]:
    return {**_env(tmp, mark), "PREFSYNTH_BATCH_WINDOW_S": "0.3", "PREFSYNTH_BATCH_POLL_S": "0.2"}


def _all_ids(server: BatchServer) -> list[str]:
    return [cid for upload in server.uploads for cid in upload]


def test_batch_is_for_endpoints_and_allows_a_large_batch() -> None:
    assert ModelSpec(base_url="http://h/v1", model="m", batch=True, max_concurrency=20_000).batch
    with pytest.raises(ValueError, match="at most 1024"):
        ModelSpec(base_url="http://h/v1", model="m", max_concurrency=20_000)
    with pytest.raises(ValueError, match="a local model has no batch API"):
        ModelSpec(gguf="smollm2-135m-instruct", batch=True)


def test_a_run_goes_out_as_batches_and_a_killed_run_resumes_its_batch(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    with BatchServer() as server:
        config = _config(tmp_path, server.base_url, db)
        mark = uuid.uuid4().hex
        proc = _start(config, _batch_env(tmp_path, mark))
        deadline = time.monotonic() + 90
        while not server.creates and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the batch's id is committed right after it is created
        assert proc.poll() is None and server.creates == ["file-1"], "precondition: a batch is running"
        assert sorted(len(u) for u in server.uploads) == [8]  # the 8 generations, in one file
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _none_left(mark)

        server.release.set()  # the batch completes while no run is watching it
        proc = _start(config, _batch_env(tmp_path, uuid.uuid4().hex))
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out.decode()

    ids = _all_ids(server)
    assert len(ids) == len(set(ids)) == 16, "each request was submitted once: 8 generations, 8 ratings"
    assert len(server.creates) == len(set(server.creates)) == 2 and server.direct == 0  # one batch per file
    assert _q(db, "SELECT count(*) FROM batches WHERE batch_id IS NOT NULL") == [(2,)]
    calls = _q(db, "SELECT count(DISTINCT call_id), count(*) FILTER (WHERE status = 'ok') FROM model_calls")
    assert calls == [(16, 16)]
    assert _q(db, "SELECT count(*) FROM v_pairs_export")[0][0] > 0


def test_a_batch_run_reruns_free(tmp_path: Path, prefect_harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import prefsynth
    from prefsynth.backends import batch

    monkeypatch.setattr(batch, "WINDOW_S", 0.2)
    monkeypatch.setattr(batch, "POLL_S", 0.1)
    db = tmp_path / "w.duckdb"
    with BatchServer() as server:
        server.release.set()
        first = prefsynth.run(_config(tmp_path, server.base_url, db))
        assert len(first.pairs) > 0 and len(_all_ids(server)) == 16, "precondition: a run made of batches"
        again = prefsynth.run(_config(tmp_path, server.base_url, db))
        assert again.summary.model_calls == 0 and len(server.uploads) == 2 and len(again.pairs) == len(first.pairs)


class Ledger:
    """A warehouse's batch rows in memory: a run killed after its upload (and maybe after the batch's
    creation) but before the batch's id was recorded."""

    def __init__(self, open_calls: dict[str, tuple[str, str | None]]) -> None:
        self.open, self.ids = open_calls, {}

    def open_batches(self, model: str) -> dict[str, tuple[str, str | None]]:
        return dict(self.open)

    def record_batch_file(self, input_file_id: str, model: str, call_ids: list[str]) -> None:
        raise AssertionError("nothing may be uploaded again")

    def record_batch_id(self, input_file_id: str, batch_id: str) -> None:
        self.ids[input_file_id] = batch_id


@pytest.mark.parametrize("created_before_the_kill", [True, False])
def test_a_file_uploaded_before_a_kill_gets_one_batch(created_before_the_kill: bool) -> None:
    import asyncio
    import json

    import openai

    from prefsynth.backends.batch import Batcher

    body = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8}
    with BatchServer() as server:
        line = json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "m", **body}})  # fmt: skip
        file_id = server.upload("multipart/form-data; boundary=b", (
            f'--b\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b\r\ncontent-disposition: '
            f'form-data; name="file"; filename="x.jsonl"\r\n\r\n{line}\n\r\n--b--\r\n').encode())["id"]  # fmt: skip
        if created_before_the_kill:
            server.create(file_id)
        server.release.set()
        ledger = Ledger({"c1": (file_id, None)})

        async def ask() -> tuple[str | None, str | None]:
            async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x") as client:
                return await Batcher(client, "m", "identity", ledger).call("c1", body)

        response, error = asyncio.run(ask())
    assert error is None and response is not None and json.loads(response)["text"].startswith("answer")
    assert server.creates == [file_id] and len(server.uploads) == 1 and list(ledger.ids) == [file_id]
