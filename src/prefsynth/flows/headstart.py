"""A run's head start: its prompts stream to the models while Prefect's temporary API starts.

Prefect's temporary API answers 2-3 s after its launch (its own imports), far later on a new machine. Where
prefsynth launched that API itself (`prefsynth run`, or `prefsynth.run` with no Prefect server configured),
the run does not wait for it: the run is opened (endpoints checked, warehouse opened, prompts read, its row
begun) and its stream started in a thread at once. The flow run adopts it when the API answers: from then
on the writer's commits are the flow run's task runs, and the lines logged so far go to the flow run's log.
Until then the writer commits straight to the warehouse, in the same batches, so a crash costs what it
costs later in the run. A run that no flow run adopts (the API failed to start, Ctrl-C) is stopped, what
finished is committed, and the run is recorded as failed or interrupted.

Not for loops, shards, `runner: ray` or a `global_limit` endpoint: those need Prefect from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from logging import Logger, LoggerAdapter
from typing import TYPE_CHECKING, Any

from prefsynth.flows.engine import Writer
from prefsynth.flows.opening import Opened, finish, opened, patiently, stream

if TYPE_CHECKING:
    from prefsynth.flows.stream import Streaming
    from prefsynth.schemas.config import PipelineConfig
    from prefsynth.schemas.records import StageResult

_log = logging.getLogger("prefsynth.run")
_offered: ContextVar[HeadStart | None] = ContextVar("prefsynth_head_start", default=None)


def eligible(config: PipelineConfig) -> bool:
    """Whether a run of `config` can start before its flow run exists."""
    return config.loop is None and config.runner != "ray" and not any(m.global_limit for m in config.all_models())


class HeldLog:
    """A run's log before its flow run exists. Warnings are shown at once (logger `prefsynth.run`); every
    line is held, and the flow run's log gets the held lines when it adopts the run, then every later line."""

    def __init__(self) -> None:
        self._held: list[tuple[int, str]] = []
        self._to: Logger | LoggerAdapter | None = None
        self._context = contextvars.Context()
        self._lock = threading.Lock()

    def info(self, msg: str) -> None:
        self._line(logging.INFO, msg)

    def warning(self, msg: str) -> None:
        self._line(logging.WARNING, msg)

    def _line(self, level: int, msg: str) -> None:
        with self._lock:
            to = self._to
            if to is None:
                self._held.append((level, msg))
        if to is not None:  # in the flow run's context: its API, not a temporary one Prefect would start
            self._context.copy().run(to.log, level, msg)
        elif level >= logging.WARNING:  # e.g. a wait for the warehouse: the user must see it now
            _log.log(level, msg)

    def attach(self, logger: Logger | LoggerAdapter) -> None:
        with self._lock:  # held: no live line overtakes the replayed ones
            for level, msg in self._held:
                logger.log(level, f"(before the flow run started) {msg}")
            self._held, self._to, self._context = [], logger, contextvars.copy_context()


class HeadStart:
    """One run opened and streaming before its flow run: `start()`, then the flow's `adopted()` and `join()`."""

    def __init__(self, config: PipelineConfig, warehouse: str) -> None:
        self.config, self.warehouse = config, warehouse
        self.log = HeldLog()
        self.claimed = False
        self.run: Opened | None = None
        self.writer: Writer | None = None
        self._stack = contextlib.ExitStack()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Open the run (bad input and unreachable endpoints fail here) and start streaming it in a thread."""
        run = self.run = self._stack.enter_context(opened(self.config, self.warehouse, None, self.log, None))
        store, run_id = run.store, run.summary.run_id
        self.writer = Writer(lambda batch: store.write(run_id, batch))  # plain commits until a flow run adopts it
        if not run.summary.prompts:
            self.writer.close()
            return
        import httpx  # noqa: F401 - now: openai reads sys.modules["httpx"], which Prefect's import (in the main
        # thread, meanwhile) would leave half-initialized for a moment

        context = contextvars.copy_context()  # the budget, the local servers, the CLI's progress bars
        self._thread = threading.Thread(target=context.run, args=(self._main,), name="prefsynth-head-start",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _main(self) -> None:
        assert self.run is not None and self.writer is not None
        try:
            stream(self.run, self.log, self.writer, self._run_async)
        except BaseException as err:  # noqa: BLE001 - handed to the flow run's join(), or recorded by stop()
            self._error = err

    def _run_async(self, coro: Coroutine[Any, Any, None]) -> None:
        async def main() -> None:
            with self._lock:
                self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
                if self._stopping:
                    raise asyncio.CancelledError
            await coro

        try:
            asyncio.run(main())
        finally:
            coro.close()  # never awaited when stopped before it began

    @contextlib.contextmanager
    def adopted(self) -> Iterator[Opened]:
        """The open run, for the flow run that adopts it: the held log lines go to its log."""
        from prefect import get_run_logger

        from prefsynth.flows.synthesize import flow_run_id

        assert self.run is not None
        self.log.attach(get_run_logger())
        self.run.store.set_flow_run(self.run.summary.run_id, flow_run_id())
        yield self.run

    def join(self, commit: Callable[[StageResult], Any]) -> Streaming:
        """Commit through `commit` from now on and wait for the stream to end; a Ctrl-C stops it."""
        assert self.writer is not None
        self.writer.attach(commit)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise
        if self._error is not None:
            raise self._error
        assert self.run is not None and self.run.streaming is not None
        return self.run.streaming

    def _wait(self) -> None:
        """Until the stream's thread ends, in short joins (a Ctrl-C interrupts it at once)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.2)

    def stop(self) -> None:
        """Cancel the stream and wait for its thread, also through further Ctrl-Cs: what finished is
        committed."""
        with self._lock:
            self._stopping = True
            if self._loop is not None and self._task is not None:
                with contextlib.suppress(RuntimeError):  # its loop has closed: the stream had ended
                    self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            patiently(self._wait)
        if self._thread is None and self.writer is not None:  # the stream closes it, if it started
            finish(self.writer)

    def close(self, err: BaseException | None) -> None:
        """Stop what runs; a run whose flow run did not record its end (none adopted it, or it stopped while
        adopting it) is recorded as interrupted or failed. Closes the run."""
        from prefsynth.flows.synthesize import interrupted

        self.stop()
        try:
            run = self.run
            if run is not None and not run.ended:
                summary = run.summary
                for stage in run.streaming.stages if run.streaming is not None else []:  # what it did
                    summary.stages.append(stage.counts.tally())
                summary.status = "interrupted" if err is not None and interrupted(err) else "failed"
                summary.seconds = time.monotonic() - run.started
                run.store.end_run(summary.run_id, summary.status, summary.model_dump())
                run.ended = True
                why = f": {type(self._error).__name__}: {self._error}" if self._error is not None else ""
                self.log.warning(f"run {summary.run_id} {summary.status} before its flow run took it over{why}; "
                                 "what it committed is kept, and a rerun continues from there")  # fmt: skip
        finally:
            self._stack.close()


@contextlib.contextmanager
def head_start(config: PipelineConfig, warehouse: str | None) -> Iterator[HeadStart]:
    """Open `config`'s run (which must be `eligible`) and start streaming it now; the next flow run of the same
    config and warehouse adopts it (`claim`)."""
    early = HeadStart(config, warehouse or str(config.warehouse))
    token = _offered.set(early)
    err: BaseException | None = None
    try:
        early.start()
        yield early
    except BaseException as e:
        err = e
        raise
    finally:
        _offered.reset(token)
        early.close(err)


def claim(config: PipelineConfig, warehouse: str, shard: str | None) -> HeadStart | None:
    """The head start offered for this flow run (same config and warehouse, not a shard), claimed once."""
    early = _offered.get()
    if early is None or early.claimed or shard is not None or early.run is None:
        return None
    if str(warehouse) != early.warehouse or config != early.config:
        return None
    early.claimed = True
    return early
