"""One warehouse, several processes: the run that holds the file serves the others' queries.

DuckDB lets one process open a file read-write and then no other process can open it at all. So a run
(the one writer) serves SQL on 127.0.0.1 while it holds the file: `prefsynth stats`, `export` and
`prefsynth.Warehouse` in other processes find it through a sidecar file next to the warehouse
(`<file>.serving.json`: pid, port and a random token, readable by the file's owner only) and send their
queries there. Each query runs on its own cursor of the run's connection: it sees what the run has
committed, as of the query's start. Results travel as Arrow IPC.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from prefsynth.errors import WarehouseError

TIMEOUT_S = 120.0  # one query's longest wait for the run's answer


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".serving.json")


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def _hugeints(table: pa.Table) -> pa.Table:
    """HUGEINT columns (e.g. a sum of integers) as int64: Arrow carries them as decimal(38, 0), which would
    reach the reader as Decimal where a local duckdb result gives int."""
    for i, field in enumerate(table.schema):
        if field.type == pa.decimal128(38, 0):
            with contextlib.suppress(pa.ArrowInvalid):
                table = table.set_column(i, field.name, table.column(i).cast(pa.int64()))
    return table


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # readers at once (the default backlog of 5 resets connections beyond it)


class QueryServer:
    """Serves SQL on this process's connection to the warehouse at `path` until `stop`."""

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection, lock: threading.Lock) -> None:
        self.path, self.con, self.lock = path, con, lock
        self.token = secrets.token_hex(16)
        self.active, self.idle = 0, threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                if not secrets.compare_digest(self.headers.get("Authorization", ""), f"Bearer {server.token}"):
                    return self._reply(403, b'{"error": "PermissionError", "message": "bad token"}', "json")
                with server.idle:
                    server.active += 1
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    data, kind = _ipc(server.query(body)), "arrow"
                except Exception as err:  # noqa: BLE001 - the reader gets the error, the run goes on
                    data, kind = json.dumps({"error": type(err).__name__, "message": str(err)}).encode(), "json"
                finally:
                    with server.idle:
                        server.active -= 1
                        server.idle.notify_all()
                self._reply(200 if kind == "arrow" else 400, data, kind)

            def _reply(self, status: int, data: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", f"application/{kind}")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # no access log on stderr
                pass

        self.http = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, args=(0.05,), name="warehouse-queries",
                                       daemon=True)  # polls every 50 ms: `stop` returns that fast

    def query(self, body: dict[str, Any]) -> pa.Table:
        if body.get("read_only", True) and any(
                st.type != duckdb.StatementType.SELECT for st in duckdb.extract_statements(body["sql"])):
            raise duckdb.PermissionException("a read-only opener of the warehouse may only run SELECT statements")
        with self.lock:  # the run's threads use `con`; a cursor is a connection of its own
            cur = self.con.cursor()
        try:
            for name, data in body.get("tables", {}).items():
                cur.register(name, _table(base64.b64decode(data)))
            result = cur.execute(body["sql"], body.get("params") or [])
            return _hugeints(result.to_arrow_table()) if result.description else pa.table({})
        finally:
            cur.close()

    def start(self) -> QueryServer | None:
        """Serve, and say so next to the warehouse; None (nothing served) if that file cannot be written."""
        info = {"pid": os.getpid(), "port": self.http.server_address[1], "token": self.token}
        tmp = sidecar(self.path).with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            tmp.replace(sidecar(self.path))
        except OSError:  # a read-only folder: the run goes on, other processes wait for the file instead
            self.http.server_close()
            return None
        self.thread.start()
        return self

    def stop(self, patience_s: float = 10.0) -> None:
        """Stop saying so and taking queries, and let those running finish (up to `patience_s`)."""
        with contextlib.suppress(OSError, ValueError):
            if json.loads(sidecar(self.path).read_text())["token"] == self.token:
                sidecar(self.path).unlink()
        self.http.shutdown()
        self.http.server_close()
        with self.idle:
            self.idle.wait_for(lambda: self.active == 0, timeout=patience_s)


def serving(path: Path) -> dict[str, Any] | None:
    """The sidecar of a live run serving `path`, or None (none, or its process is gone)."""
    try:
        info = json.loads(sidecar(path).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return info


class RemoteResult:
    """A query's result from the serving run, with the duckdb result methods the Store uses."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(row.values()) for row in self.table.to_pylist()]

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self.table.slice(0, 1).to_pylist()
        return tuple(rows[0].values()) if rows else None

    def pl(self) -> pl.DataFrame:
        return pl.DataFrame(pl.from_arrow(self.table)) if self.table.num_columns else pl.DataFrame()


class RemoteConnection:
    """Stands in for a duckdb connection to a warehouse that another process (a run) holds."""

    def __init__(self, path: Path, info: dict[str, Any], read_only: bool = True) -> None:
        self.path, self.info, self.read_only = path, info, read_only
        self.url = f"http://127.0.0.1:{info['port']}/query"
        self.tables: dict[str, str] = {}

    def execute(self, sql: str, params: list[Any] | dict[str, Any] | None = None) -> RemoteResult:
        body = json.dumps({"sql": sql, "params": params or [], "tables": self.tables,
                           "read_only": self.read_only}).encode()  # fmt: skip
        request = urllib.request.Request(self.url, body, {"Authorization": f"Bearer {self.info['token']}",
                                                          "Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
                return RemoteResult(_table(reply.read()))
        except urllib.error.HTTPError as err:
            problem = json.loads(err.read() or b"{}")
            kind = getattr(duckdb, problem.get("error", ""), None)
            kind = kind if isinstance(kind, type) and issubclass(kind, duckdb.Error) else duckdb.Error
            raise kind(problem.get("message", str(err))) from None
        except OSError as err:
            raise WarehouseError(f"the run that holds {self.path} (pid {self.info['pid']}) did not answer ({err}); "
                                 "it may have just finished: try again") from None  # fmt: skip

    def cursor(self) -> RemoteConnection:
        return RemoteConnection(self.path, self.info, self.read_only)

    def register(self, name: str, table: pa.Table) -> None:
        self.tables[name] = base64.b64encode(_ipc(table)).decode()

    def unregister(self, name: str) -> None:
        self.tables.pop(name, None)

    def close(self) -> None:
        self.tables.clear()
