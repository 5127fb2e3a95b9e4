"""Fault injection at the HTTP layer: retries, failing calls, unparsable judgments, unreachable endpoints."""

import asyncio
import dataclasses

import pytest

from prefsynth.backends import limits
from prefsynth.backends.client import ClientPool, Endpoint, ModelClient, check_reachable
from prefsynth.backends.limits import estimate_tokens, global_limit_name
from prefsynth.errors import EndpointError
from prefsynth.schemas.config import SamplingParams
from prefsynth.schemas.records import Failure, Message, ModelCall, Prompt, Response, Score
from prefsynth.tasks.generate import generate_items, plan_generation
from prefsynth.tasks.score import score_items
from prefsynth.tasks.scorers import ScoreItem, build_scorer
from prefsynth.tasks.scorers.pointwise_judge import PointwiseJudgeSpec
from prefsynth.warehouse.store import Store
from tests.fake_server import CountingServer, FakeOpenAI, chat_reply
from tests.fault_proxy import FaultProxy


def _endpoint(url: str, retries: int = 0) -> Endpoint:
    return Endpoint(label="fake", identity="fake#m", base_url=url, model="m", api_key="sk-secret-key",
                    concurrency=4, timeout_s=10, max_retries=retries, is_local=False)  # fmt: skip


def _prompts(*texts: str) -> list[Prompt]:
    return [Prompt(prompt_id=f"p{i}", messages=[Message(role="user", content=t)], source="t", source_ref=str(i))
            for i, t in enumerate(texts)]  # fmt: skip


def test_transient_errors_are_retried_with_backoff():
    seen = {"n": 0}

    def respond(body):
        seen["n"] += 1
        return (503, {"error": {"message": "busy"}}) if seen["n"] <= 2 else chat_reply("fine")

    with FakeOpenAI(respond) as fake:
        ep = _endpoint(fake.base_url, retries=3)
        items = plan_generation(_prompts("hello"), ep, SamplingParams(), 1)
        result = asyncio.run(generate_items(ep, items, SamplingParams()))
    assert len(fake.requests) == 3
    assert [r.text for r in result.of(Response)] == ["fine"] and not result.of(Failure)
    assert [c.status for c in result.of(ModelCall)] == ["ok"]


def test_failing_calls_are_recorded_and_the_rest_finish():
    def respond(body):
        if "FAIL" in body["messages"][-1]["content"]:
            return 500, {"error": {"message": "model exploded"}}
        return chat_reply("an answer")

    with FakeOpenAI(respond) as fake:
        ep = _endpoint(fake.base_url)
        items = plan_generation(_prompts("a", "FAIL b", "c"), ep, SamplingParams(), 2)
        result = asyncio.run(generate_items(ep, items, SamplingParams()))
    assert len(result.of(Response)) == 4 and len(result.of(Failure)) == 2
    assert all("HTTP 500" in f.error and "model exploded" in f.error for f in result.of(Failure))
    errors = [c for c in result.of(ModelCall) if c.status == "error"]
    assert len(errors) == 2 and all("sk-secret" not in (c.error or "") for c in errors)
    assert {r.seed for r in result.of(Response)} == {0, 1}  # sample i uses seed + i


def test_judge_parses_repairs_and_records_failures_with_raw_text():
    def respond(body):
        last = body["messages"][-1]["content"]
        repair = "could not be used" in last
        if "[down]" in last:
            return 500, {"error": {"message": "judge overloaded"}}
        if "[good]" in last:
            return chat_reply('{"rationale": "Solid.", "score": 8}')
        if "[repairable]" in body["messages"][1]["content"]:
            return chat_reply('{"rationale": "Fixed.", "score": 3}' if repair else "I'd say 3/10")
        return chat_reply("score: excellent")  # [hopeless]

    spec = PointwiseJudgeSpec(model={"base_url": "http://x/v1", "model": "m"})
    kinds = ["good", "repairable", "hopeless", "down"] * 5  # 50% of the batch fails
    with FakeOpenAI(respond) as fake:
        judge = build_scorer(spec, lambda model: _endpoint(fake.base_url))
        items = [ScoreItem(f"s{i}", f"r{i}", "p", [Message(role="user", content="q")], f"answer {i} [{k}]")
                 for i, k in enumerate(kinds)]  # fmt: skip
        result = asyncio.run(score_items(judge, items))
    by_id = {s.response_id: s for s in result.of(Score)}
    assert len(result.of(Score)) == 10 and len(result.of(Failure)) == 10
    assert by_id["r0"].value == 8 and by_id["r0"].rationale == "Solid." and len(by_id["r0"].call_ids) == 1
    assert by_id["r1"].value == 3 and len(by_id["r1"].call_ids) == 2
    hopeless = next(f for f in result.of(Failure) if f.item_id == "s2")
    assert "unparsable judgment after repair" in hopeless.error and "score: excellent" in hopeless.raw
    down = next(f for f in result.of(Failure) if f.item_id == "s3")
    assert "judge call failed: HTTP 500" in down.error
    assert len(result.of(ModelCall)) == 5 * (1 + 2 + 2 + 1)  # good, repairable, hopeless, down
    assert all(c.kind == "chat" for c in result.of(ModelCall))


def test_cached_calls_are_not_repeated(tmp_path):
    with FakeOpenAI(lambda body: chat_reply("cached answer")) as fake:
        ep = _endpoint(fake.base_url)
        items = plan_generation(_prompts("a", "b"), ep, SamplingParams(), 2)
        with Store(tmp_path / "w.duckdb") as store:
            first = asyncio.run(generate_items(ep, items, SamplingParams(), store))
            store.write("run1", first)
            second = asyncio.run(generate_items(ep, items, SamplingParams(), store))
    assert len(fake.requests) == 4
    assert second.of(ModelCall) == [] and [r.text for r in second.of(Response)] == ["cached answer"] * 4


def test_identical_concurrent_calls_are_made_once():
    with FakeOpenAI(lambda body: chat_reply("same")) as fake:
        ep = _endpoint(fake.base_url)

        async def twice():
            async with ModelClient(ep) as client:
                body = client.request_body([{"role": "user", "content": "x"}], seed=1)
                return await asyncio.gather(client.chat(body), client.chat(body), client.chat(body))

        outcomes = asyncio.run(twice())
    assert len(fake.requests) == 1
    assert [o.text for o in outcomes] == ["same"] * 3 and sum(not o.cached for o in outcomes) == 1


def test_unreadable_logprob_responses_are_recorded_as_errors():
    with FakeOpenAI(lambda body: chat_reply("no logprobs here")) as fake:
        ep = _endpoint(fake.base_url)

        async def ask():
            async with ModelClient(ep) as client:
                return await client.text_logprob("Hello")

        outcome = asyncio.run(ask())
    assert not outcome.ok and "unreadable response" in outcome.call.error and outcome.call.kind == "logprob"


def test_unreachable_endpoint_fails_fast_with_its_url_and_no_secret():
    ep = _endpoint("http://user:pw@127.0.0.1:9/v1?token=abc")
    with pytest.raises(EndpointError) as info:
        asyncio.run(check_reachable(ep, timeout_s=3))
    message = str(info.value)
    assert "http://127.0.0.1:9/v1" in message and "unreachable" in message
    assert "pw" not in message and "abc" not in message and "sk-secret" not in message


def test_malformed_answers_fail_their_call_not_the_batch():
    shapes = {"a": {"choices": [{"message": "not an object"}]}, "b": {"choices": [{"message": {"content": ["x"]}}]},
              "c": {"choices": "none"}, "d": ["not", "an", "object"]}  # fmt: skip

    def respond(body):
        key = body["messages"][-1]["content"]
        return (200, shapes[key]) if key in shapes else chat_reply("fine")

    with FakeOpenAI(respond) as fake:
        ep = _endpoint(fake.base_url)
        items = plan_generation(_prompts("a", "b", "c", "d", "ok"), ep, SamplingParams(), 1)
        result = asyncio.run(generate_items(ep, items, SamplingParams()))
    assert [r.text for r in result.of(Response)] == ["fine"]
    assert len(result.of(Failure)) == 4 and all("unreadable response" in f.error for f in result.of(Failure))


def test_a_refused_connection_is_not_called_a_timeout():
    ep = _endpoint("http://127.0.0.1:9/v1")

    async def ask():
        async with ModelClient(ep) as client:
            return await client.chat(client.request_body([{"role": "user", "content": "x"}]))

    outcome = asyncio.run(ask())
    assert not outcome.ok and outcome.call.error.startswith("connection error"), outcome.call.error


# ---- retries, rate limits and the fault proxy (issue 13) ---------------------------------------------------


def _chats(ep: Endpoint, n: int, text: str = "question {}", **params) -> list:
    async def ask():
        async with ModelClient(ep) as client:
            bodies = [client.request_body([{"role": "user", "content": text.format(i)}], **params) for i in range(n)]
            return await asyncio.gather(*(client.chat(b) for b in bodies))

    return asyncio.run(ask())


def _sum(outcomes, column: str) -> float:
    return sum(getattr(o.call, column) for o in outcomes)


def test_every_fault_of_the_proxy_is_counted_on_its_call(monkeypatch):
    monkeypatch.setattr(limits, "BACKOFF_BASE_S", 0.02)  # short backoff: this test counts, it does not time
    rates = {"rate_limit": 0.15, "error": 0.15, "slow": 0.1, "drop": 0.1}
    with CountingServer(latency_s=0.0) as upstream, \
            FaultProxy(upstream.base_url, rates, seed=3, retry_after_s=0.05, slow_s=1.5) as proxy:  # fmt: skip
        ep = Endpoint(label="p", identity="p#m", base_url=proxy.base_url, model="m", api_key="k", concurrency=8,
                      timeout_s=0.5, max_retries=6, is_local=False)  # fmt: skip
        outcomes = _chats(ep, 40)
    assert all(proxy.faults[f] > 0 for f in rates), proxy.faults  # the precondition: every kind was injected
    assert proxy.upstream_errors == 0  # no fault but those drawn
    assert _sum(outcomes, "attempts") == proxy.posts  # every HTTP request is on a recorded call
    assert _sum(outcomes, "rate_limited") == proxy.faults["rate_limit"]
    assert _sum(outcomes, "server_errors") == proxy.faults["error"]
    assert _sum(outcomes, "timeouts") == proxy.faults["slow"]
    assert _sum(outcomes, "dropped") == proxy.faults["drop"]
    assert proxy.forwarded == len(upstream.requests) == sum(o.ok for o in outcomes) + proxy.faults["slow"]
    retried = [o.call for o in outcomes if o.call.attempts > 1]
    assert retried and all(c.wait_ms > 0 for c in retried)
    assert all(o.ok or o.call.error for o in outcomes)


def test_a_429_waits_its_retry_after_and_a_400_is_not_retried():
    seen = {"n": 0}

    def respond(body):
        if "bad" in body["messages"][-1]["content"]:
            return 400, {"error": {"message": "bad request"}}
        seen["n"] += 1
        return (429, {"error": {"message": "slow down"}}) if seen["n"] <= 2 else chat_reply("fine")

    with FakeOpenAI(respond) as fake:  # its answers carry retry-after-ms: 5
        ep = _endpoint(fake.base_url, retries=3)

        async def ask():
            async with ModelClient(ep) as client:
                ok = await client.chat(client.request_body([{"role": "user", "content": "x"}]))
                bad = await client.chat(client.request_body([{"role": "user", "content": "bad"}]))
                return ok, bad

        ok, bad = asyncio.run(ask())
    assert ok.ok and ok.call.attempts == 3 and ok.call.rate_limited == 2 and ok.call.wait_ms == pytest.approx(10)
    assert not bad.ok and bad.call.attempts == 1 and "HTTP 400" in bad.call.error


@pytest.mark.parametrize("limit", ["requests_per_minute", "tokens_per_minute"])
def test_per_minute_limits_hold_requests_back(limit):
    # 20 a minute: the first 20 requests (each estimated at 1 token) pass at once, the 21st waits for 3 s
    with CountingServer(latency_s=0.0) as fake:
        ep = dataclasses.replace(_endpoint(fake.base_url), concurrency=32, **{limit: 20})
        outcomes = _chats(ep, 21, text="{}", max_tokens=1)
    assert all(o.ok for o in outcomes) and len(fake.requests) == 21
    throttled = sorted(o.call.throttle_ms for o in outcomes)
    assert throttled[-1] > 2000 and throttled[0] < 1000


def test_token_estimate_and_global_limit_name():
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert estimate_tokens(body) == 150 and estimate_tokens({"prompt": "abcdefgh", "max_tokens": 1}) == 3
    name = global_limit_name("https://user:pw@api.example.com:8443/v1?key=abc")
    assert name == "prefsynth-api.example.com-8443-v1"


def test_global_limit_holds_across_pools_on_a_prefect_server(prefect_harness):
    """Two pools (two flow runs) each allow 2 requests in flight; the Prefect limit holds both to 2 in all."""
    import threading
    import time

    from prefect.client.orchestration import get_client

    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def respond(body):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.3)
        with lock:
            state["now"] -= 1
        return chat_reply("ok")

    with FakeOpenAI(respond) as fake:
        ep = dataclasses.replace(_endpoint(fake.base_url), concurrency=2, global_limit=True)

        async def run_pool(tag: str):
            async with ClientPool([ep]) as pool:
                client = pool.client(ep)
                bodies = [client.request_body([{"role": "user", "content": f"{tag} {i}"}]) for i in range(4)]
                return await asyncio.gather(*(client.chat(b) for b in bodies))

        async def both():
            outcomes = [*await run_pool("warm-up")]  # creates the limit once
            for batch in await asyncio.gather(run_pool("a"), run_pool("b")):
                outcomes += batch
            async with get_client() as client:
                limit = await client.read_global_concurrency_limit_by_name(global_limit_name(ep.base_url))
            return outcomes, limit

        outcomes, limit = asyncio.run(both())
    assert all(o.ok for o in outcomes) and len(fake.requests) == 12
    assert limit.limit == 2 and state["most"] == 2


def test_global_limit_only_with_a_prefect_server_of_ones_own(monkeypatch):
    from prefsynth.backends.client import server_limits
    from prefsynth.flows import prefect_api

    ep = dataclasses.replace(_endpoint("http://127.0.0.1:9/v1"), global_limit=True)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert server_limits([ep]).global_name == "prefsynth-127.0.0.1-9-v1"
    assert server_limits([dataclasses.replace(ep, global_limit=False)]).global_name is None
    monkeypatch.setattr(prefect_api, "_temporary", ["http://127.0.0.1:4200/api"])  # one command's temporary API
    assert server_limits([ep]).global_name is None
