"""Replicas of one endpoint (`base_urls`): requests spread by free slots, a failing replica is taken out and
probed back, its requests retried on the others, and the cache never knows which replica answered.

The fast tests use loopback fake servers (orchestration only); the `model` test runs two real llama.cpp
servers of SmolLM2 and SIGKILLs one mid-run."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from typer.testing import CliRunner

from prefsynth.backends import replicas as replicas_mod
from prefsynth.backends.client import ClientPool, Endpoint
from prefsynth.backends.replicas import TAKE_OUT_AFTER, ReplicaSet
from prefsynth.cli import app
from prefsynth.flows.synthesize import synthesize
from prefsynth.schemas.config import ModelSpec
from prefsynth.schemas.records import ModelCall
from tests.conftest import small_config, write_jsonl
from tests.fake_server import FakeOpenAI, deterministic_reply


class Replica(FakeOpenAI):
    """Deterministic answers after `latency_s`; counts requests in flight (and their peak); answers 500 while
    `broken` is set."""

    def __init__(self, latency_s: float = 0.02) -> None:
        self.lock = threading.Lock()
        self.inflight = self.peak = 0
        self.broken = False

        def respond(body):
            with self.lock:
                self.inflight += 1
                self.peak = max(self.peak, self.inflight)
            try:
                if self.broken:
                    return 500, {"error": {"message": "replica down"}}
                time.sleep(latency_s)
                return deterministic_reply(body)
            finally:
                with self.lock:
                    self.inflight -= 1

        super().__init__(respond)

    def keep(self, path, body):
        with self.lock:
            super().keep(path, body)

    def models(self):
        return (500, {"error": {"message": "replica down"}}) if self.broken else super().models()


def _endpoint(replicas: list[tuple[str, int]], retries: int = 0) -> Endpoint:
    return Endpoint(label="r", identity="m@r1", base_url=replicas[0][0], model="m", api_key="k",
                    concurrency=sum(n for _, n in replicas), timeout_s=10, max_retries=retries, is_local=False,
                    replicas=tuple(replicas))  # fmt: skip


def _chat_all(ep: Endpoint, n: int, tag: str = "") -> list[ModelCall]:
    async def main() -> list[ModelCall]:
        async with ClientPool([ep]) as pool:
            client = pool.client(ep)
            bodies = [{"messages": [{"role": "user", "content": f"q{tag}{i}"}], "max_tokens": 4} for i in range(n)]
            return [o.call for o in await asyncio.gather(*(client.chat(b) for b in bodies))]

    return asyncio.run(main())


# ---- config and identity --------------------------------------------------------------------------------
def test_base_urls_config_rules():
    one = ModelSpec(base_url="http://a:1/v1", model="m")
    assert ModelSpec(base_urls=["http://a:1/v1/"], model="m").identity == one.identity  # one server: same model
    two = ModelSpec(base_urls=["http://a:1/v1", {"base_url": "http://b:2/v1", "max_concurrency": 2}], model="m",
                    max_concurrency=5, revision="r1")  # fmt: skip
    assert two.servers == [("http://a:1/v1", 5), ("http://b:2/v1", 2)]
    swapped = ModelSpec(base_urls=["http://b:2/v1", "http://a:1/v1"], model="m", revision="r1")
    assert two.identity == swapped.identity == ModelSpec(base_url="http://c:3/v1", model="m", revision="r1").identity
    assert "base_urls" not in one.model_dump()  # a stored config without replicas keeps its old form
    for bad, words in (({"base_url": "http://a/v1", "base_urls": ["http://b/v1"]}, "not both"),
                       ({"base_urls": ["http://a/v1", "http://b/v1"]}, "need `revision`"),
                       ({"base_urls": []}, "at least one"),
                       ({"base_urls": ["http://a/v1", "http://a/v1/"], "revision": "r"}, "twice"),
                       ({"base_urls": ["http://a/v1", "ftp://b"], "revision": "r"}, "http://"),
                       ({"base_urls": ["http://a/v1", "http://u:p@b/v1"], "revision": "r"}, "credentials"),
                       ({"base_urls": ["http://a/v1", "http://b/v1"], "revision": "r", "batch": True}, "batch"),
                       ({"base_url": "http://a/v1", "replicas": 2}, "`gguf`")):
        with pytest.raises(ValueError, match=words):
            ModelSpec(model="m", **bad)


def test_the_replica_with_most_free_slots_gets_the_next_request():
    async def main() -> list[str]:
        pool = ReplicaSet([("a", 2), ("b", 6)], probe=lambda url: asyncio.sleep(0, True))
        return [(await pool.acquire()).url for _ in range(8)]

    order = asyncio.run(main())
    assert order == ["a", "b", "b", "b", "a", "b", "b", "b"]  # least load / slots first, ties to the first listed


# ---- against loopback servers ----------------------------------------------------------------------------
def test_a_run_starts_when_one_replica_answers_and_fails_fast_when_none_does():
    from prefsynth.backends.client import check_reachable
    from prefsynth.errors import EndpointError

    with Replica() as down:
        dead = down.base_url  # closed: its port refuses connections
    with Replica() as up:
        asyncio.run(check_reachable(_endpoint([(dead, 1), (up.base_url, 1)])))  # one answers: the run may start
    with pytest.raises(EndpointError, match="unreachable"):
        asyncio.run(check_reachable(_endpoint([(dead, 1), (dead.replace("/v1", "/w1"), 1)])))


def test_requests_spread_over_replicas_by_free_slots():
    with Replica() as a, Replica() as b:
        calls = _chat_all(_endpoint([(a.base_url, 2), (b.base_url, 6)]), 80)
    assert all(c.status == "ok" for c in calls) and len(calls) == 80
    assert len(a.requests) + len(b.requests) == 80  # each call once
    assert a.peak <= 2 and b.peak <= 6  # no replica ever held more than its slots
    assert len(b.requests) > len(a.requests) > 0  # both served, the bigger one more
    served = {c.endpoint for c in calls}
    assert served == {a.base_url, b.base_url} and all(c.failed_on == [] for c in calls)


def test_a_failing_replica_is_taken_out_its_requests_move_and_it_is_probed_back(monkeypatch):
    monkeypatch.setattr(replicas_mod, "COOLDOWN_S", 0.05)
    with Replica() as a, Replica() as b:
        a.broken = True
        ep = _endpoint([(a.base_url, 1), (b.base_url, 1)], retries=0)

        async def main() -> tuple[list[ModelCall], list[ModelCall], bool]:
            async with ClientPool([ep]) as pool:
                client = pool.client(ep)

                async def run(tag: str, n: int) -> list[ModelCall]:
                    bodies = [{"messages": [{"role": "user", "content": f"{tag}{i}"}]} for i in range(n)]
                    return [o.call for o in await asyncio.gather(*(client.chat(x) for x in bodies))]

                first = await run("x", 20)
                out = not pool._limits[ep.servers].replicas.replicas[0].in_service
                a.broken = False
                for _ in range(400):  # the probe puts it back (cooldown patched to 0.05 s)
                    if pool._limits[ep.servers].replicas.replicas[0].in_service:
                        break
                    await asyncio.sleep(0.05)
                return first, await run("y", 20), out

        first, second, was_out = asyncio.run(main())
    # max_retries is 0, yet every call succeeded: a move to an untried replica spends no retry
    assert all(c.status == "ok" for c in first + second)
    assert was_out
    moved = [c for c in first if c.failed_on]
    assert len(moved) == TAKE_OUT_AFTER  # the replica got 3 requests in a row wrong, then none until probed
    assert all(c.failed_on == [a.base_url] and c.endpoint == b.base_url and c.attempts == 2 for c in moved)
    assert sum(1 for r in a.requests if r["messages"][0]["content"].startswith("x")) == TAKE_OUT_AFTER
    assert any(c.endpoint == a.base_url for c in second)  # back in service, it gets requests again


def test_when_every_replica_fails_the_calls_fail_as_on_one_server_and_are_recorded():
    with Replica() as a, Replica() as b:
        a.broken = b.broken = True
        calls = _chat_all(_endpoint([(a.base_url, 1), (b.base_url, 1)], retries=1), 3)
    assert [c.status for c in calls] == ["error"] * 3 and all("HTTP 500" in (c.error or "") for c in calls)
    # one free move to the other replica, then the one retry: 3 attempts each, all recorded
    assert [c.attempts for c in calls] == [3, 3, 3] and all(len(c.failed_on or []) == 3 for c in calls)
    assert len(a.requests) + len(b.requests) == 9


def test_the_cache_does_not_know_which_replica_answered(tmp_path, prefect_harness):
    with Replica(latency_s=0) as a, Replica(latency_s=0) as b:
        def config(**servers):
            model = {"name": "m", "model": "m", "revision": "r1", "max_retries": 0, **servers}
            return small_config(tmp_path, write_jsonl(tmp_path / "p.jsonl", [f"Question {i}?" for i in range(6)]),
                                generation={"models": [model], "samples_per_prompt": 2,
                                            "sampling": {"max_tokens": 8, "seed": 1}},
                                scorers=[{"kind": "pointwise_judge", "name": "judge", "model": model}])  # fmt: skip

        cfg = config(base_urls=[a.base_url, {"base_url": b.base_url, "max_concurrency": 3}])
        first = synthesize(config=cfg)
        made = len(a.requests) + len(b.requests)
        swapped = synthesize(config=config(base_urls=[b.base_url, a.base_url]))
        only_b = synthesize(config=config(base_url=b.base_url))
        after = len(a.requests) + len(b.requests)
    assert first.status == swapped.status == only_b.status == "completed"
    assert made == 24 and a.requests and b.requests  # the precondition: both replicas answered a real run
    assert after == made  # the reruns, with the replicas swapped or one server left, were all cache hits
    import duckdb

    with duckdb.connect(str(cfg.warehouse), read_only=True) as con:  # and the rows they made are the same rows
        assert con.execute("SELECT count(*), count(DISTINCT model_identity) FROM responses").fetchone() == (12, 1)
        assert con.execute("SELECT count(*) FROM scorers").fetchone() == (1,)
    out = CliRunner().invoke(app, ["stats", "--db", str(cfg.warehouse), "--json"])
    assert out.exit_code == 0, out.output
    rows = {r["replica"]: r for r in json.loads(out.output)["replicas"]}
    assert set(rows) == {a.base_url, b.base_url} and sum(r["answered"] for r in rows.values()) == 24
    assert all(r["failed_requests"] == 0 for r in rows.values())
    shown = CliRunner().invoke(app, ["stats", "--db", str(cfg.warehouse)], env={"COLUMNS": "200"})
    assert "replicas: calls each answered" in shown.output and a.base_url in shown.output


# ---- two real llama.cpp servers, one SIGKILLed mid-run ------------------------------------------------------
@pytest.mark.model
def test_two_real_llama_servers_one_killed_mid_run_the_run_completes_and_no_call_is_made_twice(
    tmp_path, prefect_harness
):
    import os
    import signal

    import duckdb

    from prefsynth.backends.local import LocalServer, resolve_gguf
    from tests.fault_proxy import FaultProxy

    path, identity = resolve_gguf("smollm2-135m-instruct")
    survivor, victim = (LocalServer(path, identity, 2048, 1) for _ in range(2))
    try:
        for server in (survivor, victim):
            server.launch()
        for server in (survivor, victim):
            server.wait_ready()
        with FaultProxy(survivor.base_url, rates={}) as proxy:  # no faults: it counts the survivor's requests
            model = {"name": "smol", "model": "smollm2-135m-instruct", "server": "llama-cpp", "revision": identity,
                     "base_urls": [proxy.base_url, victim.base_url], "max_concurrency": 1, "max_retries": 1}
            config = small_config(
                tmp_path, write_jsonl(tmp_path / "p.jsonl", ["Name a color.", "What is 2 + 2?", "Name a fruit.",
                                                             "What do cows eat?"]),
                generation={"models": [model], "samples_per_prompt": 2,
                            "sampling": {"temperature": 1.0, "max_tokens": 8, "seed": 1}},
                scorers=[{"kind": "pointwise_judge", "model": model, "max_tokens": 40}])  # fmt: skip
            killed_after: list[int] = []

            def kill_when_started() -> None:  # SIGKILL the victim once the survivor has answered 3 requests
                while proxy.forwarded < 3:
                    time.sleep(0.05)
                killed_after.append(proxy.forwarded)
                os.killpg(victim.proc.pid, signal.SIGKILL)

            killer = threading.Thread(target=kill_when_started, daemon=True)
            killer.start()
            summary = synthesize(config=config)
            killer.join(timeout=5)
            survivor_answers = proxy.forwarded
    finally:
        survivor.stop()
        victim.stop()
    assert killed_after and victim.proc.poll() is not None  # the precondition: the victim died during the run
    assert summary.status == "completed"
    with duckdb.connect(str(config.warehouse), read_only=True) as con:
        calls = con.execute("SELECT call_id, status, endpoint, failed_on FROM model_calls").fetchall()
        responses = con.execute("SELECT count(*) FROM responses").fetchone()[0]
    # every sample was generated, and every call (8 samples, 8 ratings, a repair when a rating is unreadable)
    # was answered: none failed for want of a server
    assert responses == 8 and len(calls) >= 16
    ok = [c for c in calls if c[1] == "ok"]
    assert len(ok) == len(calls) and len({c[0] for c in ok}) == len(ok)  # every call once, and answered once
    by_victim = [c for c in ok if c[2] == victim.base_url]
    assert 0 < len(by_victim) < len(ok) and sum(c[2] == proxy.base_url for c in ok) == survivor_answers
    # the victim's requests that died with it (in flight, or refused until it was taken out) moved on
    moved = [c for c in ok if c[3]]
    assert moved and all(c[3] == [victim.base_url] and c[2] == proxy.base_url for c in moved)
    assert len(moved) <= 1 + replicas_mod.TAKE_OUT_AFTER


@pytest.mark.model
def test_replicas_of_the_embedded_model_start_several_llama_servers_and_share_the_work(tmp_path, prefect_harness):
    model = {"gguf": "smollm2-135m-instruct", "replicas": 2}
    config = small_config(tmp_path, write_jsonl(tmp_path / "p.jsonl", ["Name a color.", "Name a fruit.", "Say hi."]),
                          generation={"models": [model], "samples_per_prompt": 2,
                                      "sampling": {"temperature": 1.0, "max_tokens": 8, "seed": 1}},
                          scorers=[{"kind": "pointwise_judge", "model": model, "max_tokens": 40}])  # fmt: skip
    summary = synthesize(config=config)
    assert summary.status == "completed"
    out = CliRunner().invoke(app, ["stats", "--db", str(config.warehouse), "--json"])
    rows = {r["replica"]: r["answered"] for r in json.loads(out.output)["replicas"]}
    assert set(rows) == {"local#1", "local#2"} and all(rows.values())  # both servers answered
    assert sum(rows.values()) == summary.model_calls  # every call was answered by one of them
