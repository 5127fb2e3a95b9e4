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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai

from prefsynth.schemas.records import ModelCall
from prefsynth.warehouse.ids import call_id, canonical_json

CacheLookup = Callable[[list[str]], Mapping[str, str]]
"""Given call ids, return {call_id: response JSON} for those answered before."""


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


@dataclass
class ChatOutcome:
    call: ModelCall
    text: str | None = None
    finish_reason: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.call.status == "ok"


class ModelClient:
    """Calls one endpoint; use `async with` inside one event loop."""

    def __init__(self, endpoint: Endpoint, cache: CacheLookup | None = None) -> None:
        self.endpoint = endpoint
        self._cache = cache
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

    def call_id(self, body: dict[str, Any]) -> str:
        return call_id(self.endpoint.identity, body)

    def cached(self, bodies: list[dict[str, Any]]) -> dict[str, str]:
        if self._cache is None or not bodies:
            return {}
        return dict(self._cache([self.call_id(b) for b in bodies]))

    async def chat(self, body: dict[str, Any], cache: Mapping[str, str] | None = None) -> ChatOutcome:
        """Send one chat request, or answer it from `cache` (see `cached`); never raises for model errors."""
        cid = self.call_id(body)
        request = canonical_json(body)
        if cache is not None and cid in cache:
            return _outcome(self._record(cid, request, "ok", cache[cid], None, 0.0), cached=True)
        async with self._sem:
            start = time.perf_counter()
            try:
                completion = await self._client.chat.completions.create(model=self.endpoint.model, **body)
            except openai.APIError as err:
                latency = (time.perf_counter() - start) * 1000
                return _outcome(self._record(cid, request, "error", None, describe_error(err), latency))
            latency = (time.perf_counter() - start) * 1000
        if not completion.choices:
            return _outcome(self._record(cid, request, "error", None, "response has no choices", latency))
        choice = completion.choices[0]
        usage = completion.usage
        payload = canonical_json(
            {
                "text": choice.message.content or "",
                "finish_reason": choice.finish_reason,
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
            }
        )
        return _outcome(self._record(cid, request, "ok", payload, None, latency))

    def _record(
        self, cid: str, request: str, status: str, response: str | None, error: str | None, latency: float
    ) -> ModelCall:
        usage = json.loads(response) if response else {}
        return ModelCall(
            attempt_id=uuid.uuid4().hex,
            call_id=cid,
            model=self.endpoint.identity,
            endpoint=self.endpoint.public_url,
            kind="chat",
            request=request,
            response=response,
            status=status,
            error=error,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            latency_ms=latency,
        )


def _outcome(call: ModelCall, cached: bool = False) -> ChatOutcome:
    if call.status != "ok" or call.response is None:
        return ChatOutcome(call=call)
    data = json.loads(call.response)
    return ChatOutcome(call=call, text=data["text"], finish_reason=data.get("finish_reason"), cached=cached)


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
