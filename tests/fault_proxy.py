"""A fault-injecting HTTP proxy on loopback, in front of a real OpenAI-compatible server (the local llama.cpp
server in tests, the loopback fake server in bench/faults.py).

Each POST gets one fault or none, at the given rates: `rate_limit` (429 with Retry-After), `error` (500),
`slow` (forwarded and served, but answered only after `slow_s`: longer than the client's timeout, it is
abandoned by the client while the server still did the work, as a paid API would bill it) and `drop` (the
connection is closed without an answer, nothing forwarded). Everything else is forwarded as is.

The draw is seeded and depends only on the request's body and how many times that body was seen, not on
the order in which concurrent requests arrive: the same requests meet the same faults. `opening` forces the
faults of the first requests (e.g. one of each kind), so that a short test meets every kind whatever a
sampling model answered.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from tests.fake_server import Served

FAULTS = ("rate_limit", "error", "slow", "drop")


class FaultProxy(Served):
    """`with FaultProxy(upstream_base_url, rates={"rate_limit": 0.1, ...}, seed=1) as proxy:` then point clients
    at `proxy.base_url`. `proxy.posts` counts POSTs, `proxy.faults` counts each fault injected."""

    def __init__(self, upstream: str, rates: dict[str, float] | None = None, seed: int = 0, retry_after_s: float = 1.0,
                 slow_s: float = 6.0, opening: list[str] | None = None) -> None:  # fmt: skip
        unknown = (set(rates or {}) | set(opening or [])) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self.rates = dict(rates or {})
        self.opening = list(opening or [])  # faults of the first requests, in order, before the draws
        self.seed, self.retry_after_s, self.slow_s = seed, retry_after_s, slow_s
        self.upstream = urlsplit(upstream)
        self.lock = threading.Lock()
        self.posts = 0
        self.faults: Counter[str] = Counter()
        self.forwarded = 0  # requests the upstream server served (slow ones included)
        self.upstream_errors = 0  # requests the upstream server did not answer (answered 502)
        self._seen: Counter[str] = Counter()
        super().__init__(self._handler())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.upstream.path}"

    def reset(self, rates: dict[str, float] | None = None) -> None:
        """Zero the counters, drop the opening faults (and set new rates, if given)."""
        with self.lock:
            self.posts, self.forwarded, self.upstream_errors = 0, 0, 0
            self.faults.clear()
            self.opening = []
            if rates is not None:
                self.rates = dict(rates)

    def draw(self, body: bytes) -> str | None:
        """The fault for this request (None: forward it), counted."""
        digest = hashlib.sha256(body).hexdigest()
        with self.lock:
            self.posts += 1
            self._seen[digest] += 1
            nth = self._seen[digest]
            if self.posts <= len(self.opening):
                self.faults[self.opening[self.posts - 1]] += 1
                return self.opening[self.posts - 1]
        u = int(hashlib.sha256(f"{self.seed}:{digest}:{nth}".encode()).hexdigest()[:12], 16) / 16**12
        edge = 0.0
        for fault in FAULTS:
            edge += self.rates.get(fault, 0.0)
            if u < edge:
                with self.lock:
                    self.faults[fault] += 1
                return fault
        return None

    def forward(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=600)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            if method == "POST":
                with self.lock:
                    self.forwarded += 1
            return response.status, data, response.getheader("content-type", "application/json")
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, data: bytes, content_type: str = "application/json",
                       extra: dict[str, str] | None = None) -> None:  # fmt: skip
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._reply(*proxy.forward("GET", self.path, None, {}))

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                fault = proxy.draw(body)
                if fault == "rate_limit":
                    self._reply(429, b'{"error": {"message": "rate limited (fault proxy)"}}',
                                extra={"retry-after": f"{proxy.retry_after_s:g}"})  # fmt: skip
                elif fault == "error":
                    self._reply(500, b'{"error": {"message": "internal error (fault proxy)"}}')
                elif fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    try:
                        answer = proxy.forward("POST", self.path, body, {"content-type": "application/json"})
                    except OSError as err:  # the upstream failed: a 502 the test did not draw, counted apart
                        with proxy.lock:
                            proxy.upstream_errors += 1
                        data = json.dumps({"error": {"message": f"upstream: {err}"}}).encode()
                        answer = (502, data, "application/json")
                    if fault == "slow":
                        time.sleep(proxy.slow_s)
                    try:
                        self._reply(*answer)
                    except OSError:  # the client gave up on it (its timeout): the server served it anyway
                        self.close_connection = True

        return Handler
