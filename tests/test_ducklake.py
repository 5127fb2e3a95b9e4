"""The DuckLake warehouse on a real PostgreSQL catalog (issue 15, part 4): the same migrations, views, writes,
stats and exports as the single file; the same id written twice, or by two processes at once, is one row.

The server is Debian's PostgreSQL on loopback in a temporary folder (tests/postgres.py), one per session;
each test gets its own database and data folder. Its password reaches DuckDB through PGPASSWORD only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from prefsynth.cli import app
from prefsynth.errors import PrefsynthError, WarehouseError
from prefsynth.schemas.records import Message, Prompt
from prefsynth.warehouse import ducklake
from prefsynth.warehouse.reader import Warehouse
from prefsynth.warehouse.store import Store, _migrations, frame
from tests.conftest import small_config, write_jsonl
from tests.fake_server import CountingServer, FakeOpenAI, Reply, deterministic_reply
from tests.postgres import PostgresServer
from tests.test_crash import _env, _start

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def lake(pg: PostgresServer, tmp_path: Path) -> str:
    """A new, empty DuckLake warehouse: its own database and data folder."""
    return pg.create_db(f"t_{uuid.uuid4().hex[:12]}") + f"?data_path={tmp_path / 'lake-data'}"


# ---- names and SQL (no server) ------------------------------------------------------------------
def test_a_lake_is_named_by_its_catalog_and_data_path(tmp_path: Path) -> None:
    lake = ducklake.parse(f"ducklake:postgres://me@db.internal:6543/lake?data_path={tmp_path}/d")
    assert (lake.user, lake.host, lake.port, lake.dbname, lake.data_path) == (
        "me", "db.internal", 6543, "lake", f"{tmp_path}/d/")
    assert lake.url == "ducklake:postgres://me@db.internal:6543/lake"
    # the CLI's --db is a Path, which folds `//`: the name survives it, object storage included
    folded = ducklake.parse(str(Path("ducklake:postgres://me@db/lake?data_path=s3://bucket/prefsynth")))
    assert (folded.host, folded.port, folded.data_path) == ("db", 5432, "s3://bucket/prefsynth/")
    assert ducklake.parse("ducklake:postgres://db/lake").data_path is None  # an existing catalog knows it
    for bad, says in [("ducklake:sqlite:///x.db", "only a PostgreSQL catalog"),
                      ("ducklake:postgres://me@db", "name the catalog's host and database"),
                      ("ducklake:postgres://me@db:x/lake", "port must be a number"),
                      ("ducklake:postgres://me@db/lake?path=/x", "unknown option path")]:  # fmt: skip
        with pytest.raises(WarehouseError, match=says):
            ducklake.parse(bad)


def test_a_password_in_the_config_is_refused_naming_the_variable(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", ["hi"])
    with pytest.raises(PrefsynthError, match="PGPASSWORD") as err:
        small_config(tmp_path, prompts, warehouse="ducklake:postgres://me:s3cret@db/lake?data_path=/d")
    assert "s3cret" not in str(err.value) and "warehouse" in str(err.value)


def test_a_password_in_a_db_name_never_reaches_a_message_or_a_flow_parameter(tmp_path: Path) -> None:
    """`--db` is no config field: it is checked before it becomes a flow parameter (Prefect would store it),
    and no message repeats a password, whatever else is wrong with the name (here: the scheme)."""
    from prefsynth.flows import deploy

    for name in ("ducklake:postgresql://me:s3cret@db/lake", "ducklake:postgres://me:s3cret@db/lake",
                 str(Path("ducklake:postgres://me:s3cret@db/lake"))):  # fmt: skip
        with pytest.raises(WarehouseError) as err:
            ducklake.check_name(name)
        assert "s3cret" not in str(err.value) and "***" in str(err.value), err.value
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"prompts": {"path": "p.jsonl"},
                                      "generation": {"models": [{"base_url": "http://h/v1", "model": "m"}]},
                                      "scorers": [{"kind": "pointwise_judge",
                                                   "model": {"base_url": "http://h/v1", "model": "m"}}]}))  # fmt: skip
    with pytest.raises(WarehouseError, match=r"me:\*\*\*@"):
        deploy.parameters(config, Path("ducklake:postgres://me:s3cret@db/lake"))
    lake = "ducklake:postgres://me@db/lake"  # a deployment keeps a lake's name (it names no file)
    assert ducklake.is_lake(deploy.parameters(config, Path(lake))["db"])
    result = CliRunner().invoke(app, ["run", str(config), "--db", "ducklake:postgres://me:s3cret@db/lake"])
    assert result.exit_code == 2 and "s3cret" not in result.output, result.output


def test_migrations_lose_keys_and_indexes_and_inserts_become_anti_joins() -> None:
    for item in _migrations():
        sql = ducklake.translate(item.read_text(encoding="utf-8"))
        assert "PRIMARY KEY" not in sql.upper() and "CREATE INDEX" not in sql.upper(), item.name
    keys = ducklake.table_keys()
    assert keys["responses"] == ("response_id",) and keys["run_pairs"] == ("run_id", "pair_id")
    sql = ducklake.translate("INSERT INTO scorers (scorer_id, name) VALUES (?, ?) ON CONFLICT DO NOTHING")
    assert "ON CONFLICT" not in sql and 'NOT EXISTS (SELECT 1 FROM scorers _old WHERE _old."scorer_id"' in sql


# ---- against PostgreSQL -------------------------------------------------------------------------
def _prompts(ids: range) -> pl.DataFrame:
    return frame("prompts", [Prompt(prompt_id=f"p{i:05d}", messages=[Message(role="user", content=f"q {i}")],
                                    source="test", source_ref=str(i)) for i in ids])  # fmt: skip


def _fill(store: Store) -> list[dict[str, int]]:
    """The same writes, each twice: what every backend must store once."""
    added = []
    for _ in range(2):
        store.begin_run("r1", "test", "{}", None) if store.run_kind("r1") is None else None
        store.register_scorer("s1", "judge", "pointwise", "{}")
        added.append(store.write_frames("r1", {"prompts": _prompts(range(30))}))
        store.ingest_prompts("r1", [Prompt(prompt_id="p00001", messages=[Message(role="user", content="q 1")],
                                           source="test", source_ref="1")])  # fmt: skip
        store.end_run("r1", "completed", {"pairs": 0})
        store.record_snapshot("snap1", "r1", "trl", "/out", "none", ["a", "b"], "f", "c", {"pairs": 2})
    return added


@pytest.mark.postgres
def test_the_same_migrations_views_and_writes_as_the_single_file(lake: str, tmp_path: Path) -> None:
    with Store(lake) as store, Store(tmp_path / "w.duckdb") as single:
        assert store.schema_version() == single.schema_version() == len(_migrations())
        for kind in ("tables", "views"):
            sql = (f"SELECT {kind[:-1]}_name FROM duckdb_{kind}() WHERE NOT internal AND database_name = "
                   f"current_database() AND {kind[:-1]}_name <> 'prefsynth_write_gate' ORDER BY 1")  # fmt: skip
            names = store.con.execute(sql).fetchall()
            assert names == single.con.execute(sql).fetchall()
            assert kind == "tables" or ("v_pairs_export",) in names
            assert len(names) > 8
        assert _fill(store) == _fill(single) == [{"prompts": 30}, {"prompts": 0}]
        lake_stats, file_stats = store.stats(), single.stats()
        assert lake_stats["prompts"] == 30 and lake_stats["runs"] == 1 and lake_stats["dataset_snapshots"] == 1
        assert lake_stats == file_stats
    # the catalog remembers its data path: readers name only the catalog
    catalog = lake.split("?")[0]
    assert Warehouse(catalog).runs()["status"].to_list() == ["completed"]
    with Store(catalog, read_only=True) as reader:
        assert reader.con.execute("SELECT count(*), count(DISTINCT prompt_id) FROM prompts").fetchone() == (30, 30)
    assert any((tmp_path / "lake-data").rglob("*.parquet")), "the rows are Parquet files in the data path"


@pytest.mark.postgres
def test_clear_errors_without_data_path_password_or_tables(pg: PostgresServer, lake: str, tmp_path: Path,
                                                            monkeypatch) -> None:  # fmt: skip
    empty = pg.create_db(f"t_{uuid.uuid4().hex[:12]}")
    with pytest.raises(WarehouseError, match=r"data_path is not set .*needs \?data_path=FOLDER"):
        Store(empty)
    with pytest.raises(WarehouseError, match="warehouse not found: .*no prefsynth tables"):
        Store(f"{empty}?data_path={tmp_path}", create=False)  # e.g. `prefsynth export` on a new catalog
    monkeypatch.delenv("PGPASSWORD")
    with pytest.raises(WarehouseError, match=r"cannot open warehouse ducklake:postgres://postgres@.*PGPASSWORD"):
        Store(lake)


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from prefsynth.warehouse import ducklake
    from prefsynth.warehouse.store import Store
    from tests.test_ducklake import _prompts
    lake, go, me = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    with Store(lake) as store:
        Path(f"{go}.ready{me}").touch()
        while not go.exists():
            time.sleep(0.01)
        added = sum(store.write_frames(f"run{me}", {"prompts": _prompts(range(i * 20, i * 20 + 60))})["prompts"]
                    for i in range(25))
    print(added, ducklake.retried)
""")


@pytest.mark.postgres
def test_two_processes_writing_the_same_ids_at_once_store_each_once(lake: str, tmp_path: Path) -> None:
    Store(lake).close()  # migrated once: the race is on the rows
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, lake, str(go), str(n)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in (1, 2)]  # fmt: skip
    for n in (1, 2):
        while not Path(f"{go}.ready{n}").exists():
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    added, retried = zip(*[map(int, out.split()) for out, _ in outs], strict=True)
    with Store(lake, read_only=True) as store:
        rows = store.con.execute("SELECT count(*), count(DISTINCT prompt_id) FROM prompts").fetchone()
    assert rows == (540, 540)  # ids 0..539, each once
    assert sum(added) == 540  # each process counts what it added: together, every row once
    assert sum(retried) > 0, "precondition: the writers collided (a conflict was reported and retried)"


def _job(tmp: Path, url: str, warehouse: str, prompts: Path, name: str) -> Path:
    model = {"base_url": url, "model": "m", "revision": "r1", "max_concurrency": 4, "max_retries": 0, "timeout_s": 120}
    # revision: the identity is m@r1, not the URL, so the file and the lake runs (two servers) share ids
    raw = {"name": name, "prompts": {"path": str(prompts)},
           "generation": {"models": [model], "samples_per_prompt": 3, "sampling": {"max_tokens": 16, "seed": 3}},
           "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
           "curation": {"min_margin": 1}, "warehouse": warehouse}  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _lake_rows(lake: str, sql: str) -> list[tuple]:
    with Store(lake, read_only=True) as store:
        return store.con.execute(sql).fetchall()


class _Rendezvous:
    """Answers as CountingServer does, but holds every answer until more requests wait than one process sends at
    once (its max_concurrency): then both lake runs are running, whatever the machine's load; after that it
    answers at once (at most 120 s of holding: the overlap check then fails with its message)."""

    def __init__(self, more_than: int) -> None:
        self.more_than, self.waiting, self.open = more_than, 0, False
        self.cond = threading.Condition()

    def __call__(self, body: dict[str, Any]) -> Reply:
        with self.cond:
            self.waiting += 1
            if self.waiting > self.more_than:
                self.open = True
                self.cond.notify_all()
            self.cond.wait_for(lambda: self.open, timeout=120)
        return deterministic_reply(body)


@pytest.mark.postgres
def test_the_pipeline_gives_the_same_pairs_on_both_backends_with_two_processes_on_the_lake(
        lake: str, tmp_path: Path) -> None:  # fmt: skip
    """`prefsynth run` on the loopback model server: once into a single file, and twice at once (two
    processes) into one DuckLake. An orchestration test: the answers are a hash of each request."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [f"Question number {i}: name a fruit." for i in range(12)])
    single = tmp_path / "w.duckdb"
    with CountingServer(latency_s=0.02) as server, FakeOpenAI(_Rendezvous(more_than=4)) as both:
        jobs = [_job(tmp_path, server.base_url, str(single), prompts, "single"),
                *(_job(tmp_path, both.base_url, lake, prompts, f"lake{n}") for n in (1, 2))]  # fmt: skip
        # each its own Prefect home: three temporary APIs creating one database at once would collide
        homes = [tmp_path / job.stem for job in jobs]
        for home in homes:
            home.mkdir()
        procs = [_start(job, _env(home, uuid.uuid4().hex)) for job, home in zip(jobs, homes, strict=True)]
        outs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outs)

    with Store(single, read_only=True) as store:
        pairs = {r[0] for r in store.con.execute("SELECT pair_id FROM v_pairs_export").fetchall()}
        responses = store.stats()["responses"]
    assert pairs, "precondition: the single file's run made pairs"
    catalog = lake.split("?")[0]
    runs = _lake_rows(catalog, "SELECT r.run_id, r.started_at, e.finished_at, e.status FROM runs r "
                               "JOIN run_ends e USING (run_id) ORDER BY r.name")  # fmt: skip
    assert [r[3] for r in runs] == ["completed", "completed"]
    assert max(r[1] for r in runs) < min(r[2] for r in runs), "precondition: the two lake runs wrote at once"
    for run_id, *_ in runs:  # each process's run selected exactly the single file's pairs
        assert {r[0] for r in _lake_rows(catalog, f"SELECT pair_id FROM run_pairs WHERE run_id = '{run_id}'")} == pairs
    for table, key in [("prompts", "prompt_id"), ("responses", "response_id"), ("scores", "score_id"),
                       ("pairs", "pair_id"), ("scorers", "scorer_id"), ("run_prompts", "run_id, prompt_id")]:
        assert _lake_rows(catalog, f"SELECT {key} FROM {table} GROUP BY ALL HAVING count(*) > 1") == [], table

    stats = CliRunner().invoke(app, ["stats", "--db", catalog, "--json"])
    assert stats.exit_code == 0, stats.output
    counts = json.loads(stats.output)
    assert counts["responses"] == responses and counts["runs"] == 2 and counts["pairs"] == len(pairs)
    exported = []
    for db, out in ((catalog, tmp_path / "lake-export"), (str(single), tmp_path / "file-export")):
        result = CliRunner().invoke(app, ["export", "--db", db, "--out", str(out)])
        assert result.exit_code == 0, result.output
        exported.append(pl.read_parquet(out / "train.parquet").select("prompt", "chosen", "rejected"))
    assert len(exported[0]) == len(pairs) and exported[0].sort(pl.all()).equals(exported[1].sort(pl.all()))
    assert _lake_rows(catalog, "SELECT count(*) FROM dataset_snapshots") == [(1,)]
    report = CliRunner().invoke(app, ["report", "--db", catalog, "--out", str(tmp_path / "report.html")])
    assert report.exit_code == 0 and "<svg" in (tmp_path / "report.html").read_text(), report.output


def test_a_lake_takes_no_prefect_slot_on_a_shared_server(monkeypatch, tmp_path: Path) -> None:
    """Several writers are the point of a lake: no per-warehouse concurrency limit, where a file takes one."""
    from prefsynth.flows import exclusive

    def no_server(name: str) -> None:
        raise AssertionError(f"asked Prefect for limit {name}")

    monkeypatch.setattr(exclusive, "shared_server", lambda: True)
    monkeypatch.setattr(exclusive, "_ensure_limit", no_server)
    with exclusive.warehouse_turn("ducklake:postgres://me@db/lake"):
        pass
    with pytest.raises(AssertionError, match="asked Prefect for limit prefsynth-warehouse-"), \
            exclusive.warehouse_turn(tmp_path / "w.duckdb"):  # fmt: skip
        pass


@pytest.mark.postgres
def test_processes_that_create_a_new_lake_at_the_same_moment_all_open_it(lake: str) -> None:
    """Runs start streaming at once (no wait for Prefect's API): several may create a new catalog together,
    and PostgreSQL fails all but one on a duplicate key. Those attach again and find the catalog made."""
    parsed = ducklake.parse(lake)
    start = threading.Barrier(4)
    opened: list[str] = []

    def open_it() -> None:
        start.wait()
        con = ducklake.connect(parsed, read_only=False)  # each its own in-memory DuckDB: separate catalog clients
        opened.append(con.con.execute("SELECT count(*) FROM duckdb_databases() WHERE database_name = 'lake'")
                      .fetchone()[0])  # fmt: skip
        con.con.close()

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert opened == [1, 1, 1, 1]
