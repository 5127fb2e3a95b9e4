"""Processes we start and own (local llama.cpp servers, Prefect's temporary API): light to import, so
that the CLI can launch Prefect's API before its own imports."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the parent dies (Linux only). Nobody is left to talk
    to, and a busy server can take longer than a test's patience to honour SIGTERM (measured on CI)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ChildServer:
    """A server process we start and own: in its own session (a Ctrl-C at the terminal reaches only us, and
    we stop it), dying with its parent (PR_SET_PDEATHSIG: a SIGKILL of ours leaves no orphan), its output
    kept in a temporary file for error messages. Start it from the main thread: the death signal follows
    the thread that started it."""

    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    started = 0.0

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None, nice: int = 0) -> None:
        """Start `cmd`; `nice` lowers its CPU priority (a server whose start must not slow the work)."""

        def before_exec() -> None:
            if nice:
                os.nice(nice)
            if sys.platform == "linux":
                die_with_parent()

        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=before_exec,
        )  # fmt: skip
        self.started = time.monotonic()

    def log_tail(self, n: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
