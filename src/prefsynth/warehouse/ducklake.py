"""The DuckLake warehouse: a PostgreSQL catalog and Parquet data files, written by several processes at once.

This module owns everything that differs from the single DuckDB file; `Store` talks to a `LakeConnection`
as it talks to a duckdb connection, with the same SQL:

- The warehouse is named `ducklake:postgres://USER@HOST:PORT/DBNAME?data_path=FOLDER_OR_URL`. `data_path`
  (a local folder, or object storage such as `s3://bucket/prefix/`) is needed once, when the catalog is
  created: the catalog remembers it. The password never appears in the name: libpq reads it from
  `PGPASSWORD` (or `~/.pgpass`), as every PostgreSQL client does.
- The ducklake and postgres extensions load from their PyPI packages (`prefsynth[ducklake]`), never from
  the network; their version must be duckdb's.
- DuckLake has no primary keys and no `ON CONFLICT`. Migrations lose their PRIMARY KEY/UNIQUE constraints
  and indexes, and `INSERT ... ON CONFLICT DO NOTHING` becomes an anti-join insert on the table's key (the
  key the single file declares: the migrations are applied to an in-memory DuckDB once to read them).
- An anti-join alone would let two writers insert the same id at once: DuckLake merges concurrent
  appends to one table without complaint. So every write transaction also bumps the one row of
  `prefsynth_write_gate`; DuckLake then reports a conflict for the later of two overlapping write
  transactions, which `retry_wait` tells the Store to run again (its anti-join now sees the other's rows).
  Writers are thus serialized at commit, optimistically: reads never wait, and a batch is redone only
  when another batch committed while it was being written.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import itertools
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import duckdb

from prefsynth.errors import WarehouseError

PREFIX = "ducklake:"
PASSWORD_ENV = "PGPASSWORD"
MAX_ATTEMPTS = 30  # commits of one transaction before a conflict is an error
_GATE = "prefsynth_write_gate"
_WRITES = ("INSERT", "UPDATE", "DELETE", "MERGE", "CREATE", "ALTER", "DROP", "COPY")  # a write outside BEGIN is gated
retried = 0  # transactions of this process run again after a commit conflict (the tests and bench read it)
_EXTENSIONS = {"ducklake": "ducklake", "postgres": "postgres_scanner"}  # package -> duckdb's extension name


def is_lake(warehouse: str | Path) -> bool:
    return str(warehouse).startswith(PREFIX)


@dataclass(frozen=True)
class Lake:
    """Where a DuckLake warehouse lives: its PostgreSQL catalog and (to create it) its data path."""

    user: str | None
    host: str
    port: int
    dbname: str
    data_path: str | None

    @property
    def url(self) -> str:
        """The warehouse's name without its data path (what messages show: never a password)."""
        user = f"{self.user}@" if self.user else ""
        return f"{PREFIX}postgres://{user}{self.host}:{self.port}/{self.dbname}"

    def attach_sql(self, read_only: bool) -> str:
        conninfo = f"dbname={self.dbname} host={self.host} port={self.port}"
        conninfo += f" user={self.user}" if self.user else ""
        # no rows inlined in the catalog: every row goes to Parquet (and `row_id`, a column of snapshot_rows,
        # is reserved when inlining is on)
        options = ["READ_ONLY"] if read_only else ["DATA_INLINING_ROW_LIMIT 0"]
        if self.data_path and not read_only:
            options.append(f"DATA_PATH {literal(self.data_path)}")
        with_options = f" ({', '.join(options)})" if options else ""
        return f"ATTACH {literal(f'{PREFIX}postgres:{conninfo}')} AS lake{with_options}"


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _unslash(text: str) -> str:
    """`scheme:/x` -> `scheme://x`: a name that went through pathlib.Path (the CLI's `--db`) lost a slash."""
    return re.sub(r"^([a-z][a-z0-9+.-]*):/(?!/)", r"\1://", text)


def check_name(warehouse: str | Path | None) -> None:
    """Parse a DuckLake name (a `--db`) before it becomes a flow parameter: a bad one, or one with a password,
    fails here, so Prefect never stores it. A file's path passes."""
    if warehouse is not None and is_lake(warehouse):
        parse(warehouse)


def parse(warehouse: str | Path) -> Lake:
    """The Lake a `ducklake:postgres://...` name describes; WarehouseError saying what is wrong."""
    raw = str(warehouse)
    text = re.sub(r"(:/{1,2}[^/@:]*):[^@/]*@", r"\1:***@", raw)  # a password never reaches a message
    rest = _unslash(raw[len(PREFIX):])
    if not rest.startswith("postgres://"):
        raise WarehouseError(f"warehouse {text!r}: a DuckLake warehouse is ducklake:postgres://USER@HOST:PORT/DBNAME"
                             "?data_path=FOLDER (only a PostgreSQL catalog is supported)")  # fmt: skip
    url = urlsplit(rest)
    if url.password is not None:
        raise WarehouseError(f"warehouse {text!r}: no password in the warehouse name (it would be "
                             f"stored in configs, runs and logs); set the environment variable {PASSWORD_ENV} "
                             "(or use ~/.pgpass)")  # fmt: skip
    dbname = unquote(url.path.lstrip("/"))
    try:
        port = url.port or 5432
    except ValueError:
        raise WarehouseError(f"warehouse {text!r}: the port must be a number") from None
    if not url.hostname or not dbname or "/" in dbname:
        raise WarehouseError(f"warehouse {text!r}: name the catalog's host and database: "
                             "ducklake:postgres://USER@HOST:PORT/DBNAME?data_path=FOLDER")  # fmt: skip
    query = parse_qs(url.query, keep_blank_values=True)
    if unknown := sorted(set(query) - {"data_path"}):
        raise WarehouseError(f"warehouse {text!r}: unknown option {', '.join(unknown)} (only data_path)")
    data_path = query.get("data_path", [None])[-1]
    if data_path is not None:
        data_path = _unslash(data_path)
        if not data_path:
            raise WarehouseError(f"warehouse {text!r}: data_path is empty")
        if "://" not in data_path:  # a local folder: absolute, like the single file's path
            data_path = str(Path(data_path).expanduser().resolve())
        data_path = data_path.rstrip("/") + "/"
    return Lake(unquote(url.username) if url.username else None, url.hostname, port, dbname, data_path)


# ---- extensions ---------------------------------------------------------------------------------
@functools.cache
def _extension_files() -> dict[str, Path]:
    """duckdb's extension name -> a file to LOAD, from the PyPI packages of duckdb's exact version.

    The packages name the postgres extension's file `postgres.duckdb_extension`, but duckdb derives the
    entry point from the file name (`postgres_scanner`), so the files are linked under their duckdb names
    in a private folder of this process.
    """
    folder = Path(tempfile.mkdtemp(prefix="prefsynth-duckdb-ext-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    files = {}
    for package, name in _EXTENSIONS.items():
        dist = f"duckdb-extension-{package}"
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise WarehouseError(f"a DuckLake warehouse needs the {dist} package: pip install 'prefsynth[ducklake]'"
                                 ) from None  # fmt: skip
        found = resources.files(f"duckdb_extension_{package}").joinpath(
            "extensions", f"v{duckdb.__version__}", f"{package}.duckdb_extension")
        if version != duckdb.__version__ or not found.is_file():
            raise WarehouseError(f"{dist} {version} does not match duckdb {duckdb.__version__}: "
                                 f"pip install {dist}=={duckdb.__version__}")  # fmt: skip
        link = folder / f"{name}.duckdb_extension"
        link.symlink_to(Path(str(found)))
        files[name] = link
    return files


# ---- keys and SQL -------------------------------------------------------------------------------
@functools.cache
def table_keys() -> dict[str, tuple[str, ...]]:
    """Each table's primary key (or unique key) as the single file declares it: the migrations applied to an
    in-memory DuckDB. An anti-join insert skips rows whose key exists, as `ON CONFLICT DO NOTHING` does."""
    from prefsynth.warehouse.store import _migrations

    con = duckdb.connect()
    try:
        for item in _migrations():
            con.execute(item.read_text(encoding="utf-8"))
        rows = con.execute("SELECT table_name, constraint_column_names FROM duckdb_constraints() "
                           "WHERE constraint_type IN ('PRIMARY KEY', 'UNIQUE') "
                           "ORDER BY constraint_type = 'UNIQUE'").fetchall()  # fmt: skip
    finally:
        con.close()
    keys: dict[str, tuple[str, ...]] = {}
    for table, cols in rows:
        keys.setdefault(table, tuple(cols))
    return keys


_PK_CLAUSE = re.compile(r",\s*(?:--[^\n]*\n\s*)?(?:PRIMARY KEY|UNIQUE)\s*\([^)]*\)", re.IGNORECASE)
_PK_INLINE = re.compile(r"\s+(?:PRIMARY KEY|UNIQUE)\b(?!\s*\()", re.IGNORECASE)
_INDEX = re.compile(r"CREATE\s+(?:UNIQUE\s+)?INDEX\b[^;]*;?", re.IGNORECASE)
_UPSERT = re.compile(r"^\s*INSERT INTO (\w+)\s*\(([^)]*)\)\s+(.*?)\s+ON CONFLICT DO NOTHING\s*;?\s*$",
                     re.IGNORECASE | re.DOTALL)  # fmt: skip


def translate(sql: str) -> str:
    """The single file's SQL for DuckLake: DDL without keys and indexes, ON CONFLICT inserts as anti-joins."""
    if found := _UPSERT.match(sql):
        return _anti_join(*found.groups())
    if re.search(r"CREATE\s+(TABLE|(UNIQUE\s+)?INDEX)", sql, re.IGNORECASE):
        return _PK_INLINE.sub("", _PK_CLAUSE.sub("", _INDEX.sub("", sql)))
    return sql


def _anti_join(table: str, cols: str, source: str) -> str:
    keys = table_keys().get(table)
    if not keys:
        raise WarehouseError(f"no key to skip existing rows of {table} by")  # a programming error: no PK
    names = [c.strip() for c in cols.split(",")]
    if source.upper().startswith("SELECT"):
        source = f"({source})"
    match = " AND ".join(f'_old."{k}" = _new."{k}"' for k in keys)
    first = ", ".join(f'_new."{k}"' for k in keys)
    return (f"INSERT INTO {table} ({', '.join(names)}) SELECT * FROM {source} AS _new({', '.join(names)}) "
            f"WHERE NOT EXISTS (SELECT 1 FROM {table} _old WHERE {match}) "
            f"QUALIFY row_number() OVER (PARTITION BY {first}) = 1")  # fmt: skip


# ---- the connection ------------------------------------------------------------------------------
def connect(lake: Lake, read_only: bool) -> LakeConnection:
    """An in-memory DuckDB with the lake attached and in use; WarehouseError naming the catalog if not."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        for file in _extension_files().values():
            con.execute(f"LOAD {literal(str(file))}")
        _attach(con, lake, read_only)
        con.execute("USE lake")
        if not read_only:
            _make_gate(con)
    except duckdb.Error as err:
        con.close()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = (f" (the password comes from {PASSWORD_ENV} or ~/.pgpass)" if "password" in first.lower() else "")
        if "does not match" in first:
            hint = " (the catalog keeps the data path it was created with: leave data_path out of the name)"
        elif "DATA_PATH" in first or "data path" in first.lower():
            hint = " (a new catalog needs ?data_path=FOLDER in the warehouse name)"
        raise WarehouseError(f"cannot open warehouse {lake.url}: {first}{hint}") from None
    return LakeConnection(con, read_only)


def _attach(con: duckdb.DuckDBPyConnection, lake: Lake, read_only: bool) -> None:
    """ATTACH the lake. Two processes creating a new catalog at the same moment race in PostgreSQL (both
    create its tables: one fails on a duplicate key); the loser attaches again and finds the catalog made."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            con.execute(lake.attach_sql(read_only))
            return
        except duckdb.Error as err:
            racing = "Failed to initialize DuckLake" in str(err) and (
                "duplicate key" in str(err) or "already exists" in str(err))  # fmt: skip
            if not racing or attempt + 1 >= MAX_ATTEMPTS:
                raise
            time.sleep(random.uniform(0.05, 0.2))


def _make_gate(con: duckdb.DuckDBPyConnection) -> None:
    """The write gate's table and its row, made in one transaction once per catalog (a bump must never find
    the table empty; two first writers that both create it conflict, and the later one finds it)."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            con.execute("BEGIN")
            con.execute(f"CREATE TABLE IF NOT EXISTS {_GATE} (writes BIGINT)")
            if not con.execute(f"SELECT count(*) FROM {_GATE}").fetchone()[0]:
                con.execute(f"INSERT INTO {_GATE} VALUES (0)")
            con.execute("COMMIT")
            return
        except duckdb.Error as err:
            with contextlib.suppress(duckdb.Error):  # a failed COMMIT has ended the transaction already
                con.execute("ROLLBACK")
            if (wait := _conflict_wait(err, attempt)) is None:
                raise
            time.sleep(wait)


class LakeConnection:
    """A duckdb connection to the lake that speaks the single file's SQL (see `translate`)."""

    replays = True  # a write transaction may run again (see `retry_wait`): its input must be replayable

    def __init__(self, con: duckdb.DuckDBPyConnection, read_only: bool, gate: bool = True) -> None:
        self.con, self.read_only, self.gate = con, read_only, gate and not read_only
        self._open = False  # inside BEGIN ... COMMIT

    def execute(self, sql: str, params: Any = None) -> Any:
        head = sql.strip().upper()
        if head == "CHECKPOINT":  # the catalog commits to PostgreSQL: no write-ahead log to fold in
            return self.con
        if head == "BEGIN":
            self.con.execute("BEGIN")
            self._open = True
            if self.gate:
                try:
                    self.con.execute(f"UPDATE {_GATE} SET writes = writes + 1")
                except BaseException:  # e.g. the catalog's connection dropped: leave no transaction open
                    self.execute("ROLLBACK")
                    raise
            return self.con
        if head in ("COMMIT", "ROLLBACK"):
            self._open = False
            try:
                return self.con.execute(head)
            except duckdb.TransactionException:
                if head == "ROLLBACK":  # a failed COMMIT has ended the transaction already
                    return self.con
                raise
        if self.gate and not self._open and head.startswith(_WRITES):
            return self._autocommit(translate(sql), params)
        return self.con.execute(translate(sql), params)

    def _autocommit(self, sql: str, params: Any) -> _Rows:
        """One write statement outside a transaction: in its own gated transaction, run again on a conflict."""
        for attempt in itertools.count():
            self.execute("BEGIN")
            try:
                rows = self.con.execute(sql, params).fetchall()
                self.execute("COMMIT")
                return _Rows(rows)
            except BaseException as err:
                self.execute("ROLLBACK")
                if (wait := _conflict_wait(err, attempt)) is None:
                    raise
                time.sleep(wait)
        raise AssertionError("unreachable")

    def register(self, name: str, data: Any) -> Any:
        return self.con.register(name, data)

    def unregister(self, name: str) -> Any:
        return self.con.unregister(name)

    def cursor(self) -> LakeConnection:
        cur = self.con.cursor()
        cur.execute("USE lake")
        return LakeConnection(cur, self.read_only, gate=False)

    def close(self) -> None:
        self.con.close()


class _Rows:
    """The rows of a statement that `LakeConnection` committed itself (its cursor has moved on)."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows


def retry_wait(con: Any, err: BaseException, attempt: int) -> float | None:
    """Seconds to wait before running a failed write transaction again, or None to raise: a DuckLake commit
    conflict (another writer committed to the same warehouse meanwhile), up to MAX_ATTEMPTS times."""
    return _conflict_wait(err, attempt) if isinstance(con, LakeConnection) else None


def _conflict_wait(err: BaseException, attempt: int) -> float | None:
    if not isinstance(err, duckdb.Error) or attempt + 1 >= MAX_ATTEMPTS:
        return None
    text = str(err)
    if "conflict" not in text.lower() and "Failed to commit DuckLake transaction" not in text:
        return None
    global retried
    retried += 1
    return random.uniform(0.01, 0.05) * min(2**attempt, 20)  # jitter: the writers do not collide again in step
