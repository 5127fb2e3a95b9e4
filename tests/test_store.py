import duckdb
import polars as pl
import pytest

from prefsynth.errors import PrefsynthError, WarehouseError
from prefsynth.schemas.records import TABLES, Failure, ModelCall, StageResult, columns
from prefsynth.warehouse.store import STATS_TABLES, Store


def _call(attempt: str, call: str, status: str = "ok") -> ModelCall:
    return ModelCall(attempt_id=attempt, call_id=call, model="m", endpoint="local", kind="chat", request="{}",
                     response='{"text": "x"}' if status == "ok" else None, status=status,
                     error=None if status == "ok" else "HTTP 500", prompt_tokens=3, completion_tokens=1,
                     latency_ms=1.0)  # fmt: skip


def test_migrations_are_versioned_and_applied_once(tmp_path):
    path = tmp_path / "w.duckdb"
    with Store(path) as store:
        assert store.schema_version() >= 1
        assert store.migrate() == []
    with Store(path) as store:
        rows = store.con.execute("SELECT version, name FROM schema_version").fetchall()
        assert rows[0][0] == 1 and rows[0][1].endswith(".sql")
        views = {r[0] for r in store.con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert {"v_pairs_export", "v_scores_wide", "v_model_costs", "v_latest_run"} <= views


def test_every_record_declares_its_tables_columns_as_the_migrations_make_them(tmp_path):
    sql_types = {pl.String: "VARCHAR", pl.Int32: "INTEGER", pl.Int64: "BIGINT", pl.Float64: "DOUBLE",
                 pl.Boolean: "BOOLEAN", pl.List(pl.String): "VARCHAR[]"}  # fmt: skip
    with Store(tmp_path / "w.duckdb") as store:
        for table in TABLES:
            made = dict(store.con.execute("SELECT column_name, data_type FROM duckdb_columns() "
                                          "WHERE table_name = ?", [table]).fetchall())  # fmt: skip
            extra = {"run_id", "created_at"}
            declared = {name: sql_types[dtype] for name, dtype in columns(table).items()}
            assert {k: v for k, v in made.items() if k not in extra} == declared, table
    assert len(TABLES) >= 13 and {"scores", "pairs", "panel_scores", "eval_items"} <= set(TABLES)


def test_writes_are_idempotent_and_the_cache_serves_only_ok_calls(tmp_path):
    with Store(tmp_path / "w.duckdb") as store:
        batch = StageResult(_call("a1", "c1"), _call("a2", "c2", "error"),
                            Failure(stage="generate", item_id="r", scorer_id=None, error="e", raw=None))
        assert store.write("run", batch)["model_calls"] == 2
        assert store.write("run", StageResult(_call("a1", "c1")))["model_calls"] == 0
        assert store.cached_calls(["c1", "c2", "c3"]) == {"c1": '{"text": "x"}'}
        stats = store.stats()
        assert stats["model_calls"] == 2 and stats["model_calls_ok"] == 1 and stats["failures"] == 1
        assert set(STATS_TABLES) <= set(stats)


def test_a_failed_batch_writes_nothing(tmp_path):
    with Store(tmp_path / "w.duckdb") as store:
        bad = StageResult(_call("a1", "c1"))
        store.con.execute("DROP TABLE failures")  # make the batch's last insert fail
        bad.add(Failure(stage="x", item_id="i", scorer_id=None, error="e", raw=None))
        with pytest.raises(duckdb.Error):
            store.write("run", bad)
        assert store.con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == 0


def _threads(store: Store) -> int:
    return store.con.execute("SELECT current_setting('threads')").fetchone()[0]


def test_the_batch_writer_adds_exactly_the_new_keys_when_some_exist_or_repeat(tmp_path):
    from prefsynth.warehouse.store import frame

    def batch(*calls: tuple[str, str], fails: int = 1) -> dict[str, pl.DataFrame]:
        return {"model_calls": frame("model_calls", [_call(a, c) for a, c in calls]),
                "failures": frame("failures", [Failure(stage="g", item_id=f"i{n}", scorer_id=None, error="e",
                                                       raw=None) for n in range(fails)])}  # fmt: skip

    with Store(tmp_path / "w.duckdb") as store:
        threads = _threads(store)
        assert store.write_frames("run", batch(("a1", "c1"), ("a2", "c2"))) == {"model_calls": 2, "failures": 1}
        assert not store._conflicting  # new keys: the plain INSERT
        # a2 exists and a3 comes twice: the plain INSERT fails, the batch runs again with ON CONFLICT
        again = batch(("a2", "c2"), ("a3", "first"), ("a3", "second"), ("a4", "c4"))
        assert store.write_frames("run", again) == {"model_calls": 2, "failures": 1}
        assert store._conflicting == {"model_calls"}
        assert store.write_frames("run", batch(("a5", "c5"), ("a1", "c1"))) == {"model_calls": 1, "failures": 1}
        rows = dict(store.con.execute("SELECT attempt_id, call_id FROM model_calls").fetchall())
        assert rows == {"a1": "c1", "a2": "c2", "a3": "first", "a4": "c4", "a5": "c5"}
        assert store._count("failures") == 3  # once per batch: the rolled back try left nothing
        assert _threads(store) == threads


def test_the_batch_writer_raises_a_broken_constraint_that_is_not_a_key_and_writes_nothing(tmp_path):
    from prefsynth.warehouse.store import frame

    with Store(tmp_path / "w.duckdb") as store:
        threads = _threads(store)
        calls = frame("model_calls", [_call("a1", "c1"), _call("a2", "c2")]).with_columns(
            model=pl.Series([None, "m"], dtype=pl.String))  # model is NOT NULL
        fails = frame("failures", [Failure(stage="g", item_id="i", scorer_id=None, error="e", raw=None)])
        with pytest.raises(duckdb.ConstraintException, match="NOT NULL"):
            store.write_frames("run", {"failures": fails, "model_calls": calls})
        assert store._count("model_calls") == store._count("failures") == 0
        assert _threads(store) == threads


def test_read_only_open_of_a_missing_warehouse_is_a_clear_error(tmp_path):
    with pytest.raises(PrefsynthError, match="warehouse not found"):
        Store(tmp_path / "none.duckdb", read_only=True)


def test_a_file_held_without_a_server_gives_a_clear_error_after_a_wait(tmp_path, monkeypatch):
    """A process that holds the file and serves nothing (not a run: e.g. a user's own duckdb session)."""
    import subprocess
    import sys

    from prefsynth.warehouse import store as store_module

    monkeypatch.setattr(store_module, "READER_WAIT_S", 0.5)

    path = tmp_path / "w.duckdb"
    Store(path).close()
    code = (f"from prefsynth.warehouse.store import Store; s = Store({str(path)!r}); print('ready', flush=True); "
            "import time; time.sleep(60)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"  # it holds the file now
        with pytest.raises(PrefsynthError, match="cannot open warehouse"):
            Store(path)
    finally:
        holder.kill()
        holder.wait()


def test_an_older_warehouse_opened_read_only_asks_to_be_migrated(tmp_path):
    path = tmp_path / "old.duckdb"
    with Store(path) as store:
        store.con.execute("DELETE FROM schema_version WHERE version = (SELECT max(version) FROM schema_version)")
    with pytest.raises(PrefsynthError, match="has schema version .* open it once read-write"):
        Store(path, read_only=True)
    Store(path).close()  # a read-write open migrates (the last migration is idempotent)
    Store(path, read_only=True).close()


def test_scores_wide_keeps_one_value_per_scorer_when_a_response_has_several(tmp_path):
    from prefsynth.schemas.records import Score

    def score(sid: str, value: float) -> Score:
        return Score(score_id=sid, response_id="r", scorer_id="s", scorer="pairwise", value=value, rationale=None,
                     raw="", call_ids=[])  # fmt: skip

    with Store(tmp_path / "w.duckdb") as store:
        store.con.execute("INSERT INTO responses VALUES ('r', 'p', 'm', 'mi', '{}', 0, 0, 't', NULL, NULL, NULL, 1, "
                          "'c', 'run', current_timestamp, 'sampled')")  # fmt: skip
        store.write("run1", StageResult(score("s1", 1.0)))
        store.write("run2", StageResult(score("s2", 0.75)))  # the same response against new opponents
        (row,) = store.con.execute("SELECT scores FROM v_scores_wide").fetchall()
        assert row[0] == {"pairwise": 0.75}


# ---- crash safety: real processes, SIGKILLed --------------------------------------------------------
KILLED_WRITER = """
import sys
from prefsynth.schemas.records import Failure, ModelCall, StageResult
from prefsynth.warehouse.store import Store

store = Store(sys.argv[1])
print("migrated", flush=True)
for i in range(100_000):
    calls = [ModelCall(attempt_id=f"a{i}-{j}", call_id=f"c{i}-{j}", model="m", endpoint="local", kind="chat",
                       request="{}", response='{"text": "x"}', status="ok", error=None, prompt_tokens=3,
                       completion_tokens=1, latency_ms=1.0) for j in range(40)]
    fails = [Failure(stage="generate", item_id=f"r{i}", scorer_id=None, error="e", raw=None)]
    store.write("run", StageResult(*calls, *fails))
    print(f"committed {i}", flush=True)
"""
BATCH = 40


def _write_until_killed(path, stop_after: str) -> set[int]:
    """Run KILLED_WRITER on a new warehouse, SIGKILL its process group once it prints `stop_after`;
    returns the batches it reported as committed (lines still in the pipe included)."""
    import os
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    assert child.stdout is not None
    lines = []
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if lines[-1] == stop_after:
                break
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    lines += [line.strip() for line in child.stdout]
    assert stop_after in lines, lines[-5:]
    assert child.returncode == -signal.SIGKILL
    return {int(line.split()[1]) for line in lines if line.startswith("committed ")}


def _catalog(store: Store) -> set[str]:
    sql = "SELECT table_name FROM duckdb_tables() UNION ALL SELECT view_name FROM duckdb_views() WHERE NOT internal"
    return {r[0] for r in store.con.execute(sql).fetchall()}


@pytest.mark.parametrize("stop_after", ["migrated", "committed 0", "committed 4", "committed 30"])
def test_a_sigkilled_writer_leaves_a_complete_schema_and_every_committed_batch(tmp_path, stop_after):
    from prefsynth.warehouse.store import _migrations

    with Store(tmp_path / "fresh.duckdb") as fresh:
        expected = _catalog(fresh)
    path = tmp_path / "w.duckdb"
    committed = _write_until_killed(path, stop_after)
    with Store(path) as store:  # before the migrations were checkpointed: "Failure while replaying WAL file"
        assert store.schema_version() == max(int(p.name.split("_", 1)[0]) for p in _migrations())
        assert _catalog(store) == expected
        rows = store.con.execute("SELECT split_part(attempt_id, '-', 1), count(*) FROM model_calls GROUP BY 1")
        per_batch = {int(b[1:]): n for b, n in rows.fetchall()}
        failures = {r[0] for r in store.con.execute("SELECT item_id FROM failures").fetchall()}
    assert all(per_batch.get(i) == BATCH for i in committed), (sorted(committed), per_batch)
    assert all(n == BATCH for n in per_batch.values())  # a batch is all there or not at all
    assert {f"r{i}" for i in committed} <= failures
    assert set(per_batch) - committed <= {max(committed, default=-1) + 1}  # at most the one in flight


DDL_THEN_KILL = """
import os, pathlib, signal, sys
import duckdb
con = duckdb.connect(sys.argv[1])
for sql in sorted(pathlib.Path(sys.argv[2]).glob("*.sql")):
    con.execute(sql.read_text(encoding="utf-8"))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _unreplayable_wal(tmp_path) -> bytes:
    """The WAL duckdb 1.5.5 leaves when killed with the migrations' DDL not checkpointed (it cannot replay it)."""
    import subprocess
    import sys
    from pathlib import Path

    import prefsynth.warehouse

    migrations = Path(prefsynth.warehouse.__file__).parent / "migrations"
    other = tmp_path / "other" / "x.duckdb"
    other.parent.mkdir()
    subprocess.run([sys.executable, "-c", DDL_THEN_KILL, str(other), str(migrations)], check=False)
    with pytest.raises(duckdb.Error, match="replaying WAL"):  # the failure, straight from duckdb
        duckdb.connect(str(other))
    return other.with_name("x.duckdb.wal").read_bytes()


def _follow_the_advice(message: str) -> None:
    import re
    import shlex
    import shutil

    (command,) = re.findall(r"mv \S+ \S+$", message)
    _, src, dst = shlex.split(command)
    shutil.move(src, dst)


def test_a_wal_duckdb_cannot_replay_is_named_with_the_way_out_and_kept(tmp_path):
    path = tmp_path / "w.duckdb"
    with Store(path) as store:
        store.begin_run("r1", "kept", "{}", None)  # committed and checkpointed (close checkpoints)
    wal = tmp_path / "w.duckdb.wal"
    wal.write_bytes(damaged := _unreplayable_wal(tmp_path))
    with pytest.raises(WarehouseError) as caught:
        Store(path)
    message = str(caught.value)
    assert f"cannot open warehouse {path}" in message and f"write-ahead log {wal}" in message
    assert "Stack Trace" not in message and "\n" not in message
    assert wal.read_bytes() == damaged  # nothing moved or deleted behind the user's back
    _follow_the_advice(message)
    (aside,) = tmp_path.glob("w.duckdb.wal.damaged-*")
    assert aside.read_bytes() == damaged and not wal.exists()
    with Store(path) as store:  # the same process opens it now, with what the main file held
        assert store.run_kind("r1") == "synthesize"


def test_a_new_warehouse_killed_before_its_checkpoint_gets_the_same_advice(tmp_path):
    path = tmp_path / "w.duckdb"
    duckdb.connect(str(path)).close()  # an empty DuckDB file, as the old Store left before its first checkpoint
    (tmp_path / "w.duckdb.wal").write_bytes(_unreplayable_wal(tmp_path))
    with pytest.raises(WarehouseError, match=r"INTERNAL Error: Failure while replaying WAL .* mv ") as caught:
        Store(path)
    _follow_the_advice(str(caught.value))
    with Store(path) as store:
        assert store.schema_version() >= 1


def test_a_file_that_is_not_duckdb_is_named(tmp_path):
    path = tmp_path / "notes.duckdb"
    path.write_text("not a database\n" * 100)
    with pytest.raises(WarehouseError, match=f"cannot open warehouse {path}: .*not a valid DuckDB database file.*"
                                             "choose another --db"):  # fmt: skip
        Store(path)
    assert path.read_text().startswith("not a database")


def test_a_warehouse_folder_that_cannot_be_created_is_named(tmp_path):
    # Tests run as root, where chmod does not stop writes: a regular file in place of a folder does.
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for path, problem in ((blocker / "w.duckdb", "File exists"), (blocker / "sub" / "w.duckdb", "Not a directory")):
        with pytest.raises(WarehouseError, match=f"cannot create the folder of warehouse {path}: .*{problem}"):
            Store(path)
    assert blocker.read_text() == "x"
    with pytest.raises(WarehouseError, match="cannot create warehouse /proc/prefsynth-test.duckdb: .*choose another"):
        Store("/proc/prefsynth-test.duckdb")  # a folder where no file can be created, even by root


def test_create_false_refuses_to_make_a_new_warehouse(tmp_path):
    with pytest.raises(WarehouseError, match="warehouse not found"):
        Store(tmp_path / "none.duckdb", create=False)
    assert list(tmp_path.iterdir()) == []


def test_stats_sum_attempts_retries_and_waits_per_endpoint(tmp_path):
    from typer.testing import CliRunner

    from prefsynth.cli import app

    def call(attempt: str, status: str, **tally) -> ModelCall:
        return _call(attempt, attempt, status).model_copy(update=tally)

    with Store(tmp_path / "w.duckdb") as store:
        store.write("run", StageResult(
            call("a1", "ok", attempts=1, rate_limited=0, server_errors=0, timeouts=0, dropped=0, wait_ms=0.0,
                 throttle_ms=250.0),
            call("a2", "ok", attempts=3, rate_limited=1, server_errors=0, timeouts=1, dropped=0, wait_ms=1500.0,
                 throttle_ms=0.0),
            call("a3", "error", attempts=4, rate_limited=0, server_errors=2, timeouts=0, dropped=2, wait_ms=750.0,
                 throttle_ms=0.0),
            call("a4", "ok")))  # recorded before migration 010: no counts  # fmt: skip
        (row,) = store.stats()["retries_by_endpoint"]
        by_run = store.con.execute("SELECT calls, requests, retries FROM v_endpoint_retries").fetchall()
    assert row == {"endpoint": "local", "model": "m", "calls": 4, "errors": 1, "requests": 8, "retries": 5,
                   "rate_limited": 1, "server_errors": 2, "timeouts": 1, "dropped": 2, "retry_wait_s": 2.25,
                   "throttle_wait_s": 0.25}  # fmt: skip
    assert by_run == [(4, 8, 5)]
    text = CliRunner().invoke(app, ["stats", "--db", str(tmp_path / "w.duckdb")], env={"COLUMNS": "200"})
    assert text.exit_code == 0 and "HTTP requests and retries per endpoint" in text.output


def test_a_writer_bounds_duckdbs_cache_above_room_for_its_keys(tmp_path, monkeypatch):
    """duckdb's default memory_limit (80% of RAM) let a long run's RSS grow with its warehouse."""
    import prefsynth.warehouse.store as store_module
    from prefsynth.warehouse.store import CACHE_BYTES, frame

    def limit_mib(store: Store) -> float:
        value, unit = store.con.execute("SELECT current_setting('memory_limit')").fetchone()[0].split()
        return float(value) * {"MiB": 1, "GiB": 1024}[unit]

    with Store(tmp_path / "w.duckdb") as store:  # a new warehouse: a few keys (schema_version), the cache
        assert CACHE_BYTES / 2**20 <= limit_mib(store) < CACHE_BYTES / 2**20 + 1
    monkeypatch.setattr(store_module, "_REBOUND_ROWS", 100)
    monkeypatch.setattr(store_module, "KEY_BYTES", 2**20)  # a MiB a key: 100 calls move the limit visibly
    with Store(tmp_path / "w.duckdb") as store:
        before = limit_mib(store)
        store.write_frames("run", {"model_calls": frame("model_calls", [_call(f"a{n}", f"c{n}") for n in range(99)])})
        assert limit_mib(store) == before  # fewer rows than _REBOUND_ROWS: not looked at yet
        store.write_frames("run", {"model_calls": frame("model_calls", [_call("a99", "c99")])})
        # 100 calls, 2 keys each (the attempt's primary key and the index on call_id), a MiB a key
        assert limit_mib(store) == before + 200


def test_a_runs_prompts_stream_without_holding_a_transaction_so_duckdb_can_checkpoint(tmp_path):
    """duckdb checkpoints while a run's prompts are read. They were read by one query open for the whole stream,
    and in runs of 100k prompts duckdb then never checkpointed before the stream ended (the WAL grew past its
    threshold: bench/engine.py's memory arm). At this size that query did not block, so this checks the reading
    and that a checkpoint goes through, not the old failure."""
    from prefsynth.schemas.records import Message, Prompt
    from prefsynth.warehouse.store import frame

    with Store(tmp_path / "w.duckdb") as store:
        store.ingest_prompts("run1", (Prompt(prompt_id=f"p{i}", messages=[Message(role="user", content=f"q{i}")],
                                             source="test", source_ref=str(i)) for i in range(1000)))  # fmt: skip
        blocks = store.run_prompts("run1", 100)
        first = next(blocks)
        store.write_frames("run1", {"model_calls": frame("model_calls", [_call("a1", "c1")])})  # the stream's commits
        store.con.execute("CHECKPOINT")  # raised "there are other write transactions active" while streaming
        seen = [p.prompt_id for block in [first, *blocks] for p in block]
    assert len(first) == 100
    assert sorted(seen) == sorted(f"p{i}" for i in range(1000))
