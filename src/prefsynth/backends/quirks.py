"""What differs between OpenAI-compatible servers, in one place.

- llama-cpp-python's server takes a JSON schema as `{"type": "json_object", "schema": ...}` (its own
  extension, turned into a grammar); OpenAI and vLLM take `{"type": "json_schema", "json_schema": ...}`.
- llama-cpp-python ignores `n > 1` and serves one request at a time: generation sends one request per
  sample, and local endpoints default to one request in flight (a second one waiting slows it down).
- Reward models are scored through vLLM's `/pooling` and `/classify`, which live at the server root,
  not under `/v1` (see the reward section below).
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


# ---- reward models (vLLM's pooling APIs) -----------------------------------------------------------
# vLLM serves `/pooling` and `/classify` at the server root, not under `/v1`: a base_url ending in `/v1`
# (the convention for every other endpoint here) has that suffix dropped. Requests are chat-style
# (`messages`: the prompt's turns, then the response as the assistant turn); the server applies the model's
# chat template without a generation prompt. Responses (vLLM's PoolingResponse / ClassificationResponse):
#   /pooling:  {"data": [{"index": 0, "object": "pooling", "data": <list[float] | list[list[float]]>}], ...}
#              a 1-D list is a sequence-wise output (task classify: one value per label); a 2-D list is a
#              token-wise output (task token_classify: one row of per-label values per token). The reward is
#              value[label_index] of the sequence, or of the last token's row. We send use_activation=false
#              so the values are the model's raw outputs (a one-label classifier would otherwise be sigmoided).
#   /classify: {"data": [{"index": 0, "label": "...", "probs": [...], "num_classes": n}], ...}
#              the reward is probs[label_index] (the server's softmax, or sigmoid for one label).
REWARD_APIS = ("pooling", "classify")


def reward_request(api: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """The request body for `api`; its `api` key picks the path and is not sent (the model name is added)."""
    extra = {"use_activation": False} if api == "pooling" else {}
    return {"api": api, "messages": messages, **extra}


def reward_url(base_url: str, api: str) -> str:
    """The absolute URL of `api`: at the server root, so a trailing `/v1` of base_url is dropped."""
    root = base_url.rstrip("/")
    return f"{root.removesuffix('/v1')}/{api}"


def compact_reward_response(api: str, payload: Any) -> dict[str, Any]:
    """What is kept of a response: its first item (a token-wise output cut to its last row) and the usage.

    Raises ValueError, saying what is wrong, when the shape is not the documented one.
    """
    item = _first_item(api, payload)
    if api == "pooling" and _is_matrix(item["data"]):
        item = {**item, "data": item["data"][-1:]}
    usage = payload.get("usage") or {}
    return {"data": [item], "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": 0}


def parse_reward(api: str, payload: Any, label_index: int) -> float:
    """The reward in a `/pooling` or `/classify` response (or its compact form); ValueError if unreadable."""
    item = _first_item(api, payload)
    values = item["probs"] if api == "classify" else item["data"]
    if _is_matrix(values):
        values = values[-1]  # token-wise: the last token's row
    if not label_index < len(values):
        raise ValueError(f"label_index {label_index} is out of range: the model returned {len(values)} value(s)")
    return float(values[label_index])


def _first_item(api: str, payload: Any) -> dict[str, Any]:
    if api not in REWARD_APIS:
        raise ValueError(f"unknown reward api {api!r}")
    items = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise ValueError(f"expected a JSON object with a non-empty `data` list from /{api}")
    item = items[0]
    key = "probs" if api == "classify" else "data"
    values = item.get(key)
    if isinstance(values, str):
        raise ValueError(f"`data[0].{key}` is a base64 string; the server must answer with encoding_format float")
    if not (_is_vector(values) or (api == "pooling" and _is_matrix(values) and all(map(_is_vector, values)))):
        raise ValueError(f"`data[0].{key}` is not a non-empty list of numbers (or, for /pooling, of such lists)")
    return item


def _is_vector(values: Any) -> bool:
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    )


def _is_matrix(values: Any) -> bool:
    return isinstance(values, list) and bool(values) and isinstance(values[0], list)
