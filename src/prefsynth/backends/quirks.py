"""What differs between OpenAI-compatible servers, in one place.

- llama-cpp-python's server takes a JSON schema as `{"type": "json_object", "schema": ...}` (its own
  extension, turned into a grammar); OpenAI and vLLM take `{"type": "json_schema", "json_schema": ...}`.
- llama-cpp-python ignores `n > 1` and serves one request at a time: generation sends one request per
  sample, and local endpoints default to two requests in flight.
"""

from __future__ import annotations

from typing import Any

from prefsynth.backends.client import Endpoint


def json_response_format(endpoint: Endpoint, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The `response_format` that asks this server for JSON matching `schema`."""
    if endpoint.server == "llama-cpp":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": False}}
