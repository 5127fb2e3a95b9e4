"""What deployments rely on, without a Prefect server: flow signatures a run process can validate, the entry
flow's JSON parameters, clear refusals from `prefsynth deploy` and `serve`, and `failures_fatal` failing the
flow run itself (its Prefect state), not only the command's exit code."""

from __future__ import annotations

import inspect
import json

import duckdb
import pytest
import yaml
from prefect import Flow
from prefect.exceptions import ParameterTypeError
from typer.testing import CliRunner

from prefsynth import cli
from prefsynth.cli import app
from prefsynth.flows import deploy, evaluate, loop, synthesize
from prefsynth.flows.exclusive import limit_name
from tests.conftest import write_jsonl
from tests.fake_server import FakeOpenAI, chat_reply, deterministic_reply

runner = CliRunner()
FLOWS = [synthesize.synthesize, loop.synthesis_loop, evaluate.evaluate, deploy.run_config]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli.console, "_width", 1000)  # one line per message


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_flow_parameters_are_annotated_with_types_not_strings(flow: Flow) -> None:
    """A deployment's run process validates parameters against these annotations; a postponed annotation
    (`from __future__ import annotations`) is a string that does not resolve there (issue 13)."""
    params = inspect.signature(flow.fn).parameters.values()
    assert params and all(not isinstance(p.annotation, str) for p in params), [p.annotation for p in params]


def test_the_entry_flow_takes_json_parameters(tmp_path) -> None:
    config = {"prompts": {"path": "p.jsonl"}, "generation": {"models": [{"base_url": "http://h/v1", "model": "m"}]},
              "scorers": [{"kind": "pointwise_judge", "model": {"base_url": "http://h/v1", "model": "m"}}]}  # fmt: skip
    params = {"config": config, "base_dir": str(tmp_path), "db": None}
    defaults = {"runner": None, "shard": None, "shards": None}
    assert deploy.run_config.validate_parameters(json.loads(json.dumps(params))) == {**params, **defaults}
    assert deploy.run_config.validate_parameters({"config": "c.yaml", "runner": "ray"})["runner"] == "ray"
    with pytest.raises(ParameterTypeError):
        deploy.run_config.validate_parameters({"config": "c.yaml", "runner": "dask"})
    assert deploy.run_config.validate_parameters({"config": "c.yaml"})["config"] == "c.yaml"
    schema = deploy.run_config.parameters.model_dump()["properties"]["config"]
    assert {t.get("type") for t in schema["anyOf"]} == {"string", "object"}


def test_the_entry_flow_resolves_paths_as_the_command_line_does(tmp_path) -> None:
    """Inputs against the config's folder (a mapping's: base_dir), outputs against base_dir."""
    (tmp_path / "cfg").mkdir()
    write_jsonl(tmp_path / "cfg" / "p.jsonl", ["hi"])
    model = {"base_url": "http://h/v1", "model": "m"}
    raw = {"prompts": {"path": "p.jsonl"}, "generation": {"models": [model]},
           "scorers": [{"kind": "pointwise_judge", "model": model}], "export": [{"path": "out"}]}  # fmt: skip
    (tmp_path / "cfg" / "c.yaml").write_text(yaml.safe_dump(raw))
    from prefsynth.api import as_config

    base = tmp_path / "work"
    by_path = deploy.anchored(as_config(tmp_path / "cfg" / "c.yaml"), base)
    by_mapping = deploy.anchored(as_config(raw, tmp_path / "cfg"), base)
    for cfg in (by_path, by_mapping):
        assert cfg.prompts.path == str(tmp_path / "cfg" / "p.jsonl")
        assert (cfg.warehouse, cfg.export[0].path) == (str(base / "prefsynth.duckdb"), str(base / "out"))


def test_the_warehouse_limit_is_named_by_the_resolved_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert limit_name("w.duckdb") == limit_name(tmp_path / "w.duckdb") != limit_name(tmp_path / "v.duckdb")
    assert limit_name("w.duckdb").startswith("prefsynth-warehouse-")


def _quickstart(tmp_path):
    path = tmp_path / "c.yaml"
    model = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    path.write_text(yaml.safe_dump({"prompts": {"builtin": "quickstart"}, "generation": {"models": [model]},
                                    "scorers": [{"kind": "pointwise_judge", "model": model}]}))  # fmt: skip
    return path


@pytest.mark.parametrize("command", ["deploy", "serve"])
def test_deploy_and_serve_refuse_bad_input_with_a_message(tmp_path, monkeypatch, command: str) -> None:
    config = _quickstart(tmp_path)
    name = ["--name", "n"]
    cases = [
        ([str(tmp_path / "missing.yaml"), *name], "config file not found"),
        ([str(config), *name, "--cron", "61 * * * *"], "--cron '61 * * * *' is not a cron expression"),
        ([str(config), *name, "--cron", "0 3 * * *", "--interval", "60"], "give --cron or --interval, not both"),
        ([str(config), *name, "--interval", "0"], "--interval must be a positive number"),
        ([str(config), *name], "the Prefect server at http://127.0.0.1:9/api (PREFECT_API_URL) does not answer"),
    ]
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens on port 9
    for args, message in cases:
        result = runner.invoke(app, [command, *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    monkeypatch.setattr(deploy, "configured_api_url", lambda: None)
    result = runner.invoke(app, [command, str(config), *name])
    assert result.exit_code == 2 and "none is configured: start one with `prefect server start`" in result.output


def test_failures_fatal_fails_the_flow_run_and_the_command(tmp_path, prefect_harness) -> None:
    """Some judgments are unreadable: the run completes its other items, its flow run is Failed (what a
    deployment shows), and `prefsynth run` prints the summary and exits 1 with the reason."""
    from prefect import get_client

    def respond(body: dict) -> tuple[int, dict]:
        if "response_format" in body and "q3" in json.dumps(body):  # the ratings of one prompt's answers
            return chat_reply("no rating here")
        return deterministic_reply(body)

    model = {"base_url": "", "model": "m", "max_retries": 0}
    raw = {"name": "fatal", "prompts": {"path": str(write_jsonl(tmp_path / "p.jsonl", [f"q{i}" for i in range(5)]))},
           "generation": {"models": [model], "samples_per_prompt": 2}, "warehouse": str(tmp_path / "w.duckdb"),
           "scorers": [{"kind": "pointwise_judge", "model": model}], "failures_fatal": True}  # fmt: skip
    with FakeOpenAI(respond) as server:
        model["base_url"] = server.base_url
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        result = runner.invoke(app, ["run", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1, result.output
    assert "2 items failed and the config sets failures_fatal" in result.output
    assert "score[" in result.output  # the stage table is shown first
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        (flow_run_id,) = con.execute("SELECT flow_run_id FROM runs").fetchone()
        (pairs,) = con.execute("SELECT count(*) FROM run_pairs").fetchone()
    assert pairs > 0  # the other prompts made pairs: the run finished its items before failing
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.is_failed()


def test_the_entry_flow_runs_a_loop_config_as_the_loop(tmp_path, prefect_harness) -> None:
    """A mapping with relative paths: prompts and warehouse resolve against base_dir; a `loop` section runs
    the synthesis loop."""
    from tests.test_loop import _config as loop_config
    from tests.test_loop import _replying

    with _replying(check_score=9) as fake:
        raw = loop_config(fake.base_url, tmp_path, {"max_rounds": 2, "target_rate": 0.5})
        raw["prompts"]["path"], raw["warehouse"] = "p.jsonl", "loop.duckdb"
        out = deploy.run_config(config=raw, base_dir=str(tmp_path))
    assert out["rounds"] and out["rounds"][0]["pairs"] > 0, "precondition: round 1 made pairs"
    assert [r["stop_reason"] for r in out["rounds"]] == ["target_rate"]
    assert out["warehouse"] == str(tmp_path / "loop.duckdb") and (tmp_path / "loop.duckdb").is_file()
