"""One run per warehouse at a time among the flow runs of a shared Prefect server.

Runs of deployments start whenever their schedule says, in separate processes; two on the same warehouse
would contend for its file. Where a Prefect server is shared (PREFECT_API_URL names one), a run first takes
the one slot of a global concurrency limit named after the warehouse's resolved path
(`prefsynth-warehouse-<hash>`, created with limit 1 when missing); the next run on that warehouse waits for
it. The slot is a lease that the holder renews: a killed run's slot frees itself within `LEASE_S`.
With Prefect's temporary API (one per command) there is nothing to share: the warehouse file's own lock
applies there. A DuckLake warehouse (warehouse/ducklake.py) takes several writers at once: no slot.
A run inside a run that holds the slot (the synthesis loop's rounds) does not take it again.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from prefsynth.flows.prefect_api import shared_server
from prefsynth.warehouse.ducklake import is_lake

LEASE_S = 60.0
_held: ContextVar[frozenset[str]] = ContextVar("prefsynth_held_warehouses", default=frozenset())


def limit_name(warehouse: str | Path) -> str:
    """The concurrency limit's name: a hash of the warehouse's resolved path (a path is no valid name)."""
    digest = hashlib.sha256(str(Path(warehouse).resolve()).encode()).hexdigest()[:16]
    return f"prefsynth-warehouse-{digest}"


@contextlib.contextmanager
def warehouse_turn(warehouse: str | Path) -> Iterator[None]:
    """Hold the warehouse's slot while inside (see the module's doc); waits for it, saying so, when taken."""
    path = str(Path(warehouse).resolve())
    if is_lake(warehouse) or path in _held.get() or not shared_server():  # a DuckLake takes several writers
        yield
        return
    from prefect import get_run_logger
    from prefect.concurrency.sync import concurrency

    name = limit_name(path)
    _ensure_limit(name)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(concurrency(name, timeout_seconds=1, lease_duration=LEASE_S, strict=True))
        except TimeoutError:
            get_run_logger().info(f"warehouse {path} is in use by another run: waiting for it to finish "
                                  f"(Prefect concurrency limit {name})")  # fmt: skip
            stack.enter_context(concurrency(name, lease_duration=LEASE_S, strict=True))
        token = _held.set(_held.get() | {path})
        try:
            yield
        finally:
            _held.reset(token)


def _ensure_limit(name: str) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
