"""The embedded model server: llama-cpp-python's OpenAI-compatible server plus vLLM's `prompt_logprobs`.

Run as `python -m prefsynth.backends.llama_server --model X.gguf ...` (the same arguments as
`python -m llama_cpp.server`). Every route is llama-cpp-python's own, except that a `/v1/completions`
request carrying `prompt_logprobs` is answered here, in the shape vLLM uses, so that the one log-prob
provider that speaks to vLLM also speaks to the embedded default.

Why: llama-cpp-python's `echo` + `logprobs` path sorts the whole vocabulary in Python for every prompt
token (measured here: 27 s for 294 tokens on SmolLM2-135M, 200 s on Gemma-3-270M). This path evaluates
the prompt once and takes log-softmax of the logits with numpy: about the cost of the forward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import uuid

import numpy as np
import uvicorn
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from llama_cpp import Llama
from llama_cpp.server import app as llama_app
from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings
from starlette.concurrency import run_in_threadpool

_BLOCK = 64  # logits rows per numpy block: bounds memory for large vocabularies


_last: dict[int, tuple[list[int], list[float | None]]] = {}  # per model: the last request's tokens, log-probs


def prompt_token_logprobs(llama: Llama, text: str) -> tuple[list[int], list[float | None]]:
    """Tokens of `text` (BOS added as the model says) and each one's log-prob given those before it.

    The text is evaluated in one pass from an empty KV cache, so the numbers equal an in-process
    evaluation of the same text (reusing a cached prefix would evaluate the rest in smaller batches,
    which changes the logits slightly). A text that is a prefix of the previous request's (a context
    after its reply: how CDR asks) is answered from that request's log-probs without any evaluation.
    """
    tokens = llama.tokenize(text.encode("utf-8"), add_bos=llama._model.add_bos_token(), special=True)
    if len(tokens) >= llama.n_ctx():
        raise ValueError(f"text has {len(tokens)} tokens; the server's context is {llama.n_ctx()}")
    prev_tokens, prev = _last.get(id(llama), ([], []))
    if len(tokens) <= len(prev_tokens) and prev_tokens[: len(tokens)] == tokens:
        return tokens, prev[: len(tokens)]
    llama.reset()
    llama.eval(tokens)
    out: list[float | None] = [None]
    targets = np.asarray(tokens[1:])
    logits = llama.scores[: len(tokens) - 1]
    for lo in range(0, len(targets), _BLOCK):
        rows = logits[lo : lo + _BLOCK].astype(np.float64)
        top = rows.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
        picked = rows[np.arange(len(rows)), targets[lo : lo + _BLOCK]]
        out.extend((picked - lse).tolist())
    _last[id(llama)] = (tokens, out)
    return tokens, out


async def completions(request: Request) -> object:
    """`/v1/completions`: prompt_logprobs here; anything else goes to llama-cpp-python unchanged."""
    data = await request.json()
    if data.get("prompt_logprobs") is None:
        body = llama_app.CreateCompletionRequest.model_validate(data)
        result = await llama_app.create_completion(request, body)
        if isinstance(result, dict):  # llama-cpp-python's log-probs are numpy floats: make them JSON
            return JSONResponse(json.loads(json.dumps(result, default=float)))
        return result
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        return JSONResponse({"error": {"message": "prompt_logprobs needs one non-empty text prompt"}}, 400)
    async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)() as proxy:
        llama = proxy(data.get("model"))
        try:
            tokens, logprobs = await run_in_threadpool(prompt_token_logprobs, llama, prompt)
        except ValueError as err:
            return JSONResponse({"error": {"message": str(err)}}, 400)
        pieces = [llama._model.token_get_text(t) for t in tokens]
    entries = [
        None if lp is None else {str(t): {"logprob": lp, "rank": None, "decoded_token": piece}}
        for t, lp, piece in zip(tokens, logprobs, pieces, strict=True)
    ]
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": data.get("model") or "local",
        "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                     "prompt_logprobs": entries}],
        "usage": {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args_from_model(parser, Settings)
    args = parser.parse_args()
    server = parse_model_from_args(ServerSettings, args)
    model = parse_model_from_args(ModelSettings, args)
    app = llama_app.create_app(server_settings=server, model_settings=[model])
    route = APIRoute("/v1/completions", completions, methods=["POST"],
                     dependencies=[Depends(llama_app.authenticate)])  # fmt: skip
    app.router.routes.insert(0, route)
    uvicorn.run(app, host=loopback(server.host), port=server.port, log_level="warning")


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def loopback(host: str) -> str:
    """The host to bind: loopback only. llama-cpp-python's own `main` lets the HOST variable override the
    argument, which in a container (HOST=0.0.0.0 is common) would serve the model to the network."""
    if host not in LOOPBACK:
        raise SystemExit(f"the embedded model server binds to loopback only ({', '.join(LOOPBACK)}), not {host!r}")
    return host


if __name__ == "__main__":
    main()
