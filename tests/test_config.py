import re
from importlib import resources
from pathlib import Path

import pytest

from prefsynth.errors import ConfigError
from prefsynth.schemas.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]

VALID = {
    "prompts": {"builtin": "quickstart"},
    "generation": {"models": [{"gguf": "smollm2-135m-instruct"}]},
    "scorers": [{"kind": "pointwise_judge", "model": {"base_url": "http://h:8000/v1", "model": "m"}}],
}


def test_every_example_is_shipped_in_the_package_as_the_same_text_and_is_valid():
    packaged = resources.files("prefsynth") / "examples"  # what the installed package holds (the demo reads it)
    shipped = {p.name: p.read_bytes() for p in packaged.iterdir() if p.name.endswith(".yaml")}
    examples = {p.name: p.read_bytes() for p in (ROOT / "examples").iterdir()  # a symlink is read as its target
                if p.is_file() and p.name != "prefect.yaml"}  # prefect.yaml: Prefect's deployment file (test_deploy)
    assert len(examples) >= 5 and sorted(examples) == sorted(shipped)
    for name, text in examples.items():
        assert text == shipped[name], f"examples/{name} differs from the packaged copy"
    for name in shipped:
        with resources.as_file(packaged / name) as path:
            load_config(path)
    config = load_config(ROOT / "examples" / "quickstart.yaml")
    assert config.generation.models[0].gguf == "smollm2-135m-instruct"
    assert config.curation_scorer_name == "judge"
    judge = load_config(ROOT / "examples" / "pairwise-judge.yaml").scorers[0]
    assert judge.kind == "pairwise_judge" and judge.balanced_position
    assert load_config(ROOT / "examples" / "cdr.yaml").scorers[0].kind == "cdr"
    assert [s.name for s in load_config(ROOT / "examples" / "cdr-sweep.yaml").scorers] == [
        "cdr-vanilla", "cdr-criteria", "cdr-criteria-exemplars"]  # fmt: skip


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "c.yaml")
    return str(info.value)


def test_missing_field_is_named():
    raw = {k: v for k, v in VALID.items() if k != "generation"}
    assert "generation: Field required" in _error(raw)


def test_unknown_field_is_named():
    raw = {**VALID, "generaton": {}}
    assert "generaton: Extra inputs are not permitted" in _error(raw)


def test_model_needs_one_kind():
    raw = {**VALID, "generation": {"models": [{"gguf": "x.gguf", "base_url": "http://h/v1", "model": "m"}]}}
    assert "generation.models.0" in _error(raw) and "not both" in _error(raw)
    raw = {**VALID, "generation": {"models": [{"base_url": "http://h/v1"}]}}
    assert "needs both `base_url` and `model`" in _error(raw)
    raw = {**VALID, "generation": {"models": [{"base_url": "h:8000", "model": "m"}]}}
    assert "must start with http" in _error(raw)


def test_bad_values_are_named():
    raw = {**VALID, "generation": {"models": [{"gguf": "a.gguf"}], "samples_per_prompt": 0}}
    assert "generation.samples_per_prompt" in _error(raw)
    raw = {**VALID, "curation": {"scorer": "nope"}}
    assert "curation.scorer 'nope' is not a scorer name" in _error(raw)
    raw = {**VALID, "prompts": {"path": "p.txt"}}
    assert "prompts" in _error(raw) and ".jsonl" in _error(raw)
    raw = {**VALID, "prompts": {"path": "p.jsonl", "builtin": "quickstart"}}
    assert "exactly one of" in _error(raw)
    raw = {**VALID, "scorers": [{"kind": "nope", "model": {"gguf": "a.gguf"}}]}
    assert "scorers.0: unknown kind 'nope': `kind` must be one of: cdr, pairwise_judge, pointwise_judge" in _error(raw)
    raw = {**VALID, "scorers": [{"model": {"gguf": "a.gguf"}}]}
    assert "scorers.0: no `kind`: `kind` must be one of" in _error(raw)


def test_api_key_env_is_a_name_and_is_read_at_use(monkeypatch):
    raw = {**VALID, "generation": {"models": [{"base_url": "http://h/v1", "model": "m", "api_key_env": "sk-123"}]}}
    assert "api_key_env" in _error(raw)
    ok = {**VALID, "generation": {"models": [{"base_url": "http://h/v1", "model": "m", "api_key_env": "MY_KEY"}]}}
    model = parse_config(ok).generation.models[0]
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(ConfigError, match="MY_KEY"):
        model.api_key()
    monkeypatch.setenv("MY_KEY", "secret")
    assert model.api_key() == "secret"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nprompts:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: YAML syntax error"):
        load_config(path)


def test_a_config_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: x\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml:2: not UTF-8 text \(byte 13: b'\\xe9'\)"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_relative_input_paths_resolve_against_the_config_folder(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "c.yaml").write_text(
        "prompts: {path: data/p.jsonl}\n"
        "generation: {models: [{gguf: models/m.gguf}, {gguf: smollm2-135m-instruct, name: s}]}\n"
        "scorers: [{kind: pointwise_judge, model: {gguf: smollm2-135m-instruct}}]\n"
        "warehouse: out.duckdb\n"
    )
    config = load_config(folder / "c.yaml")
    assert config.prompts.path == str(folder / "data" / "p.jsonl")
    assert config.generation.models[0].gguf == str(folder / "models" / "m.gguf")
    assert config.generation.models[1].gguf == "smollm2-135m-instruct"
    assert config.warehouse == "out.duckdb"  # outputs stay relative to the current directory


def test_duplicate_policy_labels_are_refused():
    raw = {**VALID, "generation": {"models": [{"gguf": "smollm2-135m-instruct"}, {"gguf": "smollm2-135m-instruct"}]}}
    assert "distinct names" in _error(raw)


def test_judge_panel_and_reward_model_settings_are_checked(tmp_path):
    def parse(**overrides):
        raw = {"prompts": {"builtin": "quickstart"},
               "generation": {"models": [{"gguf": "smollm2-135m-instruct"}], "samples_per_prompt": 2},
               "scorers": [{"kind": "pairwise_judge", "name": "pw", "model": {"gguf": "smollm2-135m-instruct"}},
                           {"kind": "pointwise_judge", "name": "j", "model": {"gguf": "smollm2-135m-instruct"}}]}
        raw.update(overrides)  # fmt: skip
        return parse_config(raw)

    assert parse(panel={}).panel_members == ["pw", "j"]
    cases = [
        ({"panel": {"scorers": ["pw", "nope"]}}, "panel.scorers ['nope'] are not scorer names"),
        ({"panel": {"name": "pw"}}, "also a scorer name"),
        ({"curation": {"require_agreement": ["x"]}}, "require_agreement ['x'] are not scorer names"),
        ({"curation": {"scorer": "panel"}}, "curation.scorer 'panel' is not a scorer name"),
        ({"generation": {"models": [{"gguf": "smollm2-135m-instruct"}], "samples_per_prompt": 1}},
         "at least 2 per prompt"),
        ({"scorers": [{"kind": "pairwise_judge", "model": {"gguf": "x.gguf"}, "samples_per_order": 3}]},
         "needs `temperature` > 0"),
        ({"scorers": [{"kind": "pointwise_judge", "model": {"gguf": "x.gguf"}, "aspects": [
            {"name": "score", "description": "d"}]}]}, "not `rationale` or `score`"),
        ({"scorers": [{"kind": "reward_model"}]}, "exactly one of `model`"),
        ({"scorers": [{"kind": "reward_model", "model": {"gguf": "x.gguf"}}]}, "GGUF files are not reward models"),
        ({"scorers": [{"kind": "judge"}]}, "unknown kind 'judge': `kind` must be one of: cdr, pairwise_judge"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse(**overrides)
    assert parse(curation={"scorer": "panel", "require_agreement": ["pw"]}, panel={}).curation_scorer_name == "panel"


def test_rate_limits_are_checked_and_reach_the_endpoint():
    from prefsynth.backends.local import LocalServers

    model = {"base_url": "http://h:8000/v1", "model": "m", "requests_per_minute": 0}
    raw = {**VALID, "scorers": [{"kind": "pointwise_judge", "model": model}]}
    assert "scorers.0.model.requests_per_minute" in _error(raw)
    model |= {"requests_per_minute": 500, "tokens_per_minute": 90_000, "global_limit": True}
    config = parse_config({**VALID, "scorers": [{"kind": "pointwise_judge", "model": model}]})
    ep = LocalServers().endpoint(config.scorers[0].model)
    assert (ep.requests_per_minute, ep.tokens_per_minute, ep.global_limit) == (500, 90_000, True)
