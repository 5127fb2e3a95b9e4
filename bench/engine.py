"""The engine against a loopback OpenAI-compatible server: ceiling, faults, kill-and-resume, fixed cost, memory.

Only the CLI is used (`prefsynth run CONFIG --db PATH`), so the same bench measures any engine. The server
(`python bench/engine.py serve`, its own process, 127.0.0.1 only) answers every chat completion after a fixed
delay with unlimited parallelism, with text derived from a hash of the request; judge requests (those with a
`response_format`) get a valid `{"rationale": ..., "score": N}`. It can answer a share of requests with 429
(Retry-After 1 s), 500, or slower than the client's timeout, drawn per (request, attempt number), and counts
what it served (GET /stats, POST /reset).

Arms (each prints `name: value` lines):
  ceiling   P prompts x 2 samples + a pointwise judge (4P calls): `prefsynth run` (whole command, fresh
            warehouse) against the same calls sent straight through `openai.AsyncOpenAI` with C in flight
            (generation, then judging of each response), and against distilabel 1.5.3 (full run only)
  faults    5% 429, 10% 500, 2% slower than timeout_s 5; C=16, max_retries 3 for both; then a rerun
  kill      runs SIGKILLed at a random moment (seeded) and resumed: calls paid twice, pairs vs uninterrupted
  fixed     cold first run (persistent and empty PREFECT_HOME), cached rerun; the `timings:` split if printed
  memory    peak RSS of `prefsynth run` (process tree) at 10k/100k/1M prompts, 1 sample + judge, latency 0:
            the whole run's, and the stream's (until the loopback server's last answer)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, _tree_rss, append_results, command, emit, emit_all, result_lines  # noqa: E402

BENCH_DIR = ROOT / ".bench"
PREFECT_HOME = BENCH_DIR / "prefect-home"  # persistent: Prefect's first start is slow
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 64, "seed": 0}
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
         "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor"]
MARKER = re.compile(r"\[r:([0-9a-f]{16})\]")
GOALS = {"ceiling": "prefsynth/SDK <= 1.10", "faults": "prefsynth/SDK <= 1.25", "kill": "0 calls paid twice, 0 runs "
         "that cannot resume, same pairs", "memory": "flat peak RSS", "write_frames": ">= 500k rows/s"}  # fmt: skip


# ---- the loopback server -------------------------------------------------------------------------------
def serve(latency: float, p429: float, p500: float, pslow: float, slow_s: float, seed: int, slots: int = 0) -> None:
    """Run the server until killed; prints `port: N` once it listens. Plain HTTP/1.1 on asyncio streams.
    `slots` > 0: at most that many answers are computed at once, the rest queue (a model server's slots)."""
    attempts: dict[str, int] = {}
    busy = asyncio.Semaphore(slots) if slots > 0 else contextlib.nullcontext()
    stats: dict[str, float] = {}
    reasons = {200: b"OK", 404: b"Not Found", 429: b"Too Many Requests", 500: b"Internal Server Error"}

    def bump(key: str, n: int = 1) -> None:
        stats[key] = stats.get(key, 0) + n

    async def answer(method: str, path: str, body: bytes) -> tuple[int, dict, bytes]:
        """(status, JSON reply, extra header lines) of one request."""
        if path.endswith("/models"):
            return 200, {"object": "list", "data": [{"id": "loop", "object": "model"}]}, b""
        if path == "/stats":
            return 200, {**stats, "cpu_seconds": time.process_time()}, b""
        if path == "/reset" and method == "POST":
            attempts.clear()
            stats.clear()
            return 200, {}, b""
        if not path.endswith("/chat/completions") or method != "POST":
            return 404, {"error": {"message": f"no route {method} {path}"}}, b""
        req = json.loads(body)
        key = json.dumps({k: v for k, v in req.items() if k != "model"}, sort_keys=True)
        h = hashlib.sha256(key.encode()).hexdigest()
        attempt = attempts[h] = attempts.get(h, 0) + 1
        judge = "response_format" in req
        bump("requests")
        stats.setdefault("first_request_at", time.time())
        bump("judge" if judge else "generate")
        bump("inflight")
        stats["max_inflight"] = max(stats.get("max_inflight", 0), stats["inflight"])
        try:
            draw = int(hashlib.sha256(f"{seed}:{h}:{attempt}".encode()).hexdigest()[:8], 16) / 2**32
            if draw < p429:
                bump("http_429")
                return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, b"retry-after: 1\r\n"
            if draw < p429 + p500:
                bump("http_500")
                return 500, {"error": {"message": "injected failure", "type": "server_error"}}, b""
            if draw < p429 + p500 + pslow:
                bump("slow")
                await asyncio.sleep(slow_s)
            elif latency > 0:
                async with busy:
                    await asyncio.sleep(latency)
            if judge:
                text = json.dumps({"rationale": f"judged {h[:8]}", "score": 1 + int(h[8:16], 16) % 10})
            else:
                text = f"[r:{h[:16]}] " + " ".join(WORDS[int(h[i : i + 2], 16) % len(WORDS)] for i in range(16, 56, 2))
            bump("ok")
            stats["last_answer_at"] = time.time()
            usage = {"prompt_tokens": len(body) // 4, "completion_tokens": 24, "total_tokens": len(body) // 4 + 24}
            return 200, {
                "id": f"chatcmpl-{h[:12]}", "object": "chat.completion", "created": 0, "model": req.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            }, b""  # fmt: skip
        finally:
            bump("inflight", -1)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = next((int(v) for k, _, v in (x.partition(":") for x in lines[1:])
                               if k.strip().lower() == "content-length"), 0)  # fmt: skip
                body = await reader.readexactly(length) if length else b""
                status, data, extra = await answer(method, path.split("?", 1)[0], body)
                payload = json.dumps(data).encode()
                writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
                             % (status, reasons[status], len(payload), extra) + payload)  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(connection, "127.0.0.1", 0, backlog=4096)
        print(f"port: {server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class Loopback:
    """The server in its own process (own session), stopped by its pid on exit."""

    def __init__(self, latency: float = 0.2, p429: float = 0, p500: float = 0, pslow: float = 0,
                 slow_s: float = 6.0, seed: int = 0, slots: int = 0) -> None:  # fmt: skip
        cmd = [sys.executable, __file__, "serve", "--latency", str(latency), "--p429", str(p429), "--p500",
               str(p500), "--pslow", str(pslow), "--slow-s", str(slow_s), "--seed", str(seed),
               "--slots", str(slots)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("port: "):
            self.close()
            raise RuntimeError("the loopback server did not start")
        self.root = f"http://127.0.0.1:{int(line.split()[1])}"
        self.url = self.root + "/v1"

    def stats(self) -> dict[str, int]:
        import httpx2 as httpx

        return httpx.get(self.root + "/stats", timeout=30).json()

    def reset(self) -> None:
        import httpx2 as httpx

        httpx.post(self.root + "/reset", timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- jobs and commands -----------------------------------------------------------------------------------
def prompt_texts(n: int, tag: str = "") -> list[str]:
    return [f"Bench prompt {tag}{i}: explain topic number {i} in two sentences." for i in range(n)]


def write_job(folder: Path, url: str, prompts: int, *, concurrency: int, samples: int = 2, timeout_s: float = 300,
              retries: int = 3, tag: str = "", chunk_size: int | None = None) -> Path:  # fmt: skip
    """A prompts file and a config; returns the config's path."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"prompts-{tag}{prompts}.jsonl"
    if not path.exists():
        with path.open("w") as f:
            for text in prompt_texts(prompts, tag):
                f.write(json.dumps({"prompt": text}) + "\n")
    model = {"name": "loop", "base_url": url, "model": "loop", "max_concurrency": concurrency,
             "timeout_s": timeout_s, "max_retries": retries}  # fmt: skip
    config: dict[str, Any] = {
        "name": "engine-bench",
        "prompts": {"path": str(path)},
        "generation": {"models": [model], "samples_per_prompt": samples, "sampling": SAMPLING},
        "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
        "curation": {"min_margin": 1},
        "warehouse": str(folder / "unused.duckdb"),
    }
    if chunk_size:
        config["chunk_size"] = chunk_size
    out = folder / f"job-{tag}{prompts}-c{concurrency}-t{timeout_s:g}.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


class Run:
    """One finished (or killed) command: return code, output, wall seconds, peak RSS of its process tree."""

    def __init__(self, rc: int, out: str, err: str, seconds: float, peak_mib: float, timed_out: bool,
                 rss: list[tuple[float, float]] | None = None) -> None:  # fmt: skip
        self.rc, self.out, self.err = rc, out, err
        self.seconds, self.peak_mib, self.timed_out = seconds, peak_mib, timed_out
        self.rss = rss or []  # (wall clock, MiB of the process tree), one sample a tick
        self.ended_at = time.time()  # wall clock, to compare with the loopback server's timestamps

    @property
    def started_at(self) -> float:
        return self.ended_at - self.seconds

    @property
    def timings(self) -> dict[str, float]:
        """The `timings: imports=.. api=.. total=..` line, when the CLI prints one."""
        for line in self.out.splitlines():
            if line.startswith("timings:"):
                return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", line)}
        return {}


def prefsynth_env(home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home or PREFECT_HOME), "HF_HUB_OFFLINE": "1"}
    if SRC:
        env["PYTHONPATH"] = SRC
    return env


def run_cmd(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> Run:
    """Run `cmd` in its own session, sampling its tree's RSS; killed (whole group) after `timeout`."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True, start_new_session=True)
        samples: list[tuple[float, float]] = []
        timed_out = False
        while proc.poll() is None:
            samples.append((time.time(), _tree_rss(proc.pid)))
            if time.perf_counter() - start > timeout:
                timed_out = True
                kill_group(proc)
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)  # returns when it ends: the wall time is exact, not rounded up to a tick
        proc.wait()
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        peak = max((mib for _, mib in samples), default=0.0)
        return Run(proc.returncode, out.read(), err.read(), seconds, peak, timed_out, samples)


def prefsynth(config: Path, db: Path, env: dict[str, str] | None = None, timeout: float = 3600) -> Run:
    cmd = [str(Path(sys.executable).parent / "prefsynth"), "run", str(config), "--db", str(db)]
    run = run_cmd(cmd, env or prefsynth_env(), timeout)
    if run.rc != 0 and "ephemeral Prefect API" in run.err:  # Prefect's start-up limit: once more, noted
        print(f"note: Prefect's temporary API timed out; rerunning {config.name}", file=sys.stderr, flush=True)
        run = run_cmd(cmd, env or prefsynth_env(), timeout)
    return run


def check(run: Run, what: str) -> None:
    if run.rc != 0:
        raise RuntimeError(f"{what} failed ({run.rc}{', timed out' if run.timed_out else ''}):\n{run.err[-3000:]}")


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_group(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the process group of `proc`; returns pids of its tree that outlived it (then killed by pid)."""
    tree = descendants(proc.pid)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    left = sorted({p for p in tree if p != proc.pid and alive(p)} | {int(p) for p in group if alive(int(p))})
    for pid in left:  # processes this bench started: stop them so the next run starts clean
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def query(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def final_pairs(db: Path) -> set[str]:
    rows = query(db, "SELECT p.pair_id FROM run_pairs p WHERE p.run_id = (SELECT r.run_id FROM runs r JOIN run_ends e "
                     "USING (run_id) WHERE e.status = 'completed' ORDER BY r.started_at DESC LIMIT 1)")  # fmt: skip
    return {r for (r,) in rows}


def paid_twice(db: Path) -> int:
    return query(db, "SELECT count(*) FROM (SELECT call_id FROM model_calls WHERE status = 'ok' "
                     "GROUP BY call_id HAVING count(*) > 1)")[0][0]  # fmt: skip


# ---- the openai SDK arm (a subprocess, like prefsynth) -----------------------------------------------------
def generation_bodies(prompts: int, samples: int, tag: str = "") -> list[dict]:
    """What prefsynth's generate stage sends: the user turn, sampling params, seed + sample index."""
    params = {k: v for k, v in SAMPLING.items() if k != "seed"}
    return [{"messages": [{"role": "user", "content": text}], **params, "seed": SAMPLING["seed"] + i}
            for text in prompt_texts(prompts, tag) for i in range(samples)]  # fmt: skip


def judge_bodies(db: Path) -> dict[str, dict]:
    """Judge requests from prefsynth's ledger, by the marker of the response they judge."""
    out = {}
    for (request,) in query(db, "SELECT DISTINCT request FROM model_calls WHERE request LIKE '%response_format%'"):
        body = json.loads(request)
        found = MARKER.search(body["messages"][-1]["content"])
        if found:
            out[found.group(1)] = body
    return out


def fallback_judge(text: str) -> dict:
    schema = {"type": "object", "properties": {"rationale": {"type": "string"}, "score": {"type": "integer"}},
              "required": ["rationale", "score"]}  # fmt: skip
    user = f"Rate the response from 1 to 10.\n\n[Response to evaluate]\n{text}\n\nReply with only a JSON object."
    return {"messages": [{"role": "system", "content": "You are an evaluator."}, {"role": "user", "content": user}],
            "temperature": 0.0, "max_tokens": 160, "seed": 0, "response_format": {
                "type": "json_schema", "json_schema": {"name": "judgment", "schema": schema}}}  # fmt: skip


async def sdk_job(url: str, gen: list[dict], judges: dict[str, dict], concurrency: int, timeout: float,
                  retries: int, aiohttp: bool = False) -> dict[str, float]:  # fmt: skip
    import httpx2
    import openai

    # aiohttp: the SDK's own aiohttp transport with a slot per request in flight, as prefsynth uses it
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    http = openai.DefaultAioHttpClient(limits=limits) if aiohttp else None
    client = openai.AsyncOpenAI(base_url=url, api_key="not-needed", timeout=timeout, max_retries=retries,
                                http_client=http)  # fmt: skip
    sem = asyncio.Semaphore(concurrency)
    counts = {"calls": 0, "failed": 0, "judged": 0, "fallback_judge_bodies": 0}

    async def call(body: dict) -> str | None:
        async with sem:
            counts["calls"] += 1
            try:
                done = await client.chat.completions.create(model="loop", **body)
                return done.choices[0].message.content or ""
            except openai.APIError:
                counts["failed"] += 1
                return None

    async def item(body: dict) -> None:
        text = await call(body)
        if text is None:
            return
        found = MARKER.search(text)
        judge = judges.get(found.group(1)) if found else None
        if judge is None:
            counts["fallback_judge_bodies"] += 1
            judge = fallback_judge(text)
        if await call(judge) is not None:
            counts["judged"] += 1

    start = time.perf_counter()
    await asyncio.gather(*(item(b) for b in gen))
    counts["seconds"] = time.perf_counter() - start
    await client.close()
    return counts


def sdk(url: str, bodies: Path, concurrency: int, timeout: float = 300, retries: int = 3,
        aiohttp: bool = False) -> tuple[Run, dict]:  # fmt: skip
    cmd = [sys.executable, __file__, "sdk", "--url", url, "--bodies", str(bodies), "--concurrency", str(concurrency),
           "--timeout", str(timeout), "--retries", str(retries), *(["--aiohttp"] if aiohttp else [])]  # fmt: skip
    run = run_cmd(cmd)
    check(run, "the SDK arm")
    return run, json.loads(run.out.strip().splitlines()[-1])


def sdk_startup() -> float:
    """Seconds for a new Python process to import the openai SDK and exit (the best of three)."""
    def once() -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import openai"], check=True)
        return time.perf_counter() - start

    return min(once() for _ in range(3))


def sdk_bodies(folder: Path, db: Path, prompts: int, samples: int = 2) -> tuple[Path, float]:
    """Bodies for the SDK arm; and the share of its generation bodies that prefsynth's ledger holds too."""
    gen = generation_bodies(prompts, samples)
    ledger = {json.dumps(json.loads(r), sort_keys=True) for (r,) in query(
        db, "SELECT DISTINCT request FROM model_calls WHERE request NOT LIKE '%response_format%'")}  # fmt: skip
    same = sum(json.dumps(b, sort_keys=True) in ledger for b in gen) / len(gen)
    path = folder / f"bodies-{prompts}.json"
    path.write_text(json.dumps({"generate": gen, "judge": judge_bodies(db)}))
    return path, same


# ---- arms -------------------------------------------------------------------------------------------------
def ceiling(folder: Path, calls: int, concurrencies: list[int], distilabel: bool, r: dict[str, Any]) -> None:
    prompts = calls // 4  # 2 samples + 2 judge calls per prompt
    with Loopback(latency=0.2) as server:
        for c in concurrencies:
            name = f"ceiling_{calls}_c{c}"
            config = write_job(folder, server.url, prompts, concurrency=c)
            db = folder / f"{name}.duckdb"
            server.reset()
            run = prefsynth(config, db, timeout=3600)
            check(run, f"prefsynth run ({name})")
            r[f"{name}_prefsynth_seconds"] = run.seconds
            r[f"{name}_prefsynth_calls"] = server.stats().get("requests", 0)
            r[f"{name}_prefsynth_max_inflight"] = server.stats().get("max_inflight", 0)
            r[f"{name}_prefsynth_pairs"] = len(final_pairs(db))
            stats = server.stats()  # where the command's time went: before the first request, after the last answer
            r[f"{name}_prefsynth_before_first_request_seconds"] = stats["first_request_at"] - run.started_at
            r[f"{name}_prefsynth_after_last_answer_seconds"] = run.ended_at - stats["last_answer_at"]
            bodies, same = sdk_bodies(folder, db, prompts)
            server.reset()
            _, out = sdk(server.url, bodies, c)
            r[f"{name}_sdk_seconds"], r[f"{name}_sdk_calls"] = out["seconds"], server.stats().get("requests", 0)
            r[f"{name}_sdk_same_generation_bodies"] = same
            r[f"{name}_sdk_fallback_judge_bodies"] = out["fallback_judge_bodies"]
            r[f"{name}_prefsynth_vs_sdk"] = run.seconds / out["seconds"]
            # the SDK as a whole command too: a Python process that imports openai, then sends the calls
            r[f"{name}_sdk_command_seconds"] = sdk_startup() + out["seconds"]
            r[f"{name}_prefsynth_vs_sdk_command"] = run.seconds / r[f"{name}_sdk_command_seconds"]
            server.reset()
            _, fast = sdk(server.url, bodies, c, aiohttp=True)
            r[f"{name}_sdk_aiohttp_seconds"] = fast["seconds"]
            r[f"{name}_sdk_aiohttp_calls"] = server.stats().get("requests", 0)
            r[f"{name}_prefsynth_vs_sdk_aiohttp"] = run.seconds / fast["seconds"]
            for arm in ("prefsynth", "sdk", "sdk_aiohttp"):
                r[f"{name}_{arm}_ms_per_call"] = 1000 * r[f"{name}_{arm}_seconds"] / max(1, r[f"{name}_{arm}_calls"])
            db.unlink(missing_ok=True)
        if distilabel:
            from bench.pipeline import distilabel_python, distilabel_run

            texts = folder / f"texts-{prompts}.json"
            texts.write_text(json.dumps(prompt_texts(prompts)))
            server.reset()
            try:
                out, peak = distilabel_run(distilabel_python(), server.url, texts, folder / f"dl-cache-{calls}")
                name = f"ceiling_{calls}_distilabel"
                r[f"{name}_seconds"], r[f"{name}_calls"] = out["wall"], server.stats().get("requests", 0)
                r[f"{name}_ms_per_call"] = 1000 * out["wall"] / max(1, r[f"{name}_calls"])
                r[f"{name}_pairs"], r[f"{name}_peak_rss_mib"] = out["pairs"], peak
            except Exception as err:  # noqa: BLE001 - reported, the other arms stand
                r[f"ceiling_{calls}_distilabel"] = f"could not run: {str(err)[-300:]}"


def faults(folder: Path, calls: int, r: dict[str, Any]) -> None:
    prompts, c = calls // 4, 16
    with Loopback(latency=0.2, p429=0.05, p500=0.10, pslow=0.02, slow_s=6.0) as server:
        config = write_job(folder, server.url, prompts, concurrency=c, timeout_s=5, retries=3, tag="f")
        db = folder / "faults.duckdb"
        server.reset()
        run = prefsynth(config, db)
        check(run, "prefsynth run (faults)")
        s = server.stats()
        r["faults_prefsynth_seconds"], r["faults_prefsynth_requests"] = run.seconds, s.get("requests", 0)
        r["faults_injected_429_500_slow"] = f"{s.get('http_429', 0)}/{s.get('http_500', 0)}/{s.get('slow', 0)}"
        failed_ids = {i for (i,) in query(db, "SELECT DISTINCT call_id FROM model_calls WHERE status <> 'ok' "
                                              "AND call_id NOT IN (SELECT call_id FROM model_calls "
                                              "WHERE status = 'ok')")}  # fmt: skip
        r["faults_prefsynth_calls_out_of_retries"] = len(failed_ids)
        r["faults_prefsynth_failures_rows"] = query(db, "SELECT count(*) FROM failures")[0][0]
        gen = [b for b in generation_bodies(prompts, 2, "f")]
        path = folder / "bodies-faults.json"
        path.write_text(json.dumps({"generate": gen, "judge": judge_bodies(db)}))
        server.reset()
        _, out = sdk(server.url, path, c, timeout=5, retries=3)
        s = server.stats()
        r["faults_sdk_seconds"], r["faults_sdk_requests"] = out["seconds"], s.get("requests", 0)
        r["faults_sdk_calls_out_of_retries"] = out["failed"]
        r["faults_prefsynth_vs_sdk"] = run.seconds / out["seconds"]
        server.reset()
        _, fast = sdk(server.url, path, c, timeout=5, retries=3, aiohttp=True)
        r["faults_sdk_aiohttp_seconds"] = fast["seconds"]
        r["faults_prefsynth_vs_sdk_aiohttp"] = run.seconds / fast["seconds"]
        # the rerun: only the calls that have no answer yet (and judge calls of newly generated responses)
        ok_before = {i for (i,) in query(db, "SELECT DISTINCT call_id FROM model_calls WHERE status = 'ok'")}
        runs_before = {i for (i,) in query(db, "SELECT run_id FROM runs")}
        server.reset()
        rerun = prefsynth(config, db)
        check(rerun, "prefsynth rerun (faults)")
        new_run = [i for (i,) in query(db, "SELECT run_id FROM runs") if i not in runs_before]
        rows = query(db, "SELECT call_id FROM model_calls WHERE run_id = ?", new_run[:1])
        r["faults_rerun_seconds"] = rerun.seconds
        r["faults_rerun_calls"] = len(rows)
        r["faults_rerun_calls_already_answered"] = sum(1 for (i,) in rows if i in ok_before)
        r["faults_rerun_retried_failed_calls"] = sum(1 for (i,) in rows if i in failed_ids)


def kill_loop(folder: Path, runs: int, seed: int, r: dict[str, Any]) -> None:
    rng = random.Random(seed)
    with Loopback(latency=0.2) as server:
        config = write_job(folder, server.url, 100, concurrency=8, tag="k")
        ref_db = folder / "kill-ref.duckdb"
        server.reset()
        ref = prefsynth(config, ref_db)
        check(ref, "prefsynth run (kill reference)")
        ref_requests = server.stats().get("requests", 0)
        ref_pairs = final_pairs(ref_db)
        r["kill_job_calls"], r["kill_uninterrupted_seconds"] = ref_requests, ref.seconds
        r["kill_uninterrupted_pairs"] = len(ref_pairs)
        cmd = [str(Path(sys.executable).parent / "prefsynth"), "run", str(config)]
        twice = unresumable = leftovers = same = done_before_kill = extra = 0
        why = ""
        for i in range(runs):
            db = folder / f"kill-{i}.duckdb"
            at = rng.uniform(0.5, ref.seconds)
            server.reset()
            proc = subprocess.Popen([*cmd, "--db", str(db)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=prefsynth_env(), start_new_session=True)  # fmt: skip
            try:
                proc.wait(at)
                done_before_kill += 1
            except subprocess.TimeoutExpired:
                leftovers += len(kill_group(proc))
            resumed = False
            for _ in range(3):
                run = prefsynth(config, db, timeout=600)
                if run.rc == 0:
                    resumed = True
                    break
                why = next((x for x in run.err.splitlines() if "Error" in x or "Exception" in x), run.err[-300:])
                print(f"kill run {i}: resume failed ({run.rc}): {why.strip()[:400]}", file=sys.stderr, flush=True)
            if not resumed:
                unresumable += 1
                r["kill_resume_error"] = why.strip()[:300]
                continue
            twice += paid_twice(db)
            same += final_pairs(db) == ref_pairs
            extra += server.stats().get("requests", 0) - ref_requests
            db.unlink(missing_ok=True)
        r["kill_runs"], r["kill_finished_before_kill"] = runs, done_before_kill
        r["kill_calls_paid_twice"], r["kill_runs_not_resumed"] = twice, unresumable
        r["kill_runs_same_pairs_as_uninterrupted"] = f"{same}/{runs - unresumable}"
        r["kill_leftover_processes"] = leftovers
        r["kill_extra_requests_per_run"] = extra / max(1, runs - unresumable)


def fixed_cost(folder: Path, r: dict[str, Any]) -> None:
    with Loopback(latency=0.2) as server:
        config = write_job(folder, server.url, 10, concurrency=16, tag="x")
        db = folder / "fixed.duckdb"
        cases = [("cold", db, None), ("cold_empty_prefect_home", folder / "fixed-home.duckdb", folder / "prefect-home"),
                 ("cached_rerun", db, None)]  # fmt: skip
        for name, path, home in cases:
            if home is not None:
                shutil.rmtree(home, ignore_errors=True)
                home.mkdir()
            server.reset()
            run = prefsynth(config, path, prefsynth_env(home))
            check(run, f"prefsynth run (fixed {name})")
            r[f"fixed_{name}_seconds"] = run.seconds
            r[f"fixed_{name}_calls"] = server.stats().get("requests", 0)
            for key, value in run.timings.items():
                r[f"fixed_{name}_{key}_seconds"] = value
            if not run.timings:
                r[f"fixed_{name}_split"] = "n/a (no timings line)"


def memory(folder: Path, sizes: list[int], timeout: float, r: dict[str, Any]) -> None:
    with Loopback(latency=0.0) as server:
        for n in sizes:
            config = write_job(folder, server.url, n, concurrency=256, samples=1, tag="m")
            db = folder / f"memory-{n}.duckdb"
            server.reset()
            run = prefsynth(config, db, timeout=timeout)
            name = f"memory_{n}"
            r[f"{name}_peak_rss_mib"], r[f"{name}_seconds"] = run.peak_mib, run.seconds
            stats = server.stats()
            r[f"{name}_requests"] = stats.get("requests", 0)
            if "last_answer_at" in stats:  # the stream apart from the end (curation reads the run's columns)
                r[f"{name}_stream_peak_rss_mib"] = max(
                    (mib for at, mib in run.rss if at <= stats["last_answer_at"]), default=0.0)
            if run.timed_out:
                calls = r[f"{name}_requests"]
                r[f"{name}_note"] = f"stopped at the {timeout:.0f} s limit after {calls} of {2 * n} calls"
            else:
                check(run, f"prefsynth run ({name})")
            db.unlink(missing_ok=True)
            Path(str(db) + ".wal").unlink(missing_ok=True)
        done = [n for n in sizes if f"memory_{n}_note" not in r]
        if len(done) > 1:
            r["memory_peak_growth"] = r[f"memory_{done[-1]}_peak_rss_mib"] / r[f"memory_{done[0]}_peak_rss_mib"]
            if all(f"memory_{n}_stream_peak_rss_mib" in r for n in (done[0], done[-1])):
                r["memory_stream_peak_growth"] = (r[f"memory_{done[-1]}_stream_peak_rss_mib"]
                                                  / r[f"memory_{done[0]}_stream_peak_rss_mib"])


SRC: str | None = None


def main() -> int:
    global SRC
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="run the loopback server (prints `port: N`)")
    for flag, default in (("--latency", 0.2), ("--p429", 0.0), ("--p500", 0.0), ("--pslow", 0.0), ("--slow-s", 6.0)):
        s.add_argument(flag, type=float, default=default)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--slots", type=int, default=0, help="answers computed at once (0: unlimited)")
    k = sub.add_parser("sdk", help="the openai SDK arm")
    k.add_argument("--url", required=True)
    k.add_argument("--bodies", required=True)
    k.add_argument("--concurrency", type=int, required=True)
    k.add_argument("--timeout", type=float, default=300)
    k.add_argument("--retries", type=int, default=3)
    k.add_argument("--aiohttp", action="store_true", help="the SDK's aiohttp transport")
    parser.add_argument("--quick", action="store_true", help="3k calls at C=64, 3 kill runs, 10k prompts memory")
    parser.add_argument("--parts", default="ceiling,faults,kill,fixed,memory")
    parser.add_argument("--calls", help="ceiling sizes (calls), default 12000,120000 (quick: 3000)")
    parser.add_argument("--concurrency", help="ceiling max_concurrency values, default 64,256 (quick: 64)")
    parser.add_argument("--no-distilabel", action="store_true")
    parser.add_argument("--kill-runs", type=int)
    parser.add_argument("--memory-sizes", help="default 10000,100000 (quick: 10000); 1000000 adds about 40 min")
    parser.add_argument("--memory-timeout", type=float, default=3600, help="seconds per memory run")
    parser.add_argument("--src", help="import prefsynth from this src folder (e.g. an exported commit)")
    parser.add_argument("--label", default="", help="added to the recorded title")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args.latency, args.p429, args.p500, args.pslow, args.slow_s, args.seed, args.slots)
        return 0
    if args.cmd == "sdk":
        data = json.loads(Path(args.bodies).read_text())
        out = asyncio.run(sdk_job(args.url, data["generate"], data["judge"], args.concurrency, args.timeout,
                                  args.retries, args.aiohttp))  # fmt: skip
        print(json.dumps(out))
        return 0
    SRC = str(Path(args.src).resolve()) if args.src else None
    parts = args.parts.split(",")
    calls = [int(x) for x in (args.calls or ("3000" if args.quick else "12000,120000")).split(",")]
    concurrencies = [int(x) for x in (args.concurrency or ("64" if args.quick else "64,256")).split(",")]
    sizes = [int(x) for x in (args.memory_sizes or ("10000" if args.quick else "10000,100000")).split(",")]
    PREFECT_HOME.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {}
    failed = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as tmp:
        folder = Path(tmp)
        steps = {
            "ceiling": lambda: [ceiling(folder / f"ceiling-{n}", n, concurrencies,
                                        not (args.quick or args.no_distilabel) and n == calls[0], r) for n in calls],
            "faults": lambda: faults(folder / "faults", 4000, r),
            "kill": lambda: kill_loop(folder / "kill", args.kill_runs or (3 if args.quick else 20), 0, r),
            "fixed": lambda: fixed_cost(folder / "fixed", r),
            "memory": lambda: memory(folder / "memory", sizes, args.memory_timeout, r),
        }  # fmt: skip
        for part in parts:
            t0 = time.perf_counter()
            try:
                steps[part]()
            except Exception as err:  # noqa: BLE001 - one arm that cannot run does not hide the others
                failed.append(part)
                print(f"engine bench {part} could not run: {err}", file=sys.stderr, flush=True)
            print(f"# engine {part} took {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    emit_all(r)
    for part, goal in GOALS.items():
        if part in parts:
            emit(f"goal_{part}", goal)
    if args.record and r:
        lines = [f"job: loopback server (0.2 s a call, unlimited parallelism; memory arm 0 s), P prompts x 2 samples "
                 f"+ pointwise judge = 4P calls; took {time.perf_counter() - started:.0f} s",
                 *[f"goal {p}: {g}" for p, g in GOALS.items() if p in parts],
                 *result_lines(r)]  # fmt: skip
        if failed:
            lines.append(f"could not run: {', '.join(failed)}")
        append_results(f"Engine bench {args.label}".strip(), command("bench/engine.py"), lines)
    if failed:
        print(f"engine benchmarks that could not run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
