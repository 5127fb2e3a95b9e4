"""Fault injection at the HTTP layer: retries, failing calls, unparsable judgments, unreachable endpoints."""

import asyncio

import pytest

from prefsynth.backends.client import Endpoint, ModelClient, check_reachable
from prefsynth.errors import EndpointError
from prefsynth.schemas.config import SamplingParams
from prefsynth.schemas.records import Failure, Message, ModelCall, Prompt, Response, Score
from prefsynth.tasks.generate import generate_items, plan_generation
from prefsynth.tasks.score import score_items
from prefsynth.tasks.scorers import ScoreItem, build_scorer
from prefsynth.tasks.scorers.pointwise_judge import PointwiseJudgeSpec
from prefsynth.warehouse.store import Store
from tests.fake_server import FakeOpenAI, chat_reply


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
