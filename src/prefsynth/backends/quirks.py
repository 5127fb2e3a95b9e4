"""What differs between OpenAI-compatible servers, in one place.

- llama-cpp-python's server takes a JSON schema as `{"type": "json_object", "schema": ...}` (its own
  extension, turned into a grammar); OpenAI and vLLM take `{"type": "json_schema", "json_schema": ...}`.
- llama-cpp-python ignores `n > 1` and serves one request at a time: generation sends one request per
  sample, and local endpoints default to one request in flight (a second one waiting slows it down).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefsynth.backends.client import Endpoint


def json_response_format(endpoint: Endpoint, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The `response_format` that asks this server for JSON matching `schema`."""
    if endpoint.server == "llama-cpp":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": False}}


# ---- prompt log-probs -----------------------------------------------------------------------------
# Both providers return one value per prompt token, the first null (nothing precedes it); callers mask
# the context's tokens by count (see tasks/scorers/cdr.py), so no tokenizer is needed on this side.
# echo (llama-cpp-python, vLLM, legacy OpenAI): `/v1/completions` with echo=True and logprobs lists the
#   prompt's tokens, then the generated ones. llama-cpp-python cannot take max_tokens=0, so one token is
#   generated: drop the last `usage.completion_tokens` entries. llama-cpp-python also drops tokens equal
#   to the BOS id (in context and full text alike, so counts stay consistent) and reports special tokens
#   as empty text, so its text offsets cannot locate a reply. Its echo path sorts the vocabulary in Python
#   per token (about 90 ms a token on SmolLM2): usable for short texts only, and misaligned for models
#   that add no BOS token unless the text starts with the BOS token's text.
# prompt_logprobs (vLLM, the embedded server): `"prompt_logprobs": 0` returns, per prompt token, null
#   for the first and otherwise {token_id: {"logprob": ..., "rank": ..., "decoded_token": ...}}.
_ECHO = {"max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
_PROMPT_LOGPROBS = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
NONSTANDARD = ("prompt_logprobs",)  # sent as extra_body by the OpenAI SDK


def logprob_request(endpoint: Endpoint, text: str) -> dict[str, Any]:
    """The `/v1/completions` body that asks this server for the log-prob of every token of `text`."""
    extra = _PROMPT_LOGPROBS if endpoint.logprobs == "prompt_logprobs" else _ECHO
    return {"prompt": text, **extra}


def parse_logprobs(endpoint: Endpoint, payload: dict[str, Any]) -> list[float | None]:
    """One log-prob per prompt token (None for the first) from a completions response."""
    choice = (payload.get("choices") or [None])[0]
    if not isinstance(choice, dict):
        raise ValueError("response has no choices")
    if endpoint.logprobs == "prompt_logprobs":
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or not entries:
            raise ValueError("response has no prompt_logprobs (does the server support them?)")
        values: list[float | None] = [None]
        for entry in entries[1:]:
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError("expected exactly one log-prob per prompt token (send prompt_logprobs=0)")
            values.append(float(next(iter(entry.values()))["logprob"]))
        return values
    logprobs = choice.get("logprobs") or {}
    raw = logprobs.get("token_logprobs")
    if not isinstance(raw, list) or not raw:
        raise ValueError("response has no token_logprobs (does the server support echo with logprobs?)")
    generated = int((payload.get("usage") or {}).get("completion_tokens") or 0)
    prompt_part = raw[: len(raw) - generated] if generated else raw
    return [None, *(None if v is None else float(v) for v in prompt_part[1:])]
