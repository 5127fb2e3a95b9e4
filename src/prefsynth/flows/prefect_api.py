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
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prefsynth.backends.processes import ChildServer, free_port
from prefsynth.errors import PrefsynthError

# The temporary API's CPU priority, lowered: its start (2-3 s of a core) overlaps the run's first seconds, and
# on 2 cores it slowed the stream (bench/engine.py, 12k calls at 64 in flight: 0.6 s less wall time at 10).
API_NICE = 10


class PrefectAPIError(PrefsynthError):
    """Prefect's temporary API did not start."""


def configured_api_url() -> str | None:
    """The Prefect API the user configured (environment or Prefect profile), if any."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def inside_flow() -> bool:
    """Whether this runs inside a flow run (then a run is its subflow)."""
    if "prefect" not in sys.modules:  # no flow runs without Prefect imported
        return False
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def no_server_configured() -> bool:
    """Whether no Prefect server is configured, known without importing Prefect (a second) when it is not
    imported yet: true only when no setting that could name a server is found (an environment variable
    PREFECT_API*, a `.env` with PREFECT_ settings, a `prefect.toml`, a `[tool.prefect]` table, or an active
    profile with PREFECT_API* keys). When unsure it says false, and `configured_api_url()` decides."""
    if "prefect" in sys.modules:
        return not configured_api_url()
    names = [k.upper() for k in os.environ]  # Prefect reads its settings whatever their case
    if any(k.startswith(("PREFECT_API", "PREFECT_PROFILE")) or k == "PREFECT_TEST_MODE" for k in names):
        return False
    try:
        if Path("prefect.toml").exists() or "PREFECT_" in _text(Path(".env")).upper():
            return False
        if "tool.prefect" in _text(Path("pyproject.toml")).lower():
            return False
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
        profiles = tomllib.loads(_text(home / "profiles.toml"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    active = profiles.get("profiles", {}).get(profiles.get("active", "ephemeral"), {})
    return not any(str(k).upper().startswith("PREFECT_API") for k in active)


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


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
                     "--port", str(self.port), "--log-level", "error", "--lifespan", "on"], env,
                    nice=API_NICE)  # fmt: skip

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


_launched: list[TemporaryAPI] = []  # launched by `launching()`, not yet taken by `prefect_api()`


@contextlib.contextmanager
def launching() -> Iterator[None]:
    """Launch a temporary API now, for the `prefect_api()` inside, before the command's own imports (those of
    Prefect's settings alone take a second), unless a server is or may be configured. Stopped on exit if
    not taken."""
    if _launched or inside_flow() or not no_server_configured():
        yield
        return
    api = TemporaryAPI()
    api.launch()
    _launched.append(api)
    try:
        yield
    finally:
        if api in _launched:
            _launched.remove(api)
            api.stop()


@contextlib.contextmanager
def prefect_api() -> Iterator[TemporaryAPI | None]:
    """A temporary API for the commands inside (the one `launching()` launched, else one launched now); None
    when the user configured one.

    Call `wait()` on it before the first flow runs; `using(api)` points Prefect at it.
    """
    api = _launched.pop() if _launched else None
    try:
        configured = configured_api_url()
    except BaseException:
        if api is not None:
            api.stop()
        raise
    if configured:
        if api is not None:
            api.stop()
        yield None
        return
    if api is None:
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
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    quiet_console()
    _temporary.append(api.url)
    # no heartbeats: they detect crashed runs on a shared server, and this API ends with the run; each flow
    # run's end would wait up to a second for its heartbeat thread
    updates = {PREFECT_API_URL: api.url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    try:
        with temporary_settings(updates=updates):
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
