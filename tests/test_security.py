"""Secrets stay secret, SQL stays SQL, local servers stay local.

The end-to-end test plants a recognizable API key in the environment variable a config names, runs the CLI
(a successful run, a run whose calls all fail, a run whose prompt file is bad after the endpoints were
built, then `stats --json` and `export`) against a loopback server that checks the key arrives, and greps
everything the runs left: their output, the warehouse (bytes and every column of every table), the exports
and a fresh PREFECT_HOME (Prefect's SQLite database: flow parameters, logs, artifacts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import duckdb
import pytest
import yaml

from prefsynth.backends import llama_server
from prefsynth.backends.client import Endpoint
from prefsynth.backends.local import LocalServer
from prefsynth.errors import ConfigError, PrefsynthError
from prefsynth.schemas.config import parse_config
from prefsynth.warehouse.store import Store
from tests.conftest import write_jsonl
from tests.fake_server import FakeOpenAI, deterministic_reply

KEY_ENV = "PREFSYNTH_TEST_API_KEY"  # its name is stored (configs); its value never


def test_an_endpoint_repr_never_shows_its_api_key():
    ep = Endpoint(label="m", identity="h#m", base_url="http://h/v1", model="m", api_key="sk-PLANTED-repr",
                  concurrency=1, timeout_s=1, max_retries=0, is_local=False)  # fmt: skip
    assert ep.api_key == "sk-PLANTED-repr"  # the key is there, and used
    for shown in (repr(ep), str(ep), f"{ep}", repr([ep]), repr({"ep": ep})):
        assert "PLANTED" not in shown and "h#m" in shown


def _config_with(where: str, url: str) -> dict:
    model = {"base_url": url, "model": "m"}
    raw = {
        "prompts": {"builtin": "quickstart"},
        "generation": {"models": [{"base_url": "http://h:8000/v1", "model": "m"}]},
        "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": {"base_url": "http://h:8000/v1",
                                                                           "model": "m"}}],
    }  # fmt: skip
    if where == "generation":
        raw["generation"]["models"] = [model]
    elif where == "judge":
        raw["scorers"][0]["model"] = model
    elif where == "reward_model":
        raw["scorers"].append({"kind": "reward_model", "model": model})
    elif where == "teacher":
        raw["teacher"] = {"model": model}
    elif where in ("checker", "optimizer"):
        raw["loop"] = {where: model}
    return raw


@pytest.mark.parametrize("where", ["generation", "judge", "reward_model", "teacher", "checker", "optimizer"])
@pytest.mark.parametrize("url", ["http://alice:sk-PLANTED-1@h:8000/v1", "http://sk-PLANTED-1@h:8000/v1",
                                 "https://h/v1?api-key=sk-PLANTED-1", "https://h/v1?x=1#sk-PLANTED-1"])
def test_a_base_url_with_credentials_is_refused_everywhere_a_model_is_configured(where, url):
    with pytest.raises(ConfigError) as info:
        parse_config(_config_with(where, url))
    message = str(info.value)
    assert "api_key_env" in message and "must not contain" in message
    assert "PLANTED" not in message and "alice" not in message and "api-key" not in message


def test_a_plain_base_url_is_accepted_and_keeps_its_identity():
    config = parse_config(_config_with("generation", "http://h:8000/v1"))
    assert config.generation.models[0].identity == "http://h:8000/v1#m"


@pytest.mark.parametrize("name", ['x"; DROP TABLE prompts; --', "prompts; DROP TABLE runs", 'a"."b', "runs)--"])
def test_a_hostile_table_name_is_an_identifier_never_sql(tmp_path, name):
    with Store(tmp_path / "w.duckdb") as store:
        before = store.con.execute("SELECT count(*) FROM information_schema.tables").fetchone()[0]
        with pytest.raises(PrefsynthError, match="has no table or view named"):
            store.prompts_from_table(name)
        after = store.con.execute("SELECT count(*) FROM information_schema.tables").fetchone()[0]
        assert before == after and before > 10  # nothing was dropped
        # a table whose name looks like SQL is still read, as a name
        store.con.execute('CREATE TABLE "prompts; DROP TABLE runs" (prompt VARCHAR)')
        store.con.execute("""INSERT INTO "prompts; DROP TABLE runs" VALUES ('hi')""")
        assert store.prompts_from_table("prompts; DROP TABLE runs").to_dicts() == [{"prompt": "hi"}]
        assert store.con.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_sql_built_from_table_names_takes_only_the_warehouses_own(tmp_path):
    import polars as pl

    with Store(tmp_path / "w.duckdb") as store:
        for call in (lambda: store._count("runs; DROP TABLE prompts"),
                     lambda: store.existing_ids("prompts t; DROP TABLE runs; --", ["x"]),
                     lambda: store._insert_rows("pairs; DROP TABLE runs", pl.DataFrame({"a": [1]}))):  # fmt: skip
            with pytest.raises((ValueError, KeyError)):
                call()
        assert store._count("runs") == 0 and store.existing_ids("prompts", ["x"]) == set()


def test_a_config_table_name_with_a_quote_is_refused():
    raw = {**_config_with("generation", "http://h:8000/v1"), "prompts": {"warehouse_table": 'x"; DROP TABLE runs'}}
    with pytest.raises(ConfigError, match="warehouse_table"):
        parse_config(raw)


def test_local_model_servers_bind_to_loopback_only(monkeypatch, tmp_path):
    server = LocalServer(tmp_path / "m.gguf", "m", 512, 1)
    cmd = server.command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and server.base_url.startswith("http://127.0.0.1:")
    # the server's entry point ignores HOST (llama-cpp-python's own would bind to it) and refuses other hosts
    monkeypatch.setenv("HOST", "0.0.0.0")
    assert llama_server.loopback("127.0.0.1") == "127.0.0.1"
    for host in ("0.0.0.0", "::", "192.168.1.5", ""):
        with pytest.raises(SystemExit, match="loopback only"):
            llama_server.loopback(host)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("prefsynth")
    return subprocess.run([str(cli), *args], env=env, capture_output=True, text=True, timeout=300)


def _job(tmp: Path, name: str, url: str, prompts: Path) -> Path:
    model = {"base_url": url, "model": "m", "api_key_env": KEY_ENV, "max_concurrency": 2, "max_retries": 0}
    raw = {"name": name, "prompts": {"path": str(prompts)},
           "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"max_tokens": 16}},
           "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
           "curation": {"min_margin": 1}, "export": [{"format": "trl", "path": str(tmp / f"export-{name}")}],
           "warehouse": str(tmp / "w.duckdb")}  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _rows_with(db: Path, text: str) -> dict[str, int]:
    """Per table of the warehouse, the rows where any column holds `text` (every row cast to text)."""
    with duckdb.connect(str(db), read_only=True) as con:
        tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_type = 'BASE TABLE'").fetchall()]  # fmt: skip
        found = {t: con.execute(f'SELECT count(*) FROM "{t}" AS row WHERE CAST(row AS VARCHAR) LIKE ?',
                                [f"%{text}%"]).fetchone()[0] for t in tables}  # fmt: skip
    return {t: n for t, n in found.items() if n}


def _files_with(root: Path, text: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes())


def test_a_planted_api_key_is_used_but_stored_printed_and_logged_nowhere(tmp_path):
    key = f"sk-PLANTED-{uuid.uuid4().hex}"
    home = tmp_path / "prefect-home"
    env = {**os.environ, KEY_ENV: key, "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)  # a fresh temporary API whose database is in `home`
    failing = {"on": False}

    def respond(body):
        return (500, {"error": {"message": "injected server error"}}) if failing["on"] else deterministic_reply(body)

    outputs = []
    with FakeOpenAI(respond) as server:
        ok = _job(tmp_path, "ok", server.base_url, write_jsonl(tmp_path / "p.jsonl", ["Name a fruit.", "Say hi."]))
        first = _cli(["run", str(ok)], env)
        outputs.append(first.stdout + first.stderr)
        assert first.returncode == 0, outputs[-1]
        used = len(server.authorizations)

        failing["on"] = True  # every call of a run with new prompts fails on the server
        bad = _job(tmp_path, "failing", server.base_url, write_jsonl(tmp_path / "q.jsonl", ["Name a tree."]))
        second = _cli(["run", str(bad)], env)
        outputs.append(second.stdout + second.stderr)
        assert second.returncode == 1 and "failed" in outputs[-1], outputs[-1]
        during_failing = len(server.authorizations) - used

        (tmp_path / "broken.jsonl").write_text('{"prompt": "fine"}\n{not json\n')
        broken = _job(tmp_path, "broken", server.base_url, tmp_path / "broken.jsonl")
        before = len(server.authorizations)
        third = _cli(["run", str(broken)], env)  # the endpoint is built and checked, then the prompt file fails
        outputs.append(third.stdout + third.stderr)
        assert third.returncode == 2 and "invalid JSON" in outputs[-1], outputs[-1]
        checked = len(server.authorizations) - before
    for args in (["stats", "--db", str(tmp_path / "w.duckdb"), "--json"], ["stats", "--db", str(tmp_path / "w.duckdb")],
                 ["export", "--db", str(tmp_path / "w.duckdb"), "--out", str(tmp_path / "export-cli"), "--format",
                  "jsonl"]):  # fmt: skip
        done = _cli(args, env)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout + done.stderr)

    # the precondition: the key was used, on every request of each run, and the runs made and stored calls
    assert server.authorizations and set(server.authorizations) == {f"Bearer {key}"}
    assert used > 4 and during_failing >= 2 and checked >= 1
    db = tmp_path / "w.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE status = 'error') "
                           "FROM model_calls").fetchone() >= (4, 2)  # fmt: skip
        assert con.execute("SELECT count(*) FROM failures").fetchone()[0] >= 1
    assert (home / "prefect.db").exists() and list((tmp_path / "export-cli").iterdir())
    # the searches can find what is stored: the prompt texts in the warehouse, the configs in Prefect's database
    assert "prompts" in _rows_with(db, "Name a fruit.") and "model_calls" in _rows_with(db, server.base_url)
    assert "prefect-home/prefect.db" in _files_with(tmp_path, "prefsynth-synthesize")
    assert any("prefect-home" in f for f in _files_with(tmp_path, KEY_ENV))  # flow parameters: the env var's name

    assert not any(key in out for out in outputs)
    assert _rows_with(db, key) == {} and _rows_with(db, "PLANTED") == {}
    assert _files_with(tmp_path, key) == [] and _files_with(tmp_path, "PLANTED") == []


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) of sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


@pytest.mark.model
def test_the_real_local_server_listens_on_loopback_even_with_host_set(monkeypatch):
    from prefsynth.backends.local import LocalServers
    from prefsynth.schemas.config import ModelSpec

    monkeypatch.setenv("HOST", "0.0.0.0")  # llama-cpp-python's own entry point would bind to this
    with LocalServers() as servers:
        ep = servers.endpoint(ModelSpec(gguf="smollm2-135m-instruct"))
        port = int(ep.base_url.split(":")[2].split("/")[0])
        assert _listening(port) == {"0100007F"}  # 127.0.0.1 only
