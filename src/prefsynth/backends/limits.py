"""How requests to one server are paced and retried: its limits (`EndpointLimits`), the retry loop
(`send_with_retries`) and the tally of what a call cost in HTTP requests (`Tally`, recorded on model_calls).

Limits of one server (base_url), or of an endpoint's replicas (replicas.py), shared by every stage and scorer
that calls it:
- `max_concurrency`: requests in flight (an asyncio semaphore; with replicas, one per replica); with
  `global_limit: true` and a Prefect server (PREFECT_API_URL), also a Prefect global concurrency limit, so
  concurrent flow runs share the cap.
  That costs Prefect API round trips per request (acquire, lease renewal, release), so it is opt-in.
- `requests_per_minute`, `tokens_per_minute`: aiolimiter's leaky buckets. Every HTTP attempt (retries too)
  takes one request and the call's estimated tokens: the prompt's characters / 4 + max_tokens.

Retries are ours, not the SDK's (its `max_retries` is 0), so each one is counted: a 429, 408, 409 or
5xx waits the answer's Retry-After (or retry-after-ms) when it gives one of at most `MAX_RETRY_AFTER_S`, else
backs off exponentially with jitter, as does a timeout or a dropped connection. Other answers (400, 401,
404…) are not retried. A timed-out request may still be served, and billed, by the server: the tally
counts it as a timeout. With replicas, a retryable failure first moves to a replica the call has not tried
(no retry spent; see replicas.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
from aiolimiter import AsyncLimiter

from prefsynth.backends.replicas import Lease, ReplicaSet

T = TypeVar("T")
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0
MAX_RETRY_AFTER_S = 60.0
log = logging.getLogger("prefsynth.limits")


@dataclass
class Tally:
    """What one call cost: HTTP attempts, their failures by kind, and the time spent waiting."""

    attempts: int = 0
    rate_limited: int = 0  # answered 429
    server_errors: int = 0  # answered 408, 409 or 5xx
    timeouts: int = 0  # abandoned at timeout_s
    dropped: int = 0  # refused or closed without an answer
    wait_s: float = 0.0  # slept before retries
    throttle_s: float = 0.0  # waited on rpm/tpm limits and the global limit

    def columns(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "rate_limited": self.rate_limited, "server_errors": self.server_errors,
                "timeouts": self.timeouts, "dropped": self.dropped, "wait_ms": self.wait_s * 1000,
                "throttle_ms": self.throttle_s * 1000}  # fmt: skip


def estimate_tokens(body: dict[str, Any]) -> int:
    """Tokens a request may use, before sending it: its text's characters / 4 + its max_tokens."""
    chars = sum(len(str(m.get("content") or "")) for m in body.get("messages") or [] if isinstance(m, dict))
    chars += len(str(body.get("prompt") or ""))
    return chars // 4 + int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)


def global_limit_name(base_url: str) -> str:
    """The Prefect global concurrency limit of a server: prefsynth-<host>-<port>-<path>, e.g.
    prefsynth-api.openai.com-v1 (credentials and query strings never appear)."""
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    raw = "-".join(x for x in (parts.hostname or "", str(parts.port or ""), parts.path.strip("/")) if x)
    return "prefsynth-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-")


class EndpointLimits:
    """The limits of one server, shared by its clients within one event loop."""

    def __init__(self, concurrency: int, requests_per_minute: int | None = None,
                 tokens_per_minute: int | None = None, global_name: str | None = None,
                 replicas: ReplicaSet | None = None) -> None:  # fmt: skip
        self.concurrency = concurrency
        self.replicas = replicas
        self._sem = asyncio.Semaphore(concurrency)
        self._rpm = AsyncLimiter(requests_per_minute, 60) if requests_per_minute else None
        self._tpm = AsyncLimiter(tokens_per_minute, 60) if tokens_per_minute else None
        self.global_name = global_name
        self._global_ready: asyncio.Task[bool] | None = None

    @contextlib.asynccontextmanager
    async def slot(self, tally: Tally) -> AsyncIterator[Lease]:
        """Hold one request slot: the local semaphore (or a replica's), then the Prefect global limit if any."""
        if self.replicas is None:
            async with self._sem, self._global_slot(tally):
                yield Lease()
            return
        lease = Lease(self.replicas, await self.replicas.acquire())
        try:
            async with self._global_slot(tally):
                yield lease
        finally:
            lease.release()

    @contextlib.asynccontextmanager
    async def _global_slot(self, tally: Tally) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if self.global_name is not None and await self._global_limit_exists():
                from prefect.concurrency.asyncio import concurrency

                start = time.monotonic()
                try:
                    await stack.enter_async_context(concurrency(self.global_name, occupy=1, strict=True,
                                                                raise_on_lease_renewal_failure=False))  # fmt: skip
                except Exception as err:  # noqa: BLE001 - Prefect unreachable, or the limit deleted: go on locally
                    log.warning("no slot of global concurrency limit %s (%s); this request holds only the run's "
                                "own limit", self.global_name, err)  # fmt: skip
                tally.throttle_s += time.monotonic() - start
            yield

    async def _global_limit_exists(self) -> bool:
        if self._global_ready is None:
            self._global_ready = asyncio.create_task(self._create_global_limit())
        return await asyncio.shield(self._global_ready)

    async def _create_global_limit(self) -> bool:
        """Create the limit (at max_concurrency) unless it exists: a limit set with `prefect gcl` is kept."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectNotFound

        assert self.global_name is not None
        try:
            async with get_client() as client:
                try:
                    await client.read_global_concurrency_limit_by_name(self.global_name)
                except ObjectNotFound:
                    await client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=self.global_name, limit=self.concurrency))
        except Exception as err:  # noqa: BLE001 - the server's own limit still holds; say so once
            log.warning("global concurrency limit %s is not available (%s); only this run's limit applies",
                        self.global_name, err)  # fmt: skip
            return False
        return True

    async def throttle(self, tokens: int, tally: Tally) -> None:
        """Wait until one more request of `tokens` fits the per-minute limits."""
        if self._rpm is None and self._tpm is None:
            return
        start = time.monotonic()
        if self._rpm is not None:
            await self._rpm.acquire()
        if self._tpm is not None:
            await self._tpm.acquire(min(tokens, self._tpm.max_rate))  # a bigger request waits for a full bucket
        tally.throttle_s += time.monotonic() - start


def retry_after(err: openai.APIStatusError) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, or Retry-After in seconds), if any and sane."""
    headers = err.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue  # an HTTP date: fall back to backoff
        if 0 <= seconds <= MAX_RETRY_AFTER_S:
            return seconds
    return None


def backoff(retry: int) -> float:
    """Exponential backoff with jitter: half of min(8, 0.5 * 2^retry) s, plus a random part of the other half."""
    cap = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**retry)
    return cap / 2 + random.uniform(0, cap / 2)


def _is_timeout(err: openai.APITimeoutError) -> bool:
    from prefsynth.backends.client import describe_error

    return describe_error(err).startswith("timeout")


def classify(err: Exception, retry: int, tally: Tally) -> float | None:
    """Count a failed attempt in `tally`; seconds to wait before retrying it, or None if it is final."""
    if isinstance(err, openai.APIStatusError):
        should = err.response.headers.get("x-should-retry")
        if err.status_code == 429:
            tally.rate_limited += 1
        elif err.status_code in (408, 409) or err.status_code >= 500:
            tally.server_errors += 1
        elif should != "true":
            return None
        if should == "false":
            return None
        wait = retry_after(err)
        return backoff(retry) if wait is None else wait
    if isinstance(err, openai.APITimeoutError) and _is_timeout(err):
        tally.timeouts += 1
        return backoff(retry)
    if isinstance(err, openai.APIConnectionError):
        tally.dropped += 1
        return backoff(retry)
    return None


async def send_with_retries(
    send: Callable[[], Awaitable[T]], limits: EndpointLimits, max_retries: int, tokens: int, tally: Tally,
    lease: Lease | None = None,
) -> T:
    """`send()` once, and again after each retryable failure, up to `max_retries` times; raises the last error.
    The caller holds `limits.slot` (`lease`: on replicas, `send` goes to `lease.url`, which a failure may move
    to an untried replica without spending a retry); each attempt passes the per-minute limits first."""
    lease = lease or Lease()
    retry = 0
    while True:
        await limits.throttle(tokens, tally)
        tally.attempts += 1
        try:
            result = await send()
        except (openai.APIStatusError, openai.APIConnectionError) as err:
            wait = classify(err, retry, tally)
            lease.failed(err)
            if wait is None:
                raise
            if await lease.move():
                continue
            if retry >= max_retries:
                raise
        else:
            lease.succeeded()
            return result
        retry += 1
        tally.wait_s += wait
        await asyncio.sleep(wait)
        await lease.settle()
