"""What LLM judges share: one pydantic model per reply format, and asking for a reply that parses.

A reply model gives the JSON schema sent to the server (`reply_schema`), the shape shown in the prompt
(`reply_shape`, from each field's description) and the parser (`parse_reply`): the first JSON object of
the reply, validated by the model, its errors turned into the short sentences a repair prompt quotes.
A reply that does not parse gets one repair prompt naming the problem; if the repaired reply does not
parse either, the caller records a failure with both raw texts (never a silent null).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

from prefsynth.backends.client import ChatOutcome, ModelClient
from prefsynth.schemas.records import Message
from prefsynth.warehouse.ids import PLACEHOLDER_TURNS

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# The schema asks for every field (a complete reply); parsing tolerates a missing rationale.
REPLY_CONFIG = ConfigDict(json_schema_serialization_defaults_required=True)
_NOT_SENT = ("title", "default", "description")  # descriptions are the placeholders of `reply_shape`


def rationale_field(max_length: int, placeholder: str) -> Any:
    """A free-text rationale: a string of at most `max_length` in the schema; anything else parses as None."""
    text = Annotated[str | None, BeforeValidator(lambda v: v if isinstance(v, str) else None),
                     WithJsonSchema({"type": "string", "maxLength": max_length})]  # fmt: skip
    return text, Field(None, description=f'"{placeholder}"')


def reply_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema the server is asked to follow."""
    schema = model.model_json_schema(mode="serialization")
    properties = {name: {k: v for k, v in field.items() if k not in _NOT_SENT}
                  for name, field in schema["properties"].items()}  # fmt: skip
    return {"type": "object", "properties": properties, "required": schema["required"]}


def reply_shape(model: type[BaseModel]) -> str:
    """The reply's shape as the prompt shows it: {"field": <placeholder>, ...}."""
    return "{" + ", ".join(f'"{f.alias or name}": {f.description}' for name, f in model.model_fields.items()) + "}"


def parse_reply(model: type[M], text: str) -> M:
    """The reply's first JSON object validated by `model`; ValueError saying what is wrong."""
    try:
        return model.model_validate(json_object(text))
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(map(str, first["loc"]))
        if first["type"] == "missing":
            raise ValueError(f'the JSON object has no "{name}"') from None
        if first["type"] == "value_error":  # a field's own check: "is outside 1..10", ...
            raise ValueError(f'"{name}" {first["ctx"]["error"]}') from None
        raise ValueError(f'"{name}": {first["msg"]}') from None


def placeholder_turns() -> list[Message]:
    """A conversation of placeholders, to render a scorer's request for its template id."""
    return [Message(**turn) for turn in PLACEHOLDER_TURNS]


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
