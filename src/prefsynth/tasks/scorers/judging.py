"""What LLM judges share: asking for a reply that parses, with one repair.

A reply that does not parse gets one repair prompt naming the problem; if the repaired reply does not
parse either, the caller records a failure with both raw texts (never a silent null).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prefsynth.backends.client import ChatOutcome, ModelClient

T = TypeVar("T")


def json_object(text: str) -> dict[str, Any]:
    """The first JSON object in a reply (code fences and chatter around it are ignored)."""
    cleaned = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    start = cleaned.find("{")
    if start < 0:
        raise ValueError("no JSON object found")
    try:
        data, _ = json.JSONDecoder().raw_decode(cleaned[start:])
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError("no JSON object found")
    return data


@dataclass
class Parsed(Generic[T]):
    """A judge's parsed reply, or why there is none. `outcomes` are every call made for it, in order."""

    value: T | None = None
    raw: str = ""
    error: str | None = None
    repaired: bool = False
    outcomes: list[ChatOutcome] = field(default_factory=list)

    @property
    def call_ids(self) -> list[str]:
        return [o.call.call_id for o in self.outcomes]

    def tokens(self, key: str) -> int | None:
        counts = [getattr(o.call, key) for o in self.outcomes if getattr(o.call, key) is not None]
        return sum(counts) if counts else None


async def ask_parsed(
    client: ModelClient,
    messages: list[dict[str, str]],
    body: Callable[[list[dict[str, str]]], dict[str, Any]],
    parse: Callable[[str], T],
    repair: Callable[[str], str],
) -> Parsed[T]:
    """Ask, parse; on a ValueError ask once more with `repair(problem)` appended, then give up."""
    out: Parsed[T] = Parsed()
    first = await client.chat(body(messages))
    out.outcomes.append(first)
    if not first.ok:
        out.error = f"judge call failed: {first.call.error}"
        return out
    out.raw = first.text or ""
    try:
        out.value = parse(out.raw)
        return out
    except ValueError as problem:
        retry = [*messages, {"role": "assistant", "content": out.raw},
                 {"role": "user", "content": repair(str(problem))}]  # fmt: skip
    second = await client.chat(body(retry))
    out.outcomes.append(second)
    if not second.ok:
        out.error = f"repair call failed: {second.call.error}"
        return out
    try:
        out.value = parse(second.text or "")
    except ValueError as again:
        out.error = f"unparsable judgment after repair: {again}"
        out.raw = f"{out.raw}\n--- repair ---\n{second.text}"
        return out
    out.raw, out.repaired = second.text or "", True
    return out
