"""A run's spending: tokens and cost of the model calls it makes, and the limit that stops new ones.

The flow opens a budget for the run (`spending`); every `ModelClient` made inside it checks the budget just
before it sends a request (holding its server's slot) and charges it when the answer comes. Answers from
the cache cost nothing and are never charged. Once the limit is reached, requests not yet sent are refused
(the client answers them with an error and records no call), and `engine.run_bounded` starts no new job,
so the run ends with what it has. Calls already in flight finish and are charged: a run spends at most its
limit plus the calls in flight when it was reached (at most one per limiter slot).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

from prefsynth.schemas.config import Budget as BudgetSpec

BUDGET_EXHAUSTED = "budget exhausted"  # the error of a request the budget refused (no call was made)


def call_cost(prompt_tokens: int | None, completion_tokens: int | None, price: tuple[float, float] | None) -> float:
    """A call's cost from its reported token usage and its endpoint's price per 1M (input, output) tokens."""
    if price is None:
        return 0.0
    return ((prompt_tokens or 0) * price[0] + (completion_tokens or 0) * price[1]) / 1e6


class Budget:
    """Tokens and cost charged so far against a `BudgetSpec`; thread-safe."""

    def __init__(self, spec: BudgetSpec) -> None:
        self.spec = spec
        self.tokens = 0
        self.cost = 0.0
        self.calls = 0
        self.refused = 0
        self._lock = threading.Lock()

    @property
    def exhausted(self) -> bool:
        s = self.spec
        return (s.max_tokens is not None and self.tokens >= s.max_tokens) or (
            s.max_cost is not None and self.cost >= s.max_cost)  # fmt: skip

    @property
    def stopped(self) -> bool:
        """Whether the budget held back any work (a request, or a job that had not started)."""
        return self.refused > 0

    def refusal(self) -> str | None:
        """The error for a request (or a job) about to start, or None if the budget allows it."""
        if not self.exhausted:
            return None
        with self._lock:
            self.refused += 1
        return f"{BUDGET_EXHAUSTED}: {self.spent()}; not sent"

    def charge(self, prompt_tokens: int | None, completion_tokens: int | None,
               price: tuple[float, float] | None) -> None:  # fmt: skip
        with self._lock:
            self.calls += 1
            self.tokens += (prompt_tokens or 0) + (completion_tokens or 0)
            self.cost += call_cost(prompt_tokens, completion_tokens, price)

    def spent(self) -> str:
        """What was spent against which limits, e.g. `1,040 of max_tokens 1,000 tokens in 26 calls`."""
        s, parts = self.spec, []
        if s.max_tokens is not None:
            parts.append(f"{self.tokens:,} of max_tokens {s.max_tokens:,} tokens")
        if s.max_cost is not None:
            parts.append(f"{self.cost:.4f} of max_cost {s.max_cost:g}")
        return f"{' and '.join(parts)} in {self.calls} calls"


_active: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("prefsynth_budget", default=None)


def active() -> Budget | None:
    """The budget of the run this code is part of, if it has one."""
    return _active.get()


@contextlib.contextmanager
def spending(spec: BudgetSpec | None) -> Iterator[Budget | None]:
    """A budget for the calls made inside; an enclosing one (a loop's, over its rounds) is kept as it is."""
    if _active.get() is not None or spec is None:
        yield _active.get()
        return
    token = _active.set(Budget(spec))
    try:
        yield _active.get()
    finally:
        _active.reset(token)
