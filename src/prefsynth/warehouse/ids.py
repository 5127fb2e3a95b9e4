"""Content-addressed ids: a hash of everything that determined a row, in canonical JSON."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept as is: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_default)


def _default(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot hash value of type {type(value).__name__}")


def content_id(kind: str, *parts: Any) -> str:
    """A 32-hex-digit id for `parts`, namespaced by `kind` so that different tables never collide."""
    digest = hashlib.sha256(canonical_json([kind, *parts]).encode()).hexdigest()
    return digest[:32]


# A conversation of placeholders: what a scorer sends for it shows every text the scorer adds to the data.
PLACEHOLDER_TURNS = (
    {"role": "system", "content": "<system>"},
    {"role": "user", "content": "<user>"},
    {"role": "assistant", "content": "<assistant>"},
    {"role": "user", "content": "<user>"},
)


def template_id(*texts: Any) -> str:
    """The id of the texts a scorer sends a model besides the data (system prompts, templates, instructions,
    schemas), best rendered for placeholder data: edit one character and the scorer gets a new id."""
    return content_id("template", *texts)


def prompt_id(messages: list[dict[str, str]]) -> str:
    return content_id("prompt", messages)


def call_id(model_identity: str, body: dict[str, Any]) -> str:
    return content_id("call", model_identity, body)


def response_id(prompt: str, model_identity: str, sampling: dict[str, Any], sample_index: int) -> str:
    return content_id("response", prompt, model_identity, sampling, sample_index)


def scorer_id(config: dict[str, Any]) -> str:
    return content_id("scorer", config)


def score_id(response: str, scorer: str) -> str:
    return content_id("score", response, scorer)


def pair_id(chosen: str, rejected: str, rule: dict[str, Any], scores: tuple[float, float]) -> str:
    """Scores are part of the id: a win share or a panel value can change when the other responses do."""
    return content_id("pair", chosen, rejected, rule, [round(s, 9) for s in scores])


DRAW_BITS = 52  # a double holds every such fraction exactly


def split_draws(prompt_ids: Any, seed: int) -> Any:
    """prompt_id, draw in [0, 1) of each id (a polars Series): the first 52 bits of
    sha256("{seed}:{prompt_id}") over 2**52. DuckDB's sha256 in memory (not the warehouse): vectorized and
    the same on every machine and version, unlike polars' hash."""
    import duckdb
    import polars as pl

    ids = pl.DataFrame({"prompt_id": prompt_ids}, schema={"prompt_id": pl.String}).unique().sort("prompt_id")
    with duckdb.connect() as con:
        con.register("_ids", ids.to_arrow())
        sql = (f"SELECT prompt_id, ('0x' || substr(sha256($1 || ':' || prompt_id), 1, {DRAW_BITS // 4}))::UBIGINT "
               f"/ {2**DRAW_BITS}.0 AS draw FROM _ids ORDER BY prompt_id")  # fmt: skip
        return con.execute(sql, [str(seed)]).pl()
