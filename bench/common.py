"""Shared by the benchmarks: timing, replaying requests straight to a server, appending to BENCHMARKS.md."""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def versions() -> str:
    names = ("prefsynth", "llama_cpp_python", "prefect", "duckdb", "polars", "openai")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_results(title: str, command: str, lines: list[str], table: list[str] | None = None) -> None:
    """Append one dated section to BENCHMARKS.md (results are history; nothing is overwritten)."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"\n## {title} ({stamp})", "", f"- command: `{command}`", f"- machine: {machine()}",
            f"- versions: {versions()}", "", *[f"- {line}" for line in lines]]  # fmt: skip
    if table:
        body += ["", *table]
    path = ROOT / "BENCHMARKS.md"
    if not path.exists():
        path.write_text("# Benchmarks\n\nEach section is one run, appended by the command it names. Ratios are "
                        "measured within one run on one machine.\n")  # fmt: skip
    with path.open("a") as f:
        f.write("\n".join(body) + "\n")


async def replay(base_url: str, path: str, bodies: Iterable[dict], concurrency: int) -> float:
    """Send `bodies` to `base_url + path` with a minimal client, `concurrency` at a time; wall seconds."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:

        async def one(body: dict) -> None:
            async with sem:
                r = await client.post(path, json=body)
                r.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start


class CountingProxy:
    """A loopback HTTP proxy in front of a model server that counts the requests each client sends."""

    def __init__(self, target: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        parts = urlsplit(target)
        self.count = 0
        proxy = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "POST":
                    with lock:
                        proxy.count += 1
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=900)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = _forward  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{parts.path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tree_peak_rss(cmd: list[str], **kw: object) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `cmd`, sampling the summed RSS of its whole process tree; (result, peak MiB)."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)  # type: ignore[call-overload]
    peak = 0.0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({proc.returncode}):\n{err[-3000:]}")
    return result, peak


def _tree_rss(root: int) -> float:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 2**20


def emit(name: str, value: float | str) -> None:
    """One result line in the form `name: value` (what `make bench` prints)."""
    print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def emit_all(results: dict[str, Any]) -> None:
    """`emit` every result of a run, numbers as floats."""
    for name, value in results.items():
        emit(name, float(value) if isinstance(value, int | float) else str(value))


def result_lines(results: dict[str, Any]) -> list[str]:
    """A run's results as BENCHMARKS.md lines, `name: value`."""
    return [f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in results.items()]


def command(script: str) -> str:
    """The command that reproduces this run (`python SCRIPT --record ARGS`), for its BENCHMARKS.md section."""
    argv = shlex.join(a for a in sys.argv[1:] if a != "--record")
    return f"python {script} --record {argv}".strip()


def frame_batches(rows: int, batch: int, part: int = 0, parts: int = 1) -> list[dict[str, pl.DataFrame]]:
    """`Store.write_frames` batches of `batch` rows (half responses, half scores); `part` of `parts` takes every
    parts-th batch."""
    import polars as pl

    from prefsynth.warehouse.store import frame

    half = batch // 2
    out = []
    for n, lo in enumerate(range(0, rows // 2, half)):
        if n % parts != part:
            continue
        ids = range(lo, min(rows // 2, lo + half))
        out.append({
            "responses": pl.DataFrame({
                "response_id": [f"r{i:010d}" for i in ids], "prompt_id": [f"p{i // 4:09d}" for i in ids],
                "model": "m", "model_identity": "m@1", "sampling": "{}", "sample_index": [i % 4 for i in ids],
                "seed": [i % 4 for i in ids], "text": [f"Synthetic response {i} " * 8 for i in ids],
                "finish_reason": "stop", "prompt_tokens": 12, "completion_tokens": 40, "latency_ms": 1.0,
                "call_id": [f"c{i:010d}" for i in ids], "source": "sampled"}, schema=frame("responses", []).schema),
            "scores": pl.DataFrame({
                "score_id": [f"s{i:010d}" for i in ids], "response_id": [f"r{i:010d}" for i in ids],
                "scorer_id": "judge", "scorer": "judge", "value": [float((i * 7919) % 10 + 1) for i in ids],
                "rationale": None, "raw": "{}", "call_ids": [[f"c{i:010d}"] for i in ids], "details": None,
            }, schema=frame("scores", []).schema),
        })  # fmt: skip
    return out
