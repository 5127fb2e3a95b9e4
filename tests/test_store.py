import duckdb
import pytest

from prefsynth.errors import PrefsynthError
from prefsynth.schemas.records import Failure, ModelCall, StageResult
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


def test_writes_are_idempotent_and_the_cache_serves_only_ok_calls(tmp_path):
    with Store(tmp_path / "w.duckdb") as store:
        batch = StageResult(calls=[_call("a1", "c1"), _call("a2", "c2", "error")],
                            failures=[Failure(stage="generate", item_id="r", scorer_id=None, error="e", raw=None)])
        assert store.write("run", batch)["model_calls"] == 2
        assert store.write("run", StageResult(calls=[_call("a1", "c1")]))["model_calls"] == 0
        assert store.cached_calls(["c1", "c2", "c3"]) == {"c1": '{"text": "x"}'}
        stats = store.stats()
        assert stats["model_calls"] == 2 and stats["model_calls_ok"] == 1 and stats["failures"] == 1
        assert set(STATS_TABLES) <= set(stats)


def test_a_failed_batch_writes_nothing(tmp_path):
    with Store(tmp_path / "w.duckdb") as store:
        bad = StageResult(calls=[_call("a1", "c1")])
        store.con.execute("DROP TABLE failures")  # make the batch's last insert fail
        bad.failures.append(Failure(stage="x", item_id="i", scorer_id=None, error="e", raw=None))
        with pytest.raises(duckdb.Error):
            store.write("run", bad)
        assert store.con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == 0


def test_read_only_open_of_a_missing_warehouse_is_a_clear_error(tmp_path):
    with pytest.raises(PrefsynthError, match="warehouse not found"):
        Store(tmp_path / "none.duckdb", read_only=True)


def test_second_writer_gets_a_clear_error(tmp_path):
    import subprocess
    import sys

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
                          "'c', 'run', current_timestamp)")  # fmt: skip
        store.write("run1", StageResult(scores=[score("s1", 1.0)]))
        store.write("run2", StageResult(scores=[score("s2", 0.75)]))  # the same response against new opponents
        (row,) = store.con.execute("SELECT scores FROM v_scores_wide").fetchall()
        assert row[0] == {"pairwise": 0.75}
