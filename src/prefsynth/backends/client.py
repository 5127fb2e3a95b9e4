"""The one layer that talks to models: an async OpenAI-compatible client with a cache and a ledger.

Every policy, judge and teacher request goes through `ModelClient.chat`. Each request gets a
content-addressed `call_id` (model identity + canonical body, seed included); a call already answered
with status "ok" in the warehouse is served from the cache and makes no request. Retries with backoff
(and Retry-After) are the OpenAI SDK's; the concurrency limit is a semaphore per endpoint.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import openai

from prefsynth.backends import quirks
from prefsynth.backends.templates import PLAIN_TEMPLATE, ChatTemplate
from prefsynth.schemas.records import ModelCall
from prefsynth.warehouse.ids import call_id, canonical_json


@dataclass(frozen=True)
class Endpoint:
    """A ready OpenAI-compatible endpoint: remote, or a local server started by `LocalServers`."""

    label: str
    identity: str  # what the cache key uses: never a port or a key
    base_url: str
    model: str  # the name sent in the request body
    api_key: str
    concurrency: int
    timeout_s: float
    max_retries: int
    is_local: bool
    server: str = "openai"  # openai | vllm | llama-cpp: which quirks apply (see quirks.py)
    logprobs: str = "echo"  # how to ask for prompt log-probs: echo | prompt_logprobs
    template: ChatTemplate = PLAIN_TEMPLATE  # renders chat turns as text for log-prob scoring

    @property
    def public_url(self) -> str:
        return "local" if self.is_local else redact_url(self.base_url)


def redact_url(url: str) -> str:
    """Drop credentials and query strings from a URL before it goes into a message or a table."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class Cache(Protocol):
    """What clients and scorers read back from the warehouse (the Store implements it; thread-safe)."""

    def cached_calls(self, call_ids: list[str]) -> dict[str, str]: ...

    def cached_logprobs(self, lp_ids: list[str]) -> dict[str, tuple[float, int]]: ...


@dataclass
class Outcome:
    """One request's ledger record, and whether it was answered from the cache."""

    call: ModelCall
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.call.status == "ok"


@dataclass
class ChatOutcome(Outcome):
    text: str | None = None
    finish_reason: str | None = None


@dataclass
class LogprobOutcome(Outcome):
    values: list[float | None] = field(default_factory=list)  # one per token of the text, None for the first


@dataclass
class RewardOutcome(Outcome):
    value: float | None = None
    error: str | None = None  # the call succeeded but its answer holds no reward for this label_index


class ModelClient:
    """Calls one endpoint; use `async with` inside one event loop.

    Answers come from, in order: calls prefetched from the cache, an identical call already in flight,
    the cache, and only then the endpoint.
    """

    def __init__(self, endpoint: Endpoint, cache: Cache | None = None) -> None:
        self.endpoint = endpoint
        self._cache = cache
        self._known: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Future[tuple[ModelCall, bool]]] = {}
        self._sem = asyncio.Semaphore(endpoint.concurrency)
        self._client = openai.AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key=endpoint.api_key,
            timeout=endpoint.timeout_s,
            max_retries=endpoint.max_retries,
        )

    async def __aenter__(self) -> ModelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    def request_body(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        return {"messages": messages, **{k: v for k, v in params.items() if v is not None}}

    def call_id(self, kind: str, body: dict[str, Any]) -> str:
        return call_id(self.endpoint.identity, body if kind == "chat" else {"kind": kind, **body})

    def prefetch(self, kind: str, bodies: list[dict[str, Any]]) -> None:
        """Load the cached answers of these requests in one warehouse read."""
        if self._cache is not None and bodies:
            self._known.update(self._cache.cached_calls([self.call_id(kind, b) for b in bodies]))

    async def chat(self, body: dict[str, Any]) -> ChatOutcome:
        """One chat completion; never raises for model or HTTP errors (they are in the outcome)."""
        call, cached = await self._once("chat", body, self._send_chat)
        if call.status != "ok" or call.response is None:
            return ChatOutcome(call=call)
        data = json.loads(call.response)
        return ChatOutcome(call=call, text=data["text"], finish_reason=data.get("finish_reason"), cached=cached)

    async def text_logprob(self, text: str) -> LogprobOutcome:
        """The log-prob of every token of `text` given the tokens before it (None for the first)."""
        call, cached = await self._once("logprob", quirks.logprob_request(self.endpoint, text), self._send_logprob)
        if call.status != "ok" or call.response is None:
            return LogprobOutcome(call=call)
        return LogprobOutcome(call=call, values=json.loads(call.response)["logprobs"], cached=cached)

    async def reward(self, body: dict[str, Any], label_index: int) -> RewardOutcome:
        """The reward of one conversation from a vLLM pooling endpoint (`quirks.reward_request` builds `body`).

        The cache keeps the server's output, not the reward, so another label_index reuses the same call.
        """
        call, cached = await self._once("reward", body, self._send_reward)
        if call.status != "ok" or call.response is None:
            return RewardOutcome(call=call)
        try:
            value = quirks.parse_reward(body["api"], json.loads(call.response), label_index)
        except ValueError as err:
            return RewardOutcome(call=call, cached=cached, error=f"unreadable reward: {err}")
        return RewardOutcome(call=call, value=value, cached=cached)

    async def _once(
        self, kind: str, body: dict[str, Any], send: Callable[[dict[str, Any]], Any]
    ) -> tuple[ModelCall, bool]:
        cid = self.call_id(kind, body)
        request = canonical_json(body)
        if cid not in self._known and cid not in self._inflight and self._cache is not None:
            self._known.update(self._cache.cached_calls([cid]))
        if cid in self._known:
            return self._record(cid, kind, request, "ok", self._known[cid], None, 0.0), True
        if cid in self._inflight:  # the same request is already on its way: share its answer
            call, _ = await asyncio.shield(self._inflight[cid])
            return call, True
        future: asyncio.Future[tuple[ModelCall, bool]] = asyncio.get_running_loop().create_future()
        self._inflight[cid] = future
        try:
            async with self._sem:
                start = time.perf_counter()
                try:
                    response, error = await send(body), None
                except openai.APIError as err:
                    response, error = None, describe_error(err)
                except ValueError as err:  # a response we cannot read
                    response, error = None, f"unreadable response: {err}"
                latency = (time.perf_counter() - start) * 1000
            status = "ok" if error is None else "error"
            call = self._record(cid, kind, request, status, response, error, latency)
            if status == "ok":
                self._known[cid] = response  # type: ignore[assignment]
            future.set_result((call, False))
            return call, False
        finally:
            if not future.done():
                future.cancel()
            del self._inflight[cid]

    async def _send_chat(self, body: dict[str, Any]) -> str:
        completion = await self._client.chat.completions.create(model=self.endpoint.model, **body)
        if not completion.choices:
            raise ValueError("response has no choices")
        choice = completion.choices[0]
        usage = completion.usage
        return canonical_json(
            {
                "text": choice.message.content or "",
                "finish_reason": choice.finish_reason,
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
            }
        )

    async def _send_logprob(self, body: dict[str, Any]) -> str:
        standard = {k: v for k, v in body.items() if k not in quirks.NONSTANDARD}
        extra = {k: v for k, v in body.items() if k in quirks.NONSTANDARD}
        completion = await self._client.completions.create(
            model=self.endpoint.model, **standard, extra_body=extra or None
        )
        values = quirks.parse_logprobs(self.endpoint, completion.model_dump())
        return canonical_json({"logprobs": values, "prompt_tokens": len(values), "completion_tokens": 0})

    async def _send_reward(self, body: dict[str, Any]) -> str:
        api = body["api"]
        payload = {"model": self.endpoint.model, **{k: v for k, v in body.items() if k != "api"}}
        # a raw POST on the SDK's client, so retries, backoff, Retry-After and timeouts are the SDK's;
        # an absolute URL is used as is (the pooling paths are not under base_url's /v1)
        response = await self._client.post(quirks.reward_url(self.endpoint.base_url, api), cast_to=object, body=payload)
        return canonical_json(quirks.compact_reward_response(api, response))

    def _record(
        self, cid: str, kind: str, request: str, status: str, response: str | None, error: str | None, latency: float
    ) -> ModelCall:
        usage = json.loads(response) if response else {}
        return ModelCall(
            attempt_id=uuid.uuid4().hex,
            call_id=cid,
            model=self.endpoint.identity,
            endpoint=self.endpoint.public_url,
            kind=kind,
            request=request,
            response=response,
            status=status,
            error=error,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            latency_ms=latency,
        )


def describe_error(err: openai.APIError) -> str:
    """A one-line error without secrets: the SDK's messages name the status and the server's words."""
    if isinstance(err, openai.APITimeoutError):
        return "timeout: the request took longer than timeout_s"
    if isinstance(err, openai.APIConnectionError):
        return f"connection error: {err.__cause__ or err}"
    if isinstance(err, openai.APIStatusError):
        return f"HTTP {err.status_code}: {str(err.message)[:500]}"
    return f"{type(err).__name__}: {str(err)[:500]}"


async def check_reachable(endpoint: Endpoint, timeout_s: float = 10.0) -> None:
    """Fail fast with the endpoint's URL (no secret) when it does not answer `GET /models`."""
    from prefsynth.errors import EndpointError

    client = openai.AsyncOpenAI(
        base_url=endpoint.base_url, api_key=endpoint.api_key, timeout=timeout_s, max_retries=0
    )
    try:
        await client.models.list()
    except openai.APIConnectionError as err:
        raise EndpointError(
            f"model endpoint {redact_url(endpoint.base_url)} ({endpoint.label}) is unreachable: {err.__cause__ or err}"
        ) from None
    except openai.AuthenticationError:
        raise EndpointError(
            f"model endpoint {redact_url(endpoint.base_url)} ({endpoint.label}) rejected the API key"
        ) from None
    except openai.APIStatusError:
        pass  # some servers do not implement /models; they answered, which is what we check
    finally:
        await client.close()
