"""Prefect's temporary API for one command, started by us so that it starts early and never outlives us.

With no Prefect server configured, Prefect would start its own temporary API when the flow is called and
give it 20 s; on a new machine (empty PREFECT_HOME) building its database takes longer than that while a
llama.cpp server loads, and the run fails. Here the same server (Prefect's app under uvicorn, as Prefect
runs it) is launched first thing, so it starts while the config is validated, modules are imported and
local models load; we wait for it up to `PREFSYNTH_API_TIMEOUT_S` (default 300 s). It runs in its own
session, so a Ctrl-C at the terminal reaches only prefsynth, which then stops it; it dies with its parent
(PR_SET_PDEATHSIG), so a SIGKILL leaves no server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prefsynth.backends.local import ChildServer, free_port
from prefsynth.errors import PrefsynthError


class PrefectAPIError(PrefsynthError):
    """Prefect's temporary API did not start."""


def configured_api_url() -> str | None:
    """The Prefect API the user configured (environment or Prefect profile), if any."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


_temporary: list[str] = []  # the URLs of this process's temporary APIs


def shared_server() -> bool:
    """Whether Prefect talks to a server the user configured (PREFECT_API_URL or a profile), which other runs
    may share, and not to a temporary API of this process."""
    url = configured_api_url()
    return bool(url) and url not in _temporary


class TemporaryAPI(ChildServer):
    """`launch()` starts it in the background, `wait()` blocks until it answers, `stop()` ends it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.ready_after: float | None = None  # seconds from launch until it answered

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def launch(self) -> None:
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self._spawn([sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent),
                     "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                     "--port", str(self.port), "--log-level", "error", "--lifespan", "on"], env)  # fmt: skip

    def wait(self, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or float(os.environ.get("PREFSYNTH_API_TIMEOUT_S", "300"))
        assert self.proc is not None
        while time.monotonic() - self.started < timeout_s:
            if self.proc.poll() is not None:
                raise PrefectAPIError(
                    f"Prefect's temporary API exited at start (code {self.proc.returncode}): {self._tail()}\n"
                    "Check PREFECT_HOME is writable, or point PREFECT_API_URL at a running `prefect server start`."
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        self.ready_after = time.monotonic() - self.started
                        return
            except OSError:
                time.sleep(0.1)
        raise PrefectAPIError(
            f"Prefect's temporary API did not answer in {timeout_s:.0f} s (its first start builds a database in "
            "PREFECT_HOME). Run the command again, raise PREFSYNTH_API_TIMEOUT_S, or point PREFECT_API_URL at a "
            f"running `prefect server start`. Its log: {self._tail()}"
        )

    def _tail(self) -> str:
        return self.log_tail(1500).strip() or "(empty)"


@contextlib.contextmanager
def prefect_api() -> Iterator[TemporaryAPI | None]:
    """A temporary API for the commands inside, launched now; None when the user configured one.

    Call `wait()` on it before the first flow runs; `using(api)` points Prefect at it.
    """
    if configured_api_url():
        yield None
        return
    api = TemporaryAPI()
    api.launch()
    try:
        yield api
    finally:
        api.stop()


@contextlib.contextmanager
def using(api: TemporaryAPI | None) -> Iterator[None]:
    """Prefect settings pointing at `api` (which must answer), or unchanged for a configured API."""
    if api is None:
        yield
        return
    api.wait()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    quiet_console()
    _temporary.append(api.url)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api.url}):
            yield
    finally:
        _drain()
        _temporary.remove(api.url)


class _Quiet(logging.Filter):
    """What the terminal does not need from Prefect's log: the traceback of our own errors (bad input, an
    unreachable endpoint: the message names what is wrong and the CLI prints it once), and the routine
    "Finished in state Completed()" of every commit task run (one every 2 s; the API keeps them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PrefsynthError):
            record.exc_info, record.exc_text = None, None
        if record.name == "prefect.task_runs" and record.levelno < logging.WARNING:
            return getattr(record, "task_run_name", "").split("-")[0] != "commit"
        return True


def quiet_console() -> None:
    """Filter every handler of Prefect's loggers as `_Quiet` says."""
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _Quiet) for f in handler.filters):
                handler.addFilter(_Quiet())


def _drain(timeout_s: float = 10.0) -> None:
    """Send Prefect's buffered logs and events while the API still answers (else they retry for a minute)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    def drain() -> None:  # drain_all returns a coroutine when the thread runs an event loop (a notebook)
        for worker in (APILogWorker, EventsWorker):
            with contextlib.suppress(Exception):
                worker.drain_all(timeout=timeout_s)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        drain()
        return
    thread = threading.Thread(target=drain, name="prefsynth-drain")
    thread.start()
    thread.join()
