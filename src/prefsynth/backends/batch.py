"""OpenAI-style batch endpoints (`batch: true` on a model): chat requests go out as batch jobs, not one by one.

A `Batcher` collects an endpoint's uncached chat requests until none has arrived for `WINDOW_S`, writes them
as a JSONL file (one line per request, `custom_id` = the call id), uploads it (`purpose=batch`), creates a
batch on it, polls it and hands each request its answer from the output (or error) file. The engine does not
change: each request simply waits longer, and a request that follows from an answer (a judge's repair, a
score of a new response) goes out in a later batch.

Idempotent across restarts. The uploaded file's id and its call ids are in the warehouse (`batches`,
`batch_calls`) before the batch is created, and the batch's id right after. A call stays with its batch until
the warehouse has a result for it recorded after the batch was: a restarted run polls that batch again (or,
killed between upload and creation, finds the server's batch on that file, or creates it from the same
file); it never submits a request twice. Results the server gives for no request, or none for a request
(an expired batch), are errors, retried by the next run.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable
from typing import Any, Protocol

import openai

from prefsynth.warehouse.ids import canonical_json

WINDOW_S = float(os.environ.get("PREFSYNTH_BATCH_WINDOW_S", 2.0))  # a batch goes out when no request has
MAX_WAIT_S = 30.0  # joined it for this long, or when its first request has waited this long
MAX_REQUESTS = 50_000  # per batch (OpenAI's limit)
POLL_S = float(os.environ.get("PREFSYNTH_BATCH_POLL_S", 10.0))  # between two looks at a running batch
DONE = ("completed", "failed", "expired", "cancelled")


class BatchLedger(Protocol):
    """What a Batcher keeps in the warehouse (the Store implements it; thread-safe)."""

    def open_batches(self, model: str) -> dict[str, tuple[str, str | None]]:
        """{call_id: (input_file_id, batch_id or None)} of this model's calls still waiting on a batch."""
        ...

    def record_batch_file(self, input_file_id: str, model: str, call_ids: list[str]) -> None: ...

    def record_batch_id(self, input_file_id: str, batch_id: str) -> None: ...


def chat_answer(data: Any) -> str:
    """The cached form of a chat completion (text, finish reason, tokens); ValueError if it has none."""
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise ValueError("response has no choices")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"message content is a {type(content).__name__}, not text")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return canonical_json({"text": content or "", "finish_reason": choice.get("finish_reason"),  # type: ignore[union-attr]
                           "prompt_tokens": usage.get("prompt_tokens"),
                           "completion_tokens": usage.get("completion_tokens")})  # fmt: skip


Answer = tuple[str | None, str | None]  # (cached response JSON, error)
TRIES = 5  # looks at a batch (with backoff) before it is left for the next run


class Pending(str):
    """An error that is not the request's result: its batch stays open for the next run (do not record it)."""


class Batcher:
    """One endpoint's batches: `call` waits for a request's answer from a batch."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, identity: str, ledger: BatchLedger) -> None:
        self.client, self.model, self.identity, self.ledger = client, model, identity, ledger
        self.queue: dict[str, dict[str, Any]] = {}
        self.waiting: dict[str, list[asyncio.Future[Answer]]] = {}
        self.open: dict[str, tuple[str, str | None]] | None = None
        self.watching: dict[str, asyncio.Task[None]] = {}  # by input file id
        self.members: dict[str, list[str]] = {}  # call ids by input file id
        self.flushing: asyncio.Task[None] | None = None
        self.loading: asyncio.Lock = asyncio.Lock()

    async def call(self, call_id: str, body: dict[str, Any]) -> Answer:
        """The answer to one request; a `Pending` error is not its result (do not record it)."""
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(call_id, []).append(future)
        async with self.loading:  # one read of the ledger, however many first calls
            if self.open is None:
                self.open = await asyncio.to_thread(self.ledger.open_batches, self.identity)
                for cid, (file_id, _) in self.open.items():
                    self.members.setdefault(file_id, []).append(cid)
        if call_id in self.open:  # submitted by an earlier run: wait for that batch
            self._watch(*self.open[call_id])
        elif len(self.waiting[call_id]) == 1:
            self.queue[call_id] = body
            if self.flushing is None or self.flushing.done():
                self.flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self.queue:  # requests that join while a batch is being submitted go in the next one
            await self._flush_once()

    async def _flush_once(self) -> None:
        started = time.monotonic()
        while True:
            seen = len(self.queue)
            await asyncio.sleep(WINDOW_S)
            if len(self.queue) == seen or time.monotonic() - started >= MAX_WAIT_S:
                break
        queued, self.queue = self.queue, {}
        items = list(queued.items())
        for i in range(0, len(items), MAX_REQUESTS):
            chunk = items[i : i + MAX_REQUESTS]
            try:
                await self._submit(chunk)
            except Exception as err:  # noqa: BLE001 - its requests fail (and are retried next run); none waits forever
                self._answer((cid for cid, _ in chunk), None, f"batch not submitted: {type(err).__name__}: {err}")

    async def _submit(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": self.model, **body}}, ensure_ascii=False)
                 for cid, body in items]  # fmt: skip
        data = ("\n".join(lines) + "\n").encode()
        uploaded = await self.client.files.create(file=("prefsynth-batch.jsonl", data), purpose="batch")
        self.members[uploaded.id] = [c for c, _ in items]
        await asyncio.to_thread(self.ledger.record_batch_file, uploaded.id, self.identity, self.members[uploaded.id])
        self._watch(uploaded.id, None)

    def _watch(self, input_file_id: str, batch_id: str | None) -> None:
        task = self.watching.get(input_file_id)
        if task is None or task.done():  # a finished watch answered its waiters: a new request needs a new one
            self.watching[input_file_id] = asyncio.create_task(self._collect(input_file_id, batch_id))

    async def _collect(self, input_file_id: str, batch_id: str | None) -> None:
        for attempt in range(TRIES):
            try:
                batch = await self._batch(input_file_id, batch_id)
                batch_id = batch.id
                while batch.status not in DONE:
                    await asyncio.sleep(POLL_S)
                    batch = await self.client.batches.retrieve(batch.id)
                answers = await self._results(batch)
                break
            except Exception as err:  # noqa: BLE001 - retried; then the batch stays open for the next run
                if attempt == TRIES - 1:
                    self._answer(self.members[input_file_id], None,
                                 Pending(f"batch {batch_id or input_file_id} unreachable: {err}"))  # fmt: skip
                    return
                await asyncio.sleep(min(60.0, POLL_S * 2**attempt))
        for cid in self.members[input_file_id]:
            response, error = answers.get(cid, (None, f"batch {batch.id} {batch.status}: no result for this request"))
            self._answer([cid], response, error)

    async def _batch(self, input_file_id: str, batch_id: str | None) -> Any:
        """The batch on this file: known, found on the server (created before a crash), or created now."""
        if batch_id is not None:
            return await self.client.batches.retrieve(batch_id)
        async for batch in self.client.batches.list(limit=100):
            if batch.input_file_id == input_file_id:
                break
        else:
            batch = await self.client.batches.create(input_file_id=input_file_id, endpoint="/v1/chat/completions",
                                                     completion_window="24h")  # fmt: skip
        await asyncio.to_thread(self.ledger.record_batch_id, input_file_id, batch.id)
        return batch

    async def _results(self, batch: Any) -> dict[str, Answer]:
        answers: dict[str, Answer] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for line in content.text.splitlines():
                if line.strip():
                    row = json.loads(line)
                    answers[row.get("custom_id")] = _answer(row)
        return answers

    def _answer(self, call_ids: Iterable[str], response: str | None, error: str | None) -> None:
        for cid in call_ids:
            if self.open is not None and not isinstance(error, Pending):
                self.open.pop(cid, None)  # answered: asked again, it goes in a new batch
            for future in self.waiting.pop(cid, []):
                if not future.done():
                    future.set_result((response, error))


def _answer(row: dict[str, Any]) -> Answer:
    """One output or error line: the answer, or what went wrong."""
    response, error = row.get("response") or {}, row.get("error")
    if error:
        return None, f"batch error: {error.get('code', '')} {error.get('message', '')}".strip()
    if response.get("status_code") != 200:
        body = response.get("body") or {}
        message = (body.get("error") or {}).get("message", "") if isinstance(body, dict) else ""
        return None, f"HTTP {response.get('status_code')}: {message}"[:500]
    try:
        return chat_answer(response.get("body")), None
    except ValueError as err:
        return None, f"unreadable response: {err}"
