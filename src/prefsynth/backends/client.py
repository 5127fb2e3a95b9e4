"""The one layer that talks to models: an async OpenAI-compatible client with a cache and a ledger.

Every policy, judge and teacher request goes through `ModelClient.chat`. Each request gets a
content-addressed `call_id` (model identity + canonical body, seed included); a call already answered
with status "ok" in the warehouse is served from the cache and makes no request. Retries (Retry-After,
backoff with jitter) and rate limits are in `limits.py`; each recorded call says how many HTTP requests it
took and why. A `ClientPool` gives every stage of a run the same client per endpoint and one set of limits
per server, so requests flow continuously up to each server's `max_concurrency` and a slow or retrying
request holds one slot, never a batch. An endpoint with several replicas (`base_urls`) spreads its requests
over them and fails over between them (replicas.py); which replica answered is recorded, never part of the
call's id. Cache look-ups of concurrent requests are
batched into one warehouse read, off the event loop (`CacheReader`). A run's budget (budget.py) is
checked just before a request is sent and charged when it returns; cached answers are free. With `batch`,
an endpoint's chat requests go out as batch jobs (batch.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx2
import openai

from prefsynth.backends import budget, quirks
from prefsynth.backends.batch import Batcher, BatchLedger, Pending, chat_answer
from prefsynth.backends.limits import EndpointLimits, Tally, estimate_tokens, global_limit_name, send_with_retries
from prefsynth.backends.replicas import Lease, ReplicaSet
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
    api_key: str = field(repr=False)  # never in a repr: endpoints appear in logs, tracebacks and artifacts
    concurrency: int
    timeout_s: float
    max_retries: int
    is_local: bool
    server: str = "openai"  # openai | vllm | llama-cpp: which quirks apply (see quirks.py)
    logprobs: str = "echo"  # how to ask for prompt log-probs: echo | prompt_logprobs
    template: ChatTemplate = PLAIN_TEMPLATE  # renders chat turns as text for log-prob scoring
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    global_limit: bool = False  # also a Prefect global concurrency limit (see limits.py)
    batch: bool = False  # chat requests go out as batch jobs (batch.py)
    price: tuple[float, float] | None = None  # per 1M input and output tokens, recorded with each call
    # (base_url, max_concurrency) of each replica when there are several (base_url is the first; concurrency
    # their sum); empty for one server
    replicas: tuple[tuple[str, int], ...] = ()

    @property
    def public_url(self) -> str:
        return "local" if self.is_local else redact_url(self.base_url)

    def replica_name(self, url: str) -> str:
        """How records name a replica: its URL without credentials, or local#N for the Nth local server (its
        port changes with every start)."""
        if self.is_local:
            return f"local#{[u for u, _ in self.replicas].index(url) + 1}"
        return redact_url(url)

    @property
    def servers(self) -> tuple[str, ...]:
        """The base_url of each server: one, or the replicas (in a stable order, to key their shared limits)."""
        return tuple(sorted(url for url, _ in self.replicas)) if self.replicas else (self.base_url,)


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


class CacheReader:
    """Batches the cache look-ups of concurrent requests into one warehouse read per kind, in a thread.

    Every look-up made within `WINDOW_S` (and while a read is running) joins one query, so thousands of
    requests in flight cost a few reads a second, and the event loop never waits on DuckDB.
    """

    WINDOW_S = 0.02

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._pending: dict[str, dict[str, list[asyncio.Future[Any]]]] = {"calls": {}, "logprobs": {}}
        self._flushing: asyncio.Task[None] | None = None

    async def call(self, call_id: str) -> str | None:
        """The response JSON of an earlier ok call with this id, if any."""
        return await self._get("calls", call_id)

    async def logprob(self, lp_id: str) -> tuple[float, int] | None:
        return await self._get("logprobs", lp_id)

    async def _get(self, kind: str, key: str) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending[kind].setdefault(key, []).append(future)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        # let the look-ups of the next few milliseconds join: a few reads a second, not one per request (a
        # request waits this long before it queues for its server, which holds no slot meanwhile)
        await asyncio.sleep(self.WINDOW_S)
        while any(self._pending.values()):
            pending, self._pending = self._pending, {"calls": {}, "logprobs": {}}
            for kind, waiting in pending.items():
                if not waiting:
                    continue
                read = self._cache.cached_calls if kind == "calls" else self._cache.cached_logprobs
                try:
                    found = await asyncio.to_thread(read, list(waiting))
                except Exception as err:  # a failed read fails its waiters, not the loop
                    for futures in waiting.values():
                        for f in futures:
                            if not f.done():
                                f.set_exception(err)
                    continue
                for key, futures in waiting.items():
                    for f in futures:
                        if not f.done():
                            f.set_result(found.get(key))


class Recent(OrderedDict[str, Any]):
    """A bounded memo of recent answers: calls made this run that may not be committed yet."""

    def __init__(self, size: int = 4096) -> None:
        super().__init__()
        self.size = size

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


@dataclass
class Outcome:
    """One request's ledger record, and whether it was answered from the cache (or refused by the run's budget:
    then no request was made either, and there is nothing to record)."""

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
    """Calls one endpoint; use `async with` inside one event loop (or get it from a `ClientPool`).

    Answers come from, in order: recent answers of this client, an identical call already in flight,
    the cache, and only then the endpoint, through `limits` (one per server, shared by its clients).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        cache: Cache | CacheReader | None = None,
        limits: EndpointLimits | None = None,
        ledger: BatchLedger | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._reader = CacheReader(cache) if cache is not None and not isinstance(cache, CacheReader) else cache
        self._recent = Recent()
        self._inflight: dict[str, asyncio.Future[tuple[ModelCall, bool]]] = {}
        self._own_limits = limits is None  # then this client stops its replicas' health probes on exit
        self._limits = limits or (server_limits([endpoint]) if endpoint.replicas else EndpointLimits(
            endpoint.concurrency, endpoint.requests_per_minute, endpoint.tokens_per_minute))
        self._budget = budget.active()  # the run's, checked before each request (see budget.py)
        # as many kept-alive connections as requests in flight: the SDK's default keeps 100, so at higher
        # concurrency every response would close a connection and the next request open a new one
        self._client = self._open(endpoint.base_url, endpoint.concurrency)
        self._replicas = {url: self._open(url, n) for url, n in endpoint.replicas}  # one client per replica
        self._batcher = None
        if endpoint.batch:
            if ledger is None:
                raise ValueError(f"{endpoint.label}: batch requests need a warehouse to keep their batches in")
            self._batcher = Batcher(self._client, endpoint.model, endpoint.identity, ledger)

    async def __aenter__(self) -> ModelClient:
        return self

    def _open(self, base_url: str, concurrency: int) -> openai.AsyncOpenAI:
        limit = max(concurrency, 1)
        limits = httpx2.Limits(max_connections=limit, max_keepalive_connections=limit)
        return openai.AsyncOpenAI(
            base_url=base_url,
            api_key=self.endpoint.api_key,
            timeout=self.endpoint.timeout_s,
            max_retries=0,  # retries are ours (limits.py), so that each one is counted
            http_client=openai.DefaultAioHttpClient(limits=limits),
        )

    async def __aexit__(self, *exc: object) -> None:
        if self._own_limits and self._limits.replicas is not None:
            self._limits.replicas.close()
        await self._client.close()
        for client in self._replicas.values():
            await client.close()

    def request_body(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        return {"messages": messages, **{k: v for k, v in params.items() if v is not None}}

    def call_id(self, kind: str, body: dict[str, Any]) -> str:
        return call_id(self.endpoint.identity, body if kind == "chat" else {"kind": kind, **body})

    async def chat(self, body: dict[str, Any]) -> ChatOutcome:
        """One chat completion; never raises for model or HTTP errors (they are in the outcome)."""
        call, cached = await self._once("chat", body, self._send_chat)
        if call.status != "ok" or call.response is None:
            return ChatOutcome(call=call, cached=cached)
        data = json.loads(call.response)
        return ChatOutcome(call=call, text=data["text"], finish_reason=data.get("finish_reason"), cached=cached)

    async def text_logprob(self, text: str) -> LogprobOutcome:
        """The log-prob of every token of `text` given the tokens before it (None for the first)."""
        call, cached = await self._once("logprob", quirks.logprob_request(self.endpoint, text), self._send_logprob)
        if call.status != "ok" or call.response is None:
            return LogprobOutcome(call=call, cached=cached)
        return LogprobOutcome(call=call, values=json.loads(call.response)["logprobs"], cached=cached)

    async def reward(self, body: dict[str, Any], label_index: int) -> RewardOutcome:
        """The reward of one conversation from a vLLM pooling endpoint (`quirks.reward_request` builds `body`).

        The cache keeps the server's output, not the reward, so another label_index reuses the same call.
        """
        call, cached = await self._once("reward", body, self._send_reward)
        if call.status != "ok" or call.response is None:
            return RewardOutcome(call=call, cached=cached)
        try:
            value = quirks.parse_reward(body["api"], json.loads(call.response), label_index)
        except ValueError as err:
            return RewardOutcome(call=call, cached=cached, error=f"unreadable reward: {err}")
        return RewardOutcome(call=call, value=value, cached=cached)

    async def cached_logprob(self, lp_id: str) -> tuple[float, int] | None:
        """A log-prob row computed before (the CDR cache), if the client has a cache."""
        return await self._reader.logprob(lp_id) if self._reader is not None else None

    async def _once(
        self, kind: str, body: dict[str, Any], send: Callable[[dict[str, Any], openai.AsyncOpenAI], Any]
    ) -> tuple[ModelCall, bool]:
        cid = self.call_id(kind, body)
        request = canonical_json(body)
        if cid in self._inflight:  # the same request is already on its way: share its answer
            call, _ = await asyncio.shield(self._inflight[cid])
            return call, True
        future: asyncio.Future[tuple[ModelCall, bool]] = asyncio.get_running_loop().create_future()
        self._inflight[cid] = future
        try:
            known = self._recent.get(cid)
            if known is None and self._reader is not None:
                known = await self._reader.call(cid)
            if known is not None:
                call = self._record(cid, kind, request, "ok", known, None, 0.0, Tally())
                future.set_result((call, True))
                return call, True
            tally = Tally()
            refused = self._budget.refusal() if self._budget is not None and self._batcher is not None else None
            if self._batcher is not None and kind == "chat" and refused is None:
                start = time.perf_counter()
                response, error = await self._batcher.call(cid, body)
                latency = (time.perf_counter() - start) * 1000
                if isinstance(error, Pending):  # not its result: the batch stays open
                    call = self._record(cid, kind, request, "error", None, error, latency, Tally())
                    future.set_result((call, True))
                    return call, True
            else:
                async with self._limits.slot(tally) as lease:  # the budget is checked once a slot is held
                    if refused is None and self._budget is not None:
                        refused = self._budget.refusal()
                    if refused is not None:  # not sent, and not recorded as a call
                        call = self._record(cid, kind, request, "error", None, refused, 0.0, Tally())
                        future.set_result((call, True))
                        return call, True
                    response, error, latency = await self._send(body, send, tally, lease)
            status = "ok" if error is None else "error"
            call = self._record(cid, kind, request, status, response, error, latency, tally,
                                lease if self._batcher is None else None)  # fmt: skip
            if self._budget is not None:
                self._budget.charge(call.prompt_tokens, call.completion_tokens, self.endpoint.price)
            if status == "ok":
                self._recent.put(cid, response)
            future.set_result((call, False))
            return call, False
        finally:
            if not future.done():
                future.cancel()
            del self._inflight[cid]

    async def _send(self, body: dict[str, Any], send: Callable[[dict[str, Any], openai.AsyncOpenAI], Any],
                    tally: Tally, lease: Lease) -> tuple[str | None, str | None, float]:  # fmt: skip
        """One request with its retries (its caller holds the server's slot, or a replica's in `lease`, which
        says where each attempt goes): (response, error, latency in ms)."""
        start = time.perf_counter()
        try:
            response, error = await send_with_retries(
                lambda: send(body, self._replicas.get(lease.url or "", self._client)), self._limits,
                self.endpoint.max_retries, estimate_tokens(body), tally, lease,
            ), None
        except openai.APIError as err:
            response, error = None, describe_error(err)
        except (ValueError, TypeError, AttributeError) as err:  # a response we cannot read
            response, error = None, f"unreadable response: {err}"
        except Exception as err:  # noqa: BLE001 - e.g. malformed HTTP the transport does not map: one call fails
            response, error = None, f"request failed: {type(err).__name__}: {str(err)[:300]}"
        return response, error, (time.perf_counter() - start) * 1000

    async def _send_chat(self, body: dict[str, Any], client: openai.AsyncOpenAI) -> str:
        # a plain POST on the SDK's client (its timeouts and error types; retries are ours), without building
        # typed request and response models (measured: most of a call's CPU at hundreds of calls a second)
        data = await client.post("/chat/completions", cast_to=object, body={"model": self.endpoint.model, **body})
        return chat_answer(data)

    async def _send_logprob(self, body: dict[str, Any], client: openai.AsyncOpenAI) -> str:
        standard = {k: v for k, v in body.items() if k not in quirks.NONSTANDARD}
        extra = {k: v for k, v in body.items() if k in quirks.NONSTANDARD}
        completion = await client.completions.create(
            model=self.endpoint.model, **standard, extra_body=extra or None
        )
        values = quirks.parse_logprobs(self.endpoint, completion.model_dump())
        return canonical_json({"logprobs": values, "prompt_tokens": len(values), "completion_tokens": 0})

    async def _send_reward(self, body: dict[str, Any], client: openai.AsyncOpenAI) -> str:
        api = body["api"]
        payload = {"model": self.endpoint.model, **{k: v for k, v in body.items() if k != "api"}}
        # a raw POST on the SDK's client (its timeouts and error types; retries are ours);
        # an absolute URL is used as is (the pooling paths are not under base_url's /v1)
        response = await client.post(quirks.reward_url(str(client.base_url), api), cast_to=object, body=payload)
        return canonical_json(quirks.compact_reward_response(api, response))

    def _record(self, cid: str, kind: str, request: str, status: str, response: str | None, error: str | None,
                latency: float, tally: Tally, lease: Lease | None = None) -> ModelCall:  # fmt: skip
        usage = json.loads(response) if response else {}
        # on replicas: the one that answered (or failed last), and the replica of each failed attempt
        replica = lease.url if lease is not None else None
        return ModelCall(
            attempt_id=uuid.uuid4().hex,
            call_id=cid,
            model=self.endpoint.identity,
            endpoint=self.endpoint.replica_name(replica) if replica else self.endpoint.public_url,
            failed_on=[self.endpoint.replica_name(u) for u in lease.failed_on] if replica and lease else None,
            kind=kind,
            request=request,
            response=response,
            status=status,
            error=error,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            latency_ms=latency,
            input_per_mtok=self.endpoint.price[0] if self.endpoint.price else None,
            output_per_mtok=self.endpoint.price[1] if self.endpoint.price else None,
            **tally.columns(),
        )


class ClientPool:
    """The clients of one run: one per endpoint, and one set of limits per server (base_url) shared by every
    stage and scorer that calls it; a server named by endpoints with different limits gets the smallest, and a
    global limit if any of them asks for one (and a Prefect server is configured)."""

    def __init__(self, endpoints: Iterable[Endpoint], cache: Cache | None = None) -> None:
        self._endpoints = list(endpoints)
        self._cache = cache
        self._clients: dict[tuple[str, str, str], ModelClient] = {}
        self._limits: dict[tuple[str, ...], EndpointLimits] = {}
        self._reader: CacheReader | None = None

    def client(self, endpoint: Endpoint) -> ModelClient:
        key = (endpoint.servers, endpoint.identity, endpoint.model)
        if key not in self._clients:
            if self._reader is None and self._cache is not None:
                self._reader = CacheReader(self._cache)
            if endpoint.servers not in self._limits:
                self._limits[endpoint.servers] = server_limits(
                    [e for e in [endpoint, *self._endpoints] if e.servers == endpoint.servers])
            ledger = self._cache if hasattr(self._cache, "open_batches") else None
            self._clients[key] = ModelClient(endpoint, self._reader, self._limits[endpoint.servers],
                                             ledger)  # type: ignore[arg-type]  # fmt: skip
        return self._clients[key]

    def clients(self, endpoints: dict[str, Endpoint]) -> dict[str, ModelClient]:
        """Clients by role (a scorer's endpoints)."""
        return {role: self.client(ep) for role, ep in endpoints.items()}

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for limits in self._limits.values():
            if limits.replicas is not None:
                limits.replicas.close()
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.__aexit__()


def server_limits(endpoints: list[Endpoint]) -> EndpointLimits:
    """The limits of one server (or one set of replicas) named by `endpoints`: the smallest of each."""
    from prefsynth.flows.prefect_api import shared_server

    def least(values: Iterable[int | None]) -> int | None:
        return min((v for v in values if v is not None), default=None)

    wants_global = any(e.global_limit for e in endpoints)
    shared = wants_global and shared_server()
    if wants_global and not shared:
        import logging

        logging.getLogger("prefsynth.limits").info(
            "global_limit of %s: no Prefect server configured (PREFECT_API_URL); the limit holds within this run",
            endpoints[0].public_url)  # fmt: skip
    replicas = None
    if endpoints[0].replicas:  # each replica's smallest max_concurrency; probes with the first endpoint's key
        slots = {url: min(dict(e.replicas)[url] for e in endpoints) for url, _ in endpoints[0].replicas}
        replicas = ReplicaSet(list(slots.items()), lambda url: probe(endpoints[0], url))
    return EndpointLimits(min(e.concurrency for e in endpoints), least(e.requests_per_minute for e in endpoints),
                          least(e.tokens_per_minute for e in endpoints),
                          global_limit_name(endpoints[0].base_url) if shared else None, replicas)  # fmt: skip


async def probe(endpoint: Endpoint, base_url: str, timeout_s: float = 5.0) -> bool:
    """Whether a replica answers `GET /models` (any answer but a 5xx: some servers do not implement it)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=endpoint.api_key, timeout=timeout_s, max_retries=0)
    try:
        await client.models.list()
    except openai.APIStatusError as err:
        return err.status_code < 500
    except openai.APIError:
        return False
    finally:
        await client.close()
    return True


def _root_cause(err: BaseException) -> BaseException | None:
    cause = err.__cause__ or err.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    return cause


def describe_error(err: openai.APIError) -> str:
    """A one-line error without secrets: the SDK's messages name the status and the server's words."""
    if isinstance(err, openai.APITimeoutError):
        cause = _root_cause(err)
        # the aiohttp transport reports refused or dropped connections as connect timeouts
        if cause is not None and not isinstance(cause, TimeoutError) and "timeout" not in type(cause).__name__.lower():
            return f"connection error: {type(cause).__name__}: {str(cause)[:300]}"
        return "timeout: the request took longer than timeout_s"
    if isinstance(err, openai.APIConnectionError):
        return f"connection error: {err.__cause__ or err}"
    if isinstance(err, openai.APIStatusError):
        return f"HTTP {err.status_code}: {str(err.message)[:500]}"
    return f"{type(err).__name__}: {str(err)[:500]}"


async def check_reachable(endpoint: Endpoint, timeout_s: float = 10.0) -> None:
    """Fail fast with the endpoint's URL (no secret) when it does not answer `GET /models`. Replicas: when none
    answers (one that does not is taken out at its first failures and probed back; see replicas.py)."""
    if endpoint.replicas:
        answers = await asyncio.gather(*(probe(endpoint, url, timeout_s) for url, _ in endpoint.replicas))
        if any(answers):
            return
    await _check_server(endpoint, endpoint.base_url, timeout_s)


async def _check_server(endpoint: Endpoint, base_url: str, timeout_s: float) -> None:
    from prefsynth.errors import EndpointError

    client = openai.AsyncOpenAI(base_url=base_url, api_key=endpoint.api_key, timeout=timeout_s, max_retries=0)
    try:
        await client.models.list()
    except openai.APIConnectionError as err:
        raise EndpointError(
            f"model endpoint {redact_url(base_url)} ({endpoint.label}) is unreachable: {err.__cause__ or err}"
        ) from None
    except openai.AuthenticationError:
        raise EndpointError(
            f"model endpoint {redact_url(base_url)} ({endpoint.label}) rejected the API key"
        ) from None
    except openai.APIStatusError:
        pass  # some servers do not implement /models; they answered, which is what we check
    finally:
        await client.close()
