"""A loopback HTTP server speaking just enough of the OpenAI API to inject faults, replay recorded responses
and answer deterministically (the engine's crash and install tests). Never a stand-in for a model in tests
of what a model does: those use the real llama.cpp server."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

# The shape llama-cpp-python's server returns for /v1/chat/completions (recorded, ids shortened).
RECORDED_CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1763900000,
    "model": "smollm2-135m-instruct",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 31, "completion_tokens": 9, "total_tokens": 40},
}  # fmt: skip

Reply = tuple[int, dict[str, Any]]


def chat_reply(content: str) -> Reply:
    body = json.loads(json.dumps(RECORDED_CHAT))
    body["choices"][0]["message"]["content"] = content
    return 200, body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default backlog (5) resets connections under load: faults nobody drew


class Served:
    """An HTTP server with this handler on 127.0.0.1, in a thread, for `with`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = _Server(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class LoopbackServer(Served):
    """An HTTP server on 127.0.0.1 in a thread: `respond(path, body) -> (status, json)` answers each POST,
    after `keep(path, body)` has recorded it; GET answers a model list."""

    def __init__(self, respond: Callable[[str, dict[str, Any]], Reply]) -> None:
        fake = self
        self.authorizations: list[str | None] = []  # the Authorization header of every request, in order

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("retry-after-ms", "5")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                fake.authorizations.append(self.headers.get("authorization"))
                self._send(*fake.models())

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.authorizations.append(self.headers.get("authorization"))
                fake.keep(self.path, body)
                self._send(*respond(self.path, body))

        super().__init__(Handler)

    def keep(self, path: str, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def models(self) -> Reply:
        """The answer to GET (e.g. /v1/models)."""
        return 200, {"object": "list", "data": [{"id": "fake", "object": "model"}]}


class FakeOpenAI(LoopbackServer):
    """`respond(body) -> (status, json)` decides each chat reply; request bodies are kept in `requests`."""

    def __init__(self, respond: Callable[[dict[str, Any]], Reply]) -> None:
        self.requests: list[dict[str, Any]] = []
        super().__init__(lambda path, body: respond(body))

    def keep(self, path: str, body: dict[str, Any]) -> None:
        self.requests.append(body)


def deterministic_reply(body: dict[str, Any]) -> Reply:
    """An answer that is a hash of the request: a rating for a judge's request, a verdict for a pairwise
    judge's, else a short text."""
    digest = int(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(), 16)
    kind = (body.get("response_format") or {}).get("json_schema", {}).get("name")
    if kind == "judgment":
        return chat_reply(json.dumps({"rationale": "ok", "score": digest % 10 + 1}))
    if kind == "verdict":
        return chat_reply(json.dumps({"rationale": "ok", "verdict": "AB"[digest % 2]}))
    return chat_reply(f"answer {digest % 1000}")


class CountingServer(FakeOpenAI):
    """Deterministic answers (`deterministic_reply`) after `latency_s`; keeps every request."""

    def __init__(self, latency_s: float = 0.04) -> None:
        self.lock = threading.Lock()

        def respond(body: dict[str, Any]) -> Reply:
            time.sleep(latency_s)
            return deterministic_reply(body)

        super().__init__(respond)

    def keep(self, path: str, body: dict[str, Any]) -> None:
        with self.lock:
            super().keep(path, body)


class BatchServer(Served):
    """The files and batches API of OpenAI on 127.0.0.1, in a thread: uploads (`purpose=batch`), batches on
    them, and their output files, answered by `deterministic_reply`. A batch stays `in_progress` until
    `release` is set; `uploads` and `creates` keep what arrived. Chat completions sent directly are refused."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.uploads: list[list[str]] = []  # custom_ids of each uploaded file
        self.creates: list[str] = []  # input file id of each batch created
        self.direct = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: Any, raw: bytes | None = None) -> None:
                data = raw if raw is not None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/octet-stream" if raw is not None else "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0].removeprefix("/v1")
                if path.startswith("/files/") and path.endswith("/content"):
                    return self._send(200, None, fake.files[path.split("/")[2]])
                if path.startswith("/batches/"):
                    return self._send(200, fake.batch(path.split("/")[2]))
                if path == "/batches":
                    data = [fake.batch(b) for b in reversed(list(fake.batches))]
                    return self._send(200, {"object": "list", "data": data, "has_more": False})
                self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers["content-length"]))
                path = self.path.removeprefix("/v1")
                if path == "/files":
                    return self._send(200, fake.upload(self.headers["content-type"], raw))
                if path == "/batches":
                    return self._send(200, fake.create(json.loads(raw)["input_file_id"]))
                fake.direct += 1
                self._send(400, {"error": {"message": "this server only takes batches"}})

        super().__init__(Handler)
        self.lock = threading.Lock()

    def upload(self, content_type: str, raw: bytes) -> dict[str, Any]:
        from email.parser import BytesParser

        message = BytesParser().parsebytes(f"content-type: {content_type}\r\n\r\n".encode() + raw)
        parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                 for p in message.get_payload()}  # fmt: skip
        assert parts["purpose"] == b"batch"
        with self.lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = parts["file"]
            self.uploads.append([json.loads(line)["custom_id"] for line in parts["file"].splitlines() if line])
        return {"id": file_id, "object": "file", "bytes": len(parts["file"]), "created_at": 0,
                "filename": "batch.jsonl", "purpose": "batch", "status": "processed"}  # fmt: skip

    def create(self, input_file_id: str) -> dict[str, Any]:
        with self.lock:
            batch_id = f"batch-{len(self.batches) + 1}"
            self.batches[batch_id] = {"input_file_id": input_file_id, "output_file_id": None}
            self.creates.append(input_file_id)
        return self.batch(batch_id)

    def batch(self, batch_id: str) -> dict[str, Any]:
        with self.lock:
            state = self.batches[batch_id]
            if self.release.is_set() and state["output_file_id"] is None:
                lines = []
                for line in self.files[state["input_file_id"]].splitlines():
                    request = json.loads(line)
                    status, body = deterministic_reply(request["body"])
                    lines.append(json.dumps({"custom_id": request["custom_id"], "error": None,
                                             "response": {"status_code": status, "body": body}}))
                state["output_file_id"] = f"file-out-{batch_id}"
                self.files[state["output_file_id"]] = "\n".join(lines).encode() + b"\n"
            done = state["output_file_id"] is not None
        return {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "completion_window": "24h",
                "created_at": 0, "input_file_id": state["input_file_id"], "error_file_id": None,
                "status": "completed" if done else "in_progress", "output_file_id": state["output_file_id"]}

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        super().__exit__(*exc)
