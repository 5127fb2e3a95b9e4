"""Several replicas of one endpoint (`base_urls`): which one a request goes to, and which are in service.

- Spread: a request goes to the in-service replica with the most free slots, counting requests waiting for
  one (least `load / max_concurrency`, ties to the first listed), then waits for a slot there.
- Health: a replica whose requests fail `TAKE_OUT_AFTER` times in a row with a dropped or refused
  connection, a timeout, or an answer 408/5xx is taken out of service. A probe (`GET /models`) tries it
  again after `COOLDOWN_S`, doubling up to `MAX_COOLDOWN_S`, and puts it back when it answers. A 429 or
  another 4xx says the replica is alive: it never takes one out. A success puts a replica back at once.
- Failover (in `limits.send_with_retries`): a retryable failure moves the request at once to an in-service
  replica it has not tried yet, without spending a retry of the call's `max_retries`; so a replica that dies
  costs each of its requests in flight one extra attempt, at most one per replica. Once the call has tried
  every replica in service, a failure spends a retry as with one server (backoff or Retry-After), and the
  retry goes to the best replica in service then.
- All out: when no replica is in service, requests still go to the least loaded one (each attempt is a
  probe too) and spend their retries, so a call fails as it would on one dead server, with its error
  recorded; nothing is lost, and a rerun retries it.

The cache never sees which replica answered: a call's id is its model identity and body (warehouse/ids.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import openai

TAKE_OUT_AFTER = 3
COOLDOWN_S = 1.0
MAX_COOLDOWN_S = 30.0
log = logging.getLogger("prefsynth.replicas")

Probe = Callable[[str], Awaitable[bool]]


class Replica:
    """One server: its slots, its load (requests holding or waiting for a slot) and its health."""

    def __init__(self, index: int, url: str, concurrency: int) -> None:
        self.index, self.url, self.concurrency = index, url, concurrency
        self.slots = asyncio.Semaphore(concurrency)
        self.load = 0
        self.in_service = True
        self.failures_in_row = 0


def health_failure(err: Exception) -> bool:
    """Whether a failed attempt says the replica is unwell (rather than busy, or the request wrong)."""
    if isinstance(err, openai.APIStatusError):
        return err.status_code == 408 or err.status_code >= 500
    return isinstance(err, openai.APIConnectionError)  # timeouts are connection errors in the SDK


class ReplicaSet:
    """The replicas of one endpoint, shared by its clients within one event loop."""

    def __init__(self, replicas: list[tuple[str, int]], probe: Probe) -> None:
        self.replicas = [Replica(i, url, c) for i, (url, c) in enumerate(replicas)]
        self._probe = probe
        self._probes: set[asyncio.Task[None]] = set()

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.in_service]

    def pick(self, avoid: set[int] | frozenset[int] = frozenset()) -> Replica:
        live = self.live() or self.replicas
        pool = [r for r in live if r.index not in avoid] or live
        return min(pool, key=lambda r: (r.load / r.concurrency, r.index))

    async def acquire(self, avoid: set[int] | frozenset[int] = frozenset()) -> Replica:
        """A slot on the best replica (see the module's doc); give it back with `release`."""
        while True:
            replica = self.pick(avoid)
            replica.load += 1
            try:
                await replica.slots.acquire()
            except BaseException:
                replica.load -= 1
                raise
            if replica.in_service or not self.live():
                return replica
            self.release(replica)  # taken out while this request waited for it: choose again

    def release(self, replica: Replica) -> None:
        replica.slots.release()
        replica.load -= 1

    def succeeded(self, replica: Replica) -> None:
        replica.failures_in_row = 0
        if not replica.in_service:
            replica.in_service = True
            log.info("replica %s answers again: back in service", replica.url)

    def failed(self, replica: Replica, err: Exception) -> None:
        if not health_failure(err):
            return
        replica.failures_in_row += 1
        if replica.in_service and replica.failures_in_row >= TAKE_OUT_AFTER:
            replica.in_service = False
            log.warning("replica %s failed %d requests in a row: taken out of service, probed again in %.0f s",
                        replica.url, replica.failures_in_row, COOLDOWN_S)  # fmt: skip
            task = asyncio.get_running_loop().create_task(self._watch(replica))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _watch(self, replica: Replica) -> None:
        cooldown = COOLDOWN_S
        while not replica.in_service:
            await asyncio.sleep(cooldown)
            if replica.in_service:
                return
            try:
                ok = await self._probe(replica.url)
            except Exception:  # noqa: BLE001 - a probe that cannot run is a failed probe
                ok = False
            if ok:
                self.succeeded(replica)
                return
            cooldown = min(cooldown * 2, MAX_COOLDOWN_S)

    def close(self) -> None:
        for task in list(self._probes):
            task.cancel()


class Lease:
    """The slot one call holds while its attempts run: on one server, or on a replica that may change."""

    def __init__(self, replicas: ReplicaSet | None = None, replica: Replica | None = None) -> None:
        self._set, self.replica = replicas, replica  # the replica of the latest attempt, held until `release`
        self._held = replica is not None
        self.tried: set[int] = set()
        self.failed_on: list[str] = []  # the replica of each failed attempt, in order

    @property
    def url(self) -> str | None:
        """The base_url of the replica of the latest attempt (None on an endpoint with one server)."""
        return self.replica.url if self.replica is not None else None

    def succeeded(self) -> None:
        if self._set is not None and self.replica is not None:
            self._set.succeeded(self.replica)

    def failed(self, err: Exception) -> None:
        if self._set is not None and self.replica is not None:
            self.failed_on.append(self.replica.url)
            self.tried.add(self.replica.index)
            self._set.failed(self.replica, err)

    async def move(self) -> bool:
        """After a failed attempt: move to an in-service replica this call has not tried, if there is one."""
        if self._set is None or self.replica is None:
            return False
        if not any(r.index not in self.tried for r in self._set.live()):
            return False
        await self._switch(self.tried)
        return True

    async def settle(self) -> None:
        """Before a retry: leave a replica taken out of service for the best one in service, if any."""
        if self._set is not None and self.replica is not None and not self.replica.in_service and self._set.live():
            await self._switch(frozenset())

    async def _switch(self, avoid: set[int] | frozenset[int]) -> None:
        assert self._set is not None and self.replica is not None
        self.release()
        self.replica = await self._set.acquire(avoid)
        self._held = True

    def release(self) -> None:
        if self._set is not None and self.replica is not None and self._held:
            self._set.release(self.replica)
            self._held = False
