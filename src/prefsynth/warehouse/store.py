"""The one class that writes DuckDB. All SQL of the project lives here, in reader.py and in migrations/.

One process holds the file read-write: the flow. Tasks return record batches; `Store.write` inserts each
batch in one statement through Arrow, inside one transaction per batch, so a crash loses only calls that
were in flight.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import shlex
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
from pydantic import BaseModel

from prefsynth.errors import PrefsynthError, WarehouseError
from prefsynth.schemas.records import TABLES, HumanLabel, Message, Pair, Prompt, ReviewTask, StageResult, columns
from prefsynth.warehouse import ducklake
from prefsynth.warehouse.sharing import QueryServer, RemoteConnection, serving

_log = logging.getLogger(__name__)
READER_WAIT_S = 15.0  # how long a reader waits for a file that a process holds without serving it
# A writer checkpoints when its WAL reaches this (duckdb's default, 16 MiB, checkpoints every few batches and
# rewrites the growing key indexes each time: 1.7x slower bulk writes). Data in the WAL replays after a crash.
CHECKPOINT_THRESHOLD = "256MiB"
# duckdb caches the table blocks it reads and writes up to `memory_limit`, 80% of RAM by default: a writer's RSS
# grew with its warehouse. A writer's limit is this cache plus room for every key of its indexes, which duckdb
# cannot evict and loads as writes touch them (measured ~70 bytes a 32-digit key; KEY_BYTES leaves a margin).
CACHE_BYTES = 384 * 2**20
KEY_BYTES = 100
_REBOUND_ROWS = 200_000  # rows written between two looks at the keys (at most ~40 MB more of them)
_KEYS = """SELECT coalesce(sum(t.estimated_size * k.n), 0) FROM duckdb_tables() t JOIN (
    SELECT table_oid, count(*) AS n FROM (
        SELECT table_oid FROM duckdb_constraints() WHERE constraint_type IN ('PRIMARY KEY', 'UNIQUE')
        UNION ALL SELECT table_oid FROM duckdb_indexes()) GROUP BY table_oid) k USING (table_oid)
    WHERE t.database_name = current_database()"""
STATS_TABLES = ("runs", "prompts", "responses", "scores", "judgments", "comparisons", "failures", "pairs",
                "refinements", "run_anchors", "prompt_flags", "dataset_snapshots", "logprobs", "prompt_routes", "evals",
                "model_calls", "prompt_versions", "loop_rounds", "review_tasks", "human_labels")


_LINK_TABLES = ("run_prompts", "run_pairs", "scorer_diagnostics", "batch_calls", "snapshot_rows")


def _table(name: str) -> str:
    """A table name for SQL built here: one of the warehouse's own, never text from a config or a caller
    (a config's `warehouse_table` is quoted as an identifier instead: `prompts_from_table`)."""
    if name not in TABLES and name not in STATS_TABLES and name not in _LINK_TABLES:
        raise ValueError(f"not a warehouse table: {name!r}")
    return name


def export_view(fmt: str) -> tuple[str, str]:
    """The view an export of this format reads, and its rows' key: a run's anchors for `sft`, else its pairs."""
    return ("v_run_anchors", "response_id") if fmt == "sft" else ("v_run_pairs", "pair_id")


def frame(table: str, rows: Iterable[BaseModel | dict[str, Any]]) -> pl.DataFrame:
    """Records -> a polars frame with the table's column types (nested models as JSON text)."""
    schema = columns(table)
    dicts = [_row(r, schema) if isinstance(r, BaseModel) else r for r in rows]
    return pl.DataFrame(dicts, schema=schema, orient="row" if not dicts else None)


def _row(record: BaseModel, schema: dict[str, Any]) -> dict[str, Any]:
    row = record.model_dump()
    for name, value in row.items():
        if schema[name] == pl.String and isinstance(value, list):
            row[name] = json.dumps(value)
    return row


def _migrations() -> list[Any]:
    """The numbered migrations/NNN_*.sql files, in order."""
    folder = resources.files("prefsynth.warehouse").joinpath("migrations")
    return sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)


def _make_folder(path: Path) -> None:
    """Create the warehouse's folder; WarehouseError naming it if that is impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        where = err.filename or path.parent
        raise WarehouseError(f"cannot create the folder of warehouse {path}: {where}: {err.strerror}; "
                             "choose another --db (or `warehouse:` path)") from None


def _connect(path: Path, read_only: bool, wait_s: float | None, notify: Callable[[str], None]
             ) -> duckdb.DuckDBPyConnection | RemoteConnection:  # fmt: skip
    """duckdb.connect, with a WarehouseError naming the file, what happened and the way out.

    While another process holds the file: a run (`wait_s` given) waits for it up to `wait_s` seconds, saying
    so; any other opener goes through the run that serves the file (sharing.py), waiting up to READER_WAIT_S
    for the file or a server (a run serves once it has migrated the file; an export holds it briefly).
    """
    started, said = time.monotonic(), 0.0
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as err:
            if not _held(err):
                raise WarehouseError(_open_failure(path, err)) from None
            waited = time.monotonic() - started
            if wait_s is None:
                if (info := serving(path)) is not None:
                    return RemoteConnection(path, info, read_only)
                if waited >= READER_WAIT_S:
                    raise WarehouseError(_open_failure(path, err)) from None
                time.sleep(0.2)
                continue
            if waited >= wait_s:
                raise WarehouseError(f"warehouse {path} is still in use by another process after {wait_s:g} s "
                                     f"({_holder(err)}); try again when it has finished, or raise "
                                     "warehouse_wait_s") from None  # fmt: skip
            if waited >= said:
                notify(f"warehouse {path} is in use by another process ({_holder(err)}): waiting for it, at most "
                       f"{wait_s - waited:.0f} s more (warehouse_wait_s)")  # fmt: skip
                said = waited + 30
            time.sleep(0.5)


def _held(err: duckdb.Error) -> bool:
    """Whether duckdb could not open the file because another process holds its lock."""
    return isinstance(err, duckdb.IOException) and "lock" in str(err).lower()


def _holder(err: duckdb.Error) -> str:
    """`pid N` from duckdb's 'Conflicting lock is held in <program> (PID N)'."""
    found = re.search(r"PID (\d+)", str(err))
    return f"pid {found.group(1)}" if found else "a process duckdb does not name"


def _open_failure(path: Path, err: duckdb.Error) -> str:
    """The message for a file duckdb cannot open (its first line only: no C++ stack trace).

    A write-ahead log duckdb cannot replay is not moved aside automatically: rows committed since the last
    checkpoint exist only in that log (up to 16 MiB of them by default, e.g. a whole run's model calls),
    and a log written by a newer duckdb replays fine with that version. Dropping it would silently lose
    committed data, so the user decides, and the message gives the exact command that keeps the log.
    """
    what = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    wal = path.with_name(path.name + ".wal")
    if "lock" in what.lower():
        return f"cannot open warehouse {path}: {what} (another prefsynth process may be using it)"
    if wal.exists() and ("replaying WAL" in what or not isinstance(err, duckdb.IOException)):
        aside = wal.with_name(f"{wal.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        return (f"cannot open warehouse {path}: duckdb {duckdb.__version__} cannot replay its write-ahead log "
                f"{wal} ({what}). Rows committed after the last checkpoint, if any, are only in that log. To "
                "open the warehouse as it was at its last checkpoint, move the log aside (it is kept, nothing "
                f"is deleted): mv {shlex.quote(str(wal))} {shlex.quote(str(aside))}")  # fmt: skip
    if not path.exists():
        return f"cannot create warehouse {path}: {what}; choose another --db (or `warehouse:` path)"
    return (f"cannot open warehouse {path}: {what}. If it is not a prefsynth warehouse, choose another --db; "
            "if it is, restore it from a copy")


class Store:
    """A DuckDB warehouse file (or a DuckLake warehouse: ducklake.py): migrations on open, batched writes, the
    reads the pipeline needs."""

    def __init__(self, path: str | Path, read_only: bool = False, create: bool = True, wait_s: float | None = None,
                 notify: Callable[[str], None] = _log.warning) -> None:  # fmt: skip
        """Open (and unless `read_only`, migrate) the warehouse; `create=False` refuses to make a new file.

        `wait_s` makes this a run's store: it waits up to `wait_s` seconds for another process to let go of
        the file (`notify` says so), and serves other processes' queries while it is open (sharing.py).
        Without it, a file a run holds is read (and written, e.g. an export's snapshot row) through that run.
        """
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conflicting: set[str] = set()  # tables `write_frames` writes with ON CONFLICT (a key existed)
        self._unbounded_rows = 0  # rows written since `_bound_memory` last ran
        self._memory_limit = 0
        self._server: QueryServer | None = None
        lake = ducklake.parse(path) if ducklake.is_lake(path) else None
        if lake is None and (read_only or not create) and not self.path.exists():
            raise WarehouseError(f"warehouse not found: {self.path}")
        if lake is None and not read_only:
            _make_folder(self.path)
        self.con: Any = ducklake.connect(lake, read_only) if lake else _connect(self.path, read_only, wait_s, notify)
        if lake is not None and (read_only or not create) and self.schema_version() == 0:
            self.close()
            raise WarehouseError(f"warehouse not found: {lake.url} (its catalog has no prefsynth tables)")
        remote = isinstance(self.con, RemoteConnection)
        if not read_only and not remote:
            try:
                self.con.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
                self.migrate()
                if lake is None:
                    self._bound_memory()
            except BaseException:  # e.g. a lake's migration lost 30 commit races: close what was opened
                self.close()
                raise
        elif (version := self.schema_version()) < len(_migrations()):
            self.close()
            raise WarehouseError(f"warehouse {self.path} has schema version {version}, this prefsynth needs "
                                 f"{len(_migrations())}: open it once read-write (e.g. `prefsynth run`) to migrate it")
        if wait_s is not None and lake is None:  # a lake's catalog takes other processes itself
            self._server = QueryServer(self.path, self.con, self._lock).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- schema -------------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        """Apply numbered migrations/NNN_*.sql not yet in schema_version, each in one transaction.

        Each step is checkpointed before any data is written: duckdb 1.5.5 cannot replay DDL from the WAL
        after a SIGKILL (the next open fails, and without the WAL the file has no tables).
        """
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP DEFAULT current_timestamp)"
        )
        self.con.execute("CHECKPOINT")
        done = {v for (v,) in self.con.execute("SELECT version FROM schema_version").fetchall()}
        applied = []
        for item in _migrations():
            version = int(item.name.split("_", 1)[0])
            if version in done:
                continue

            def step(version: int = version, item: Any = item) -> bool:
                """Apply one migration unless another process has (a DuckLake warehouse has several writers)."""
                if self.con.execute("SELECT count(*) FROM schema_version WHERE version = ?", [version]).fetchone()[0]:
                    return False
                self.con.execute(item.read_text(encoding="utf-8"))
                self.con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, item.name])
                return True

            if self._transaction(step):
                applied.append(version)
            self.con.execute("CHECKPOINT")
        return applied

    def schema_version(self) -> int:
        try:
            return self.con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        except duckdb.CatalogException:  # a file no prefsynth version has migrated
            return 0

    # ---- writes -------------------------------------------------------------------------------
    def _insert(self, table: str, df: pl.DataFrame, run_id: str | None, plain: bool = False) -> int:
        """Insert a batch in one statement through Arrow; rows whose key exists are skipped. Returns rows added.

        `plain` leaves out ON CONFLICT DO NOTHING: a key that exists is a ConstraintException instead (the
        batch writer's fast path, `write_frames`)."""
        if df.is_empty():
            return 0
        key = TABLES[table].key if table in TABLES else None
        if key and df[key].n_unique() < len(df):  # the check costs a tenth of `unique`
            df = df.unique(subset=key, keep="first", maintain_order=True)
        cols = [f'"{c}"' for c in df.columns]
        select = ", ".join(cols)
        if run_id is not None:
            df = df.with_columns(pl.lit(run_id).alias("run_id"))
            cols.append("run_id")
            select += ", run_id"
        conflict = " ON CONFLICT DO NOTHING" if key and not plain else ""
        self.con.register("_batch", df.to_arrow())
        try:
            row = self.con.execute(
                f"INSERT INTO {_table(table)} ({', '.join(cols)}) SELECT {select} FROM _batch{conflict}")
            return int(row.fetchone()[0])
        finally:
            self.con.unregister("_batch")

    def _count(self, table: str) -> int:
        return self.con.execute(f"SELECT count(*) FROM {_table(table)}").fetchone()[0]

    def _transaction(self, fn: Any, one_thread: bool = False) -> Any:
        """fn() in one transaction. On a DuckLake commit conflict (another writer committed meanwhile) it runs
        again, so fn must be replayable (ducklake.py). `one_thread`: duckdb runs it on one thread (`_one_thread`)."""
        for attempt in itertools.count():
            with self._lock, self._one_thread() if one_thread else contextlib.nullcontext():
                self.con.execute("BEGIN")
                try:
                    out = fn()
                    self.con.execute("COMMIT")
                    return out
                except BaseException as err:
                    self.con.execute("ROLLBACK")
                    if (wait := ducklake.retry_wait(self.con, err, attempt)) is None:
                        raise
            time.sleep(wait)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _one_thread(self) -> Iterator[None]:
        """duckdb's `threads` at 1 meanwhile (a global setting: call it holding the lock). With more threads, duckdb
        1.5.5 plans an INSERT from Arrow as a BATCH_INSERT (see EXPLAIN): for the batches of `write_frames`
        (bench/scale.py) 2.4x the CPU of the plain INSERT it plans on one thread, and no faster. Queries that other
        processes send meanwhile (sharing.py) run on one thread too: a commit takes milliseconds."""
        threads = self.con.execute("SELECT current_setting('threads')").fetchone()[0]
        self.con.execute("SET threads = 1")
        try:
            yield
        finally:
            self.con.execute(f"SET threads = {int(threads)}")

    def begin_run(
        self, run_id: str, name: str, config_json: str, flow_run_id: str | None, kind: str = "synthesize"
    ) -> None:
        """A run of the pipeline (`synthesize`) or of `prefsynth eval` (`eval`)."""
        with self._lock:  # the writer thread may be inside a transaction on this connection
            self.con.execute(
                "INSERT INTO runs (run_id, name, config, flow_run_id, kind) VALUES (?, ?, ?, ?, ?)",
                [run_id, name, config_json, flow_run_id, kind],
            )

    def set_flow_run(self, run_id: str, flow_run_id: str | None) -> None:
        """The flow run of a run that began before it (flows/headstart.py)."""
        with self._lock:
            self.con.execute("UPDATE runs SET flow_run_id = ? WHERE run_id = ?", [flow_run_id, run_id])

    def end_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        with self._lock:  # the writer thread may be inside a transaction on this connection
            self.con.execute(
                "INSERT INTO run_ends (run_id, status, summary) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [run_id, status, json.dumps(summary, sort_keys=True)],
            )

    def _insert_rows(self, table: str, df: pl.DataFrame) -> int:
        """Rows keyed by their table's primary key (links, per-run rows): duplicates are skipped. Rows added."""
        if df.is_empty():
            return 0
        self.con.register("_links", df.unique().to_arrow())
        cols = ", ".join(f'"{c}"' for c in df.columns)
        try:
            sql = f"INSERT INTO {_table(table)} ({cols}) SELECT {cols} FROM _links ON CONFLICT DO NOTHING"
            row = self.con.execute(sql)
            return int(row.fetchone()[0])
        finally:
            self.con.unregister("_links")

    def ingest_prompts(self, run_id: str, prompts: Iterable[Prompt], batch: int = 10_000) -> tuple[int, int, int]:
        """Write a run's prompts (new ones) and links as they are read, in one transaction, so a bad record
        late in the source leaves nothing behind. Returns (read, new, distinct prompts linked to the run)."""

        if getattr(self.con, "replays", False):  # a transaction that may run again reads its input again
            prompts = list(prompts)

        def write() -> tuple[int, int, int]:
            read = new = linked = 0
            items = iter(prompts)
            while chunk := list(itertools.islice(items, batch)):
                df = frame("prompts", chunk)
                read += len(df)
                new += self._insert("prompts", df, run_id)
                linked += self._insert_rows("run_prompts", df.select(pl.lit(run_id).alias("run_id"), "prompt_id"))
            return read, new, linked

        return self._transaction(write)

    def run_prompts(self, run_id: str, batch: int) -> Iterator[list[Prompt]]:
        """A run's prompts, `batch` at a time (no order; memory holds one batch). They are copied to a temporary
        Parquet file and read from there: a query left open for the whole stream holds a transaction, and duckdb
        never checkpoints while one is open (the WAL, and the uncheckpointed rows in memory, grew with the run).
        Each `next` reads the file: call it off the event loop."""
        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory(prefix="prefsynth-prompts-") as tmp:
            path = Path(tmp) / "prompts.parquet"
            with self._lock:
                self.con.execute(
                    "COPY (SELECT p.prompt_id, p.messages, p.source, p.source_ref FROM run_prompts rp JOIN prompts p "
                    f"USING (prompt_id) WHERE rp.run_id = {ducklake.literal(run_id)}) TO {ducklake.literal(str(path))} "
                    f"(FORMAT parquet, ROW_GROUP_SIZE {max(batch, 1)})"
                )
            with pq.ParquetFile(path) as file:
                for rows in file.iter_batches(batch_size=batch):
                    yield [Prompt(prompt_id=r["prompt_id"], source=r["source"], source_ref=r["source_ref"],
                                  messages=[Message(**m) for m in json.loads(r["messages"])])
                           for r in rows.to_pylist()]

    def write(self, run_id: str, result: StageResult) -> dict[str, int]:
        """Write one batch of records (calls, responses, scores, failures, ...) in one transaction."""
        return self.write_frames(run_id, {table: frame(table, rows) for table, rows in result.rows.items()})

    def write_frames(self, run_id: str, frames: dict[str, pl.DataFrame]) -> dict[str, int]:
        """The batch writer: each table's frame in one statement, all in one transaction; rows added per table.

        In a DuckDB file a keyed table is first written with a plain INSERT: duckdb 1.5.5 plans ON CONFLICT DO
        NOTHING as a MERGE_INTO, 2.4x the CPU for these batches, and new rows are the common case. A key that
        exists (a rerun writing the same rows again) aborts the transaction; it runs again with ON CONFLICT for
        that table, which stays on ON CONFLICT for the life of this Store. Either way the rows added are exactly
        those whose key was new.
        """
        if not isinstance(self.con, duckdb.DuckDBPyConnection):  # DuckLake (anti-join inserts), or a served store
            return self._transaction(lambda: {table: self._insert(table, df, run_id) for table, df in frames.items()})
        while True:
            plain = {t for t in frames if t in TABLES and TABLES[t].key and t not in self._conflicting}
            failed: list[str] = []

            def write(plain: set[str] = plain, failed: list[str] = failed) -> dict[str, int]:
                out = {}
                for table, df in frames.items():
                    try:
                        out[table] = self._insert(table, df, run_id, plain=table in plain)
                    except duckdb.ConstraintException:
                        failed.append(table)
                        raise
                return out

            try:
                added = self._transaction(write, one_thread=True)
            except duckdb.ConstraintException:
                retry = plain & set(failed) if failed else plain  # none failed: COMMIT found the key
                if not retry:
                    raise
                self._conflicting |= retry
                continue
            self._unbounded_rows += sum(added.values())
            if self._unbounded_rows >= _REBOUND_ROWS:
                self._bound_memory()
            return added

    def _bound_memory(self) -> None:
        """duckdb's `memory_limit` at CACHE_BYTES above what this file's key indexes can take."""
        with self._lock:
            limit = CACHE_BYTES + int(self.con.execute(_KEYS).fetchone()[0]) * KEY_BYTES
            if abs(limit - self._memory_limit) >= 32 * 2**20:
                self.con.execute(f"SET memory_limit = '{limit // 2**20}MiB'")
                self._memory_limit = limit
            self._unbounded_rows = 0

    def register_scorer(self, scorer_id: str, name: str, kind: str, config_json: str) -> None:
        with self._lock:  # the writer thread may be inside a transaction on this connection
            self.con.execute(
                "INSERT INTO scorers (scorer_id, name, kind, config) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [scorer_id, name, kind, config_json],
            )

    def write_pairs(self, run_id: str, pairs: pl.DataFrame | Sequence[Pair]) -> int:
        df = pairs if isinstance(pairs, pl.DataFrame) else frame("pairs", pairs)
        links = pl.DataFrame({"run_id": [run_id] * len(df), "pair_id": df["pair_id"]}, schema=[
            ("run_id", pl.String), ("pair_id", pl.String)])

        def write() -> int:
            new = self._insert("pairs", df, run_id)
            self._insert_rows("run_pairs", links)
            return new

        return self._transaction(write)

    def record_snapshot(self, snapshot_id: str, run_id: str | None, fmt: str, path: str, margin: str,
                        row_ids: list[str], file_sha256: str, card_sha256: str, counts: dict[str, int],
                        row_splits: list[str] | None = None, splits: dict[str, Any] | None = None) -> bool:  # fmt: skip
        """One export as an immutable snapshot: its rows (pairs, or anchors for `sft`) and with splits each row's
        split, margin mode, content hashes, and `splits` (seed, fractions, each split's file and hash). A
        snapshot already recorded (the same rows, format, margin and splits) is kept: False."""
        links = pl.DataFrame({"snapshot_id": [snapshot_id] * len(row_ids), "row_id": row_ids,
                              "split": row_splits if row_splits is not None else [None] * len(row_ids)},
                             schema={"snapshot_id": pl.String, "row_id": pl.String, "split": pl.String})  # fmt: skip
        with self._lock:  # its rows first, then the snapshot: one statement each, so it also works through a run
            self._insert_rows("snapshot_rows", links)  # that holds the file (sharing.py), which has no transaction
            added = self.con.execute(
                "INSERT INTO dataset_snapshots (snapshot_id, run_id, format, path, n_pairs, margin, file_sha256, "
                "card_sha256, counts, splits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [snapshot_id, run_id, fmt, path, len(row_ids), margin, file_sha256, card_sha256,
                 json.dumps(counts, sort_keys=True), None if splits is None else json.dumps(splits)]
            ).fetchone()[0]  # fmt: skip
        return bool(added)

    def snapshots(self) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM dataset_snapshots ORDER BY created_at, snapshot_id")

    def snapshot(self, snapshot_id: str) -> tuple[dict[str, Any], pl.DataFrame] | None:
        """A snapshot (a unique prefix of its id will do) and the rows it exported (with their `split`), or None."""
        found = self._dicts_with("SELECT * FROM dataset_snapshots WHERE starts_with(snapshot_id, $1) "
                                 "ORDER BY snapshot_id", [snapshot_id])  # fmt: skip
        if len(found) != 1:
            return None
        snap = found[0]
        view, key = export_view(snap["format"])
        rows = self._query(f"SELECT v.*, s.split FROM {view} v JOIN snapshot_rows s ON s.row_id = v.{key} AND "
                           f"s.snapshot_id = $1 WHERE v.run_id = $2 ORDER BY v.prompt_id, v.{key}",
                           [snap["snapshot_id"], snap["run_id"]])  # fmt: skip
        return snap, rows

    # ---- reads --------------------------------------------------------------------------------
    def existing_ids(self, table: str, ids: Sequence[str]) -> set[str]:
        key = TABLES[_table(table)].key
        return {r[0] for r in self._lookup(f"SELECT t.{key} FROM {table} t JOIN _ids ON t.{key} = _ids.id", ids)}

    def cached_calls(self, call_ids: list[str]) -> dict[str, str]:
        """{call_id: response JSON} for calls answered ok before (the model-call cache). Thread-safe."""
        sql = ("SELECT call_id, any_value(response) FROM model_calls JOIN _ids ON call_id = _ids.id "
               "WHERE status = 'ok' GROUP BY call_id")  # fmt: skip
        return dict(self._lookup(sql, call_ids))

    def open_batches(self, model: str) -> dict[str, tuple[str, str | None]]:
        """{call_id: (input_file_id, batch_id)} of `model`'s calls waiting on a batch: no result recorded for
        them since their batch's file was (batch.py). Thread-safe."""
        sql = ("SELECT c.call_id, b.input_file_id, b.batch_id FROM batch_calls c JOIN batches b USING (input_file_id) "
               "WHERE b.model = $1 AND NOT EXISTS (SELECT 1 FROM model_calls m WHERE m.call_id = c.call_id "
               "AND m.created_at >= b.created_at)")  # fmt: skip
        with self._lock:
            cur = self.con.cursor()
        try:
            return {cid: (fid, bid) for cid, fid, bid in cur.execute(sql, [model]).fetchall()}
        finally:
            cur.close()

    def record_batch_file(self, input_file_id: str, model: str, call_ids: list[str]) -> None:
        """An uploaded batch file and its calls, committed before the batch is created. Thread-safe."""

        def write() -> None:
            self.con.execute("INSERT INTO batches (input_file_id, model) VALUES (?, ?)", [input_file_id, model])
            self._insert_rows("batch_calls", pl.DataFrame({"input_file_id": input_file_id, "call_id": call_ids}))

        self._transaction(write)

    def record_batch_id(self, input_file_id: str, batch_id: str) -> None:
        with self._lock:
            self.con.execute("UPDATE batches SET batch_id = ? WHERE input_file_id = ?", [batch_id, input_file_id])

    def cached_logprobs(self, lp_ids: list[str]) -> dict[str, tuple[float, int]]:
        """{lp_id: (log-prob, tokens)} for continuations scored before (the CDR cache). Thread-safe."""
        rows = self._lookup("SELECT lp_id, logprob, tokens FROM logprobs JOIN _ids ON lp_id = _ids.id", lp_ids)
        return {r[0]: (r[1], r[2]) for r in rows}

    def _lookup(self, sql: str, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """Rows of `sql`, which joins the table `_ids` (these ids). Thread-safe."""
        if not ids:
            return []
        with self._with_ids(ids) as cur:
            return cur.execute(sql).fetchall()

    def _rows(
        self, sql: str, ids: Sequence[str] | pl.Series, schema: dict[str, Any], params: list[Any] | None = None
    ) -> pl.DataFrame:
        """`_lookup` as a frame with these column types."""
        with self._with_ids(ids) as cur:
            df = cur.execute(sql, params or []).pl()
        return df.cast(schema) if len(df.columns) else pl.DataFrame(schema=schema)

    @contextlib.contextmanager
    def _with_ids(self, ids: Sequence[str] | pl.Series) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            cur = self.con.cursor()
            try:
                cur.register("_ids", pl.DataFrame({"id": ids}, schema={"id": pl.String}).to_arrow())
                yield cur
            finally:
                cur.close()

    def write_panel(self, run_id: str, summary: dict[str, Any], scores: pl.DataFrame, agreement: pl.DataFrame) -> None:
        """One panel's run: its summary row, aggregate scores and agreement per prompt, in one transaction."""

        def write() -> None:
            self.con.execute(
                "INSERT INTO panel_runs (run_id, panel_id, name, aggregate, members, prompts, alpha, mean_tau) "
                "VALUES ($run_id, $panel_id, $name, $aggregate, $members, $prompts, $alpha, $mean_tau) "
                "ON CONFLICT DO NOTHING",
                {"run_id": run_id, **summary},
            )
            for table, df in (("panel_scores", scores), ("panel_agreement", agreement)):
                self._insert_rows(table, df.select(pl.lit(run_id).alias("run_id"), *df.columns))

        self._transaction(write)

    def write_diagnostics(self, run_id: str, rows: list[dict[str, Any]]) -> None:
        df = pl.DataFrame(rows).select(pl.lit(run_id).alias("run_id"), pl.all()) if rows else pl.DataFrame()
        self._transaction(lambda: self._insert_rows("scorer_diagnostics", df))

    def write_eval(self, eval_id: str, rows: dict[str, Any], items: pl.DataFrame) -> None:
        """One scorer's evaluation: its summary row and every labelled pair's scores, in one transaction."""

        def write() -> None:
            self.con.execute(
                "INSERT INTO evals (eval_id, scorer_id, scorer, data, format, n, accuracy, ties, failed, report) "
                "VALUES ($eval_id, $scorer_id, $scorer, $data, $format, $n, $accuracy, $ties, $failed, $report)",
                {"eval_id": eval_id, **rows},
            )
            self._insert("eval_items", items, None)

        self._transaction(write)

    def prompts_from_table(self, table: str) -> pl.DataFrame:
        """Rows of a table or view named `name` or `schema.name`, each part quoted."""
        quoted = ".".join('"' + part.replace('"', '""') + '"' for part in table.split("."))
        try:
            return self.con.execute(f"SELECT * FROM {quoted}").pl()
        except duckdb.CatalogException:
            raise PrefsynthError(f"warehouse {self.path} has no table or view named {table!r}") from None

    def prompt_messages(self, run_id: str) -> pl.DataFrame:
        """prompt_id, messages (JSON) of a run's prompts."""
        sql = ("SELECT p.prompt_id, p.messages FROM run_prompts rp JOIN prompts p USING (prompt_id) "
               "WHERE rp.run_id = $1 ORDER BY p.prompt_id")  # fmt: skip
        return self._rows(sql, [], {"prompt_id": pl.String, "messages": pl.String}, [run_id])

    def responses_by_ids(self, response_ids: Sequence[str]) -> pl.DataFrame:
        """These responses (those that exist) with their prompt's messages: what a scorer works on."""
        sql = ("SELECT r.response_id, r.prompt_id, p.messages, r.text, r.model FROM responses r "
               "JOIN _ids ON r.response_id = _ids.id JOIN prompts p USING (prompt_id) ORDER BY r.response_id")
        schema = {"response_id": pl.String, "prompt_id": pl.String, "messages": pl.String, "text": pl.String,
                  "model": pl.String}  # fmt: skip
        return self._rows(sql, response_ids, schema)

    def run_responses(self, run_id: str, identities: list[str], sampling: str, samples: int) -> pl.DataFrame:
        """response_id, prompt_id, tokens, finish_reason of a run's samples that exist: its prompts answered by
        these models with these sampling params (canonical JSON), sample index below `samples` (never a
        teacher's rows)."""
        sql = ("SELECT r.response_id, r.prompt_id, r.completion_tokens AS tokens, r.finish_reason FROM responses r "
               "JOIN run_prompts rp ON rp.prompt_id = r.prompt_id AND rp.run_id = $1 "
               "WHERE list_contains($2, r.model_identity) AND r.sampling = $3 AND r.sample_index < $4 "
               "AND r.source = 'sampled'")  # fmt: skip
        schema = {"response_id": pl.String, "prompt_id": pl.String, "tokens": pl.Int32, "finish_reason": pl.String}
        return self._rows(sql, [], schema, [run_id, identities, sampling, samples])

    def scores_of(self, response_ids: pl.Series, scorer_id: str) -> pl.DataFrame:
        """prompt_id, response_id, value of one (pointwise) scorer for these responses (those it scored)."""
        sql = ("SELECT r.prompt_id, s.response_id, s.value FROM scores s JOIN _ids ON s.response_id = _ids.id "
               "JOIN responses r USING (response_id) WHERE s.scorer_id = $1")  # fmt: skip
        schema = {"prompt_id": pl.String, "response_id": pl.String, "value": pl.Float64}
        return self._rows(sql, response_ids, schema, [scorer_id])

    def verdicts_by_comparison(self, comparison_ids: Sequence[str] | pl.Series) -> pl.DataFrame:
        """comparison_id, order, verdict of every judgment of these comparisons."""
        return self._rows('SELECT j.comparison_id, j."order", j.verdict FROM judgments j '
                          "JOIN _ids ON j.comparison_id = _ids.id", comparison_ids,
                          {"comparison_id": pl.String, "order": pl.String, "verdict": pl.String})  # fmt: skip

    def other_revisions(self, identity: str, url_identity: str, model: str) -> list[str]:
        """Identities under which this endpoint model was called before, when `identity` never was: other
        revisions, or none (its URL)."""
        sql = ("SELECT DISTINCT model FROM model_calls WHERE model <> $1 AND (model = $2 OR starts_with(model, $3)) "
               "AND NOT EXISTS (SELECT 1 FROM model_calls WHERE model = $1) ORDER BY model")  # fmt: skip
        with self._lock:
            return [r[0] for r in self.con.execute(sql, [identity, url_identity, f"{model}@"]).fetchall()]

    def pipeline_run(self, run_id: str | None, completed: bool = True) -> str:
        """`run_id` checked to be a pipeline (`synthesize`) run of this warehouse, or by default the newest
        completed one (completed=False: else the newest pipeline run at all, e.g. one still running), as `review
        export` and `report` pick it. WarehouseError for an unknown id, another kind of run, or none."""
        if run_id is None:
            row = self.con.execute(
                "SELECT r.run_id FROM runs r LEFT JOIN run_ends e USING (run_id) WHERE r.kind = 'synthesize' AND "
                "(e.status = 'completed' OR NOT ?) ORDER BY e.status = 'completed' DESC, "
                "coalesce(e.finished_at, r.started_at) DESC, r.run_id LIMIT 1", [completed]).fetchone()  # fmt: skip
            if row is None:
                raise WarehouseError(f"{self.path} has no {'completed ' if completed else ''}pipeline run "
                                     "(`prefsynth run` makes one)")  # fmt: skip
            return row[0]
        kind = self.run_kind(run_id)
        if kind is None:
            raise WarehouseError(f"{self.path} has no run {run_id!r} (--run)")
        if kind != "synthesize":
            raise WarehouseError(f"run {run_id!r} is a `prefsynth {kind}` run, not a pipeline run: it has no pairs "
                                 "(--run)")  # fmt: skip
        return run_id

    def run_kind(self, run_id: str) -> str | None:
        """`synthesize` or `eval` for a run of this warehouse, None for an unknown id."""
        row = self.con.execute("SELECT kind FROM runs WHERE run_id = ?", [run_id]).fetchone()
        return row[0] if row else None

    def comparisons_among(self, response_ids: pl.Series, scorer_id: str) -> pl.DataFrame:
        """One pairwise scorer's comparisons whose two responses are both among these."""
        sql = ("SELECT c.* EXCLUDE (run_id, created_at) FROM comparisons c JOIN _ids a ON c.response_a_id = a.id "
               "JOIN _ids b ON c.response_b_id = b.id WHERE c.scorer_id = $1")  # fmt: skip
        return self._rows(sql, response_ids, columns("comparisons"), [scorer_id])

    def export_rows(self, run_id: str | None = None, fmt: str = "trl") -> tuple[str | None, pl.DataFrame]:
        """What an export of `run_id` (or of the newest completed run) writes: its pairs joined with their
        texts, or for `sft` its teacher anchors with their prompts."""
        if run_id is None:
            row = self.con.execute("SELECT run_id FROM v_latest_run").fetchone()
            if row is None:
                return None, pl.DataFrame()
            run_id = row[0]
        view, key = export_view(fmt)
        return run_id, self._query(f"SELECT * FROM {view} WHERE run_id = $1 ORDER BY prompt_id, {key}", [run_id])

    def round_pairs(self, run_id: str) -> pl.DataFrame:
        """A run's pairs with their prompt, texts, and the curation scorer's values and rationales (a loop round)."""
        sql = ("SELECT v.pair_id, v.prompt_messages, v.chosen_text, v.rejected_text, v.score_chosen, "
               "v.score_rejected, coalesce(sc.rationale, '') AS why_chosen, coalesce(sr.rationale, '') AS why_rejected "
               "FROM v_run_pairs v LEFT JOIN scores sc ON sc.response_id = v.chosen_id AND sc.scorer_id = v.scorer_id "
               "LEFT JOIN scores sr ON sr.response_id = v.rejected_id AND sr.scorer_id = v.scorer_id "
               "WHERE v.run_id = $1 ORDER BY v.pair_id")  # fmt: skip
        return self._query(sql, [run_id])

    def prompt_versions(self) -> list[dict[str, Any]]:
        """Every prompt version of the synthesis loops with its rounds, pairs, accepted pairs and rate."""
        return self._dicts("SELECT * FROM v_prompt_versions ORDER BY role, round, version_id")

    def card_scorers(self, rows: pl.DataFrame) -> pl.DataFrame:
        """The scorers of an export's rows, for its card's units (none for `sft` rows: anchors have no scorer)."""
        return self.scorers_of(rows["scorer_id"] if "scorer_id" in rows.columns else [])

    def scorers_of(self, scorer_ids: Sequence[str] | pl.Series) -> pl.DataFrame:
        """scorer_id, name, kind and config (JSON) of these scorers: what an export's card says about units."""
        sql = ("SELECT s.scorer_id, s.name, s.kind, s.config FROM scorers s JOIN _ids ON s.scorer_id = _ids.id "
               "ORDER BY s.scorer_id")  # fmt: skip
        schema = {"scorer_id": pl.String, "name": pl.String, "kind": pl.String, "config": pl.String}
        return self._rows(sql, list(dict.fromkeys(scorer_ids)), schema)

    # ---- human review (tasks/review.py) ---------------------------------------------------------
    # each response's value per scorer: one row, since score_id = H(response, scorer) is the key
    _VALUES = "SELECT s.response_id, s.scorer_id, s.value FROM scores s {join}"

    def review_inputs(self, run_id: str) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        """A run's pairs that no one has labelled yet (v_run_pairs rows without their texts: `review_texts`), the
        value of each scorer for the run's responses, and the pairwise comparisons of the run's prompts:
        what a review's doubt is made of."""
        cols = ("v.pair_id, v.prompt_id, v.chosen_id, v.rejected_id, v.scorer_id, v.score_chosen, v.score_rejected, "
                "v.margin")  # fmt: skip
        pairs = self._query(f"SELECT {cols} FROM v_run_pairs v WHERE v.run_id = $1 AND NOT EXISTS (SELECT 1 FROM "
                            "human_labels h WHERE h.verdict <> 'skip' AND least(h.chosen_id, h.rejected_id) = "
                            "least(v.chosen_id, v.rejected_id) AND greatest(h.chosen_id, h.rejected_id) = "
                            "greatest(v.chosen_id, v.rejected_id)) ORDER BY v.pair_id", [run_id])  # fmt: skip
        join = ("JOIN responses r USING (response_id) JOIN run_prompts rp ON rp.prompt_id = r.prompt_id "
                "AND rp.run_id = $1")  # fmt: skip
        values = self._query(self._VALUES.format(join=join), [run_id])
        comparisons = self._query("SELECT c.response_a_id, c.response_b_id, c.flipped FROM comparisons c JOIN "
                                  "run_prompts rp ON rp.prompt_id = c.prompt_id AND rp.run_id = $1 "
                                  "ORDER BY c.comparison_id", [run_id])  # fmt: skip
        return pairs, values.cast({"value": pl.Float64}), comparisons

    def review_texts(self, pair_ids: Sequence[str]) -> pl.DataFrame:
        """pair_id, prompt_messages, chosen_text, rejected_text of these pairs: what a review shows people."""
        sql = ("SELECT p.pair_id, pr.messages AS prompt_messages, c.text AS chosen_text, r.text AS rejected_text "
               "FROM pairs p JOIN _ids ON p.pair_id = _ids.id JOIN prompts pr ON pr.prompt_id = p.prompt_id "
               "JOIN responses c ON c.response_id = p.chosen_id JOIN responses r ON r.response_id = p.rejected_id "
               "ORDER BY p.pair_id")  # fmt: skip
        schema = {"pair_id": pl.String, "prompt_messages": pl.String, "chosen_text": pl.String,
                  "rejected_text": pl.String}  # fmt: skip
        return self._rows(sql, list(pair_ids), schema)

    def record_review(self, run_id: str, tasks: Sequence[ReviewTask]) -> int:
        """The tasks of one review export (the run whose pairs they are); tasks recorded before are kept. One
        statement, no transaction: it also works through a run that holds the file (sharing.py)."""
        with self._lock:
            return self._insert("review_tasks", frame("review_tasks", tasks), run_id)

    def review_tasks(self, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """{task_id: the task with its pair's chosen_id and rejected_id} of these tasks (those recorded)."""
        sql = ("SELECT t.*, p.chosen_id, p.rejected_id FROM review_tasks t JOIN _ids ON t.task_id = _ids.id "
               "JOIN pairs p USING (pair_id)")  # fmt: skip
        with self._with_ids(list(dict.fromkeys(task_ids))) as cur:
            rows = cur.execute(sql).pl().to_dicts()
        return {r["task_id"]: r for r in rows}

    def write_labels(self, run_id: str, labels: Sequence[HumanLabel]) -> int:
        """People's verdicts from one imported file, in one statement (as record_review); labels imported before
        are skipped."""
        with self._lock:
            return self._insert("human_labels", frame("human_labels", labels), run_id)

    def human_labels(self) -> pl.DataFrame:
        """Every human label, oldest first (what `tasks.review.decisions` reads): by the tool's time (Label Studio's
        updated_at or created_at), then, where that ties or is missing (Argilla), by when its file was imported;
        the label id breaks what is left."""
        return self._query("SELECT * FROM human_labels ORDER BY try_cast(labelled_at AS TIMESTAMPTZ) NULLS FIRST, "
                           "created_at, label_id", [])

    def human_accuracy(self) -> list[dict[str, Any]]:
        """Each machine scorer's accuracy against the people's verdicts, as `prefsynth eval` reports it."""
        from prefsynth.tasks.review import decisions, human_accuracy

        decided = decisions(self.human_labels())
        if decided.is_empty():
            return []
        ids = pl.concat([decided["a"], decided["b"]]).unique()
        join = "JOIN _ids ON s.response_id = _ids.id"
        with self._with_ids(ids) as cur:
            values = cur.execute(self._VALUES.format(join=join)).pl()
        scorers = self.scorers_of(values["scorer_id"].unique().sort()).select("scorer_id", "name")
        return human_accuracy(decided, values, scorers)

    def _query(self, sql: str, params: list[Any]) -> pl.DataFrame:
        with self._lock:
            return self.con.execute(sql, params).pl()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {t: self._count(t) for t in STATS_TABLES}
        out["model_calls_ok"] = self.con.execute(
            "SELECT count(*) FROM model_calls WHERE status = 'ok'"
        ).fetchone()[0]
        out["schema_version"] = self.schema_version()
        per_model = self.con.execute(
            "SELECT model, kind, count(*), count(*) FILTER (WHERE status = 'error'), "
            "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) "
            "FROM model_calls GROUP BY ALL ORDER BY ALL"
        ).fetchall()
        out["calls_by_model"] = [
            {"model": m, "kind": k, "calls": c, "errors": e, "prompt_tokens": pt, "completion_tokens": ct}
            for m, k, c, e, pt, ct in per_model
        ]
        out["retries_by_endpoint"] = self.retries_by_endpoint()
        out["replicas"] = self._dicts("SELECT model, replica, sum(answered)::BIGINT AS answered, "
                                      "sum(failed_calls)::BIGINT AS failed_calls, sum(failed_requests)::BIGINT AS "
                                      "failed_requests FROM v_replicas GROUP BY ALL ORDER BY ALL")  # fmt: skip
        latest = ("SELECT * EXCLUDE (created_at, rn) FROM (SELECT *, row_number() OVER "
                  "(PARTITION BY {key} ORDER BY created_at DESC, run_id) AS rn FROM {table}) WHERE rn = 1 "
                  "ORDER BY {order}")  # fmt: skip
        out["pairs_by_source"] = dict(self.con.execute(
            "SELECT source, count(*) FROM pairs GROUP BY source ORDER BY source").fetchall())  # fmt: skip
        out["scorer_diagnostics"] = self._dicts(latest.format(key="scorer_id", table="scorer_diagnostics",
                                                              order="scorer"))  # fmt: skip
        out["panels"] = self._dicts(latest.format(key="panel_id", table="panel_runs", order="name"))
        out["prompt_versions"] = self.prompt_versions()
        out["truncation"] = self._dicts("SELECT * FROM v_truncation ORDER BY model")
        out["costs"] = self.costs()
        out["human_accuracy"] = self.human_accuracy()
        out["length_control"] = self.length_control()
        return out

    def length_control(self) -> list[dict[str, Any]]:
        """Per run whose curation had length control: the pairs and the lengths of chosen against rejected
        before and after it (medians in tokens, share with the longer reply chosen), from its summary."""
        cols = ", ".join(f"json_extract(e.summary, '$.lengths.{when}.{key}')::{kind} AS {when}_{key}"
                         for when in ("before", "after") for key, kind in (
                             ("pairs", "BIGINT"), ("chosen_median", "DOUBLE"), ("rejected_median", "DOUBLE"),
                             ("chosen_longer", "DOUBLE")))  # fmt: skip
        return self._dicts(f"SELECT e.run_id, {cols} FROM run_ends e JOIN runs r USING (run_id) "
                           "WHERE json_extract(e.summary, '$.lengths.length_control')::BOOLEAN "
                           "ORDER BY r.started_at, e.run_id")  # fmt: skip

    def costs(self) -> list[dict[str, Any]]:
        """Calls, tokens and cost (None without a price) per run, stage and model, oldest run first. Cached
        answers are not calls: they cost nothing."""
        return self._dicts(
            "SELECT c.run_id, c.stage, c.model, sum(c.calls)::BIGINT AS calls, sum(c.errors)::BIGINT AS errors, "
            "sum(c.prompt_tokens)::BIGINT AS prompt_tokens, sum(c.completion_tokens)::BIGINT AS completion_tokens, "
            "sum(c.cost) AS cost FROM v_model_costs c LEFT JOIN runs r USING (run_id) "
            "GROUP BY c.run_id, c.stage, c.model ORDER BY min(r.started_at), c.run_id, c.stage, c.model")
    def retries_by_endpoint(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Per endpoint and model (of one run, or all): calls, HTTP requests, retries and their causes, waits.
        Calls recorded before migration 010 have no attempt counts and add nothing to them."""
        where, params = ("WHERE run_id = ?", [run_id]) if run_id else ("", [])
        counts = {"requests": "attempts", "retries": "greatest(attempts - 1, 0)", "rate_limited": "rate_limited",
                  "server_errors": "server_errors", "timeouts": "timeouts", "dropped": "dropped"}  # fmt: skip
        sql = ("SELECT endpoint, model, count(*) AS calls, count(*) FILTER (WHERE status = 'error') AS errors, "
               + "".join(f"coalesce(sum({x}), 0)::BIGINT AS {name}, " for name, x in counts.items())
               + "round(coalesce(sum(wait_ms), 0) / 1000, 3)::DOUBLE AS retry_wait_s, "
               f"round(coalesce(sum(throttle_ms), 0) / 1000, 3)::DOUBLE AS throttle_wait_s FROM model_calls {where} "
               "GROUP BY ALL ORDER BY ALL")  # fmt: skip
        with self._lock:
            return self.con.execute(sql, params).pl().to_dicts()

    def _dicts_with(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        with self._lock:
            return self.con.execute(sql, params).pl().to_dicts()

    def _dicts(self, sql: str) -> list[dict[str, Any]]:
        return self._dicts_with(sql, [])
