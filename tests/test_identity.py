"""Scorer ids follow the texts sent to models, and a CDR score's id follows its route.

- Edit one character of a judge's template: its scorer gets a new id and a rerun over the same warehouse
  calls the judge again; with the templates unchanged a rerun makes no call at all.
- A CDR router call that fails leaves its prompt unscored (a failure), retried by the next run; once the
  router answers, the prompt is scored in the routed domain. An answer naming no domain gives the default
  domain. Either answer is cached, and later runs reuse the scores.

The endpoint is a loopback server with deterministic answers (a hash of the request): this tests ids and
the cache, not a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from pathlib import Path
from typing import Any

import duckdb
import pytest

from prefsynth.backends import hf_reward, quirks
from prefsynth.backends.client import Endpoint
from prefsynth.flows.synthesize import synthesize
from prefsynth.schemas.config import PipelineConfig, parse_config
from prefsynth.schemas.records import RunSummary
from prefsynth.tasks.scorers import build_scorer, cdr, pairwise_judge, pointwise_judge
from tests.conftest import write_jsonl
from tests.fake_server import FakeOpenAI, chat_reply

PROMPTS = ["Name a fruit.", "Name a color.", "Name a planet."]


def _digest(value: Any) -> int:
    return int(hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest(), 16)


def _logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """An echo completion: one "token" per character, each with a log-prob from the model and the character."""
    text, salt = body["prompt"], _digest(body["model"]) % 5
    values = [-((ord(ch) + salt) % 7 + 1) / 10 for ch in text[1:]]
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "text": text + "x", "finish_reason": "length",
                         "logprobs": {"tokens": [*text, "x"], "token_logprobs": [None, *values, -1.0],
                                      "top_logprobs": None, "text_offset": list(range(len(text) + 1))}}],
            "usage": {"prompt_tokens": len(text), "completion_tokens": 1, "total_tokens": len(text) + 1}}  # fmt: skip


class Models(FakeOpenAI):
    """Policy, judges, CDR models and router on one loopback server. The router answers {"domain": "code"},
    except with HTTP 500 for requests containing a text in `router_down`, and vaguely for `router_vague`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.router_down: set[str] = set()
        self.router_vague: set[str] = set()
        super().__init__(self._respond)

    def keep(self, path: str, body: dict[str, Any]) -> None:
        with self.lock:
            super().keep(path, body)

    def _respond(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if "prompt" in body:
            return 200, _logprobs(body)
        digest = _digest(body)
        kind = self.kind(body)
        if kind == "judgment":
            return chat_reply(json.dumps({"rationale": "ok", "score": digest % 10 + 1}))
        if kind == "verdict":
            return chat_reply(json.dumps({"rationale": "ok", "verdict": "AB"[digest % 2]}))
        if kind == "domain":
            request = body["messages"][-1]["content"]
            if any(text in request for text in self.router_down):
                return 500, {"error": {"message": "router down"}}
            return chat_reply("Hard to say." if any(t in request for t in self.router_vague) else '{"domain": "code"}')
        return chat_reply(f"answer {digest % 1000}")

    @staticmethod
    def kind(body: dict[str, Any]) -> str:
        """judgment, verdict, domain, logprob or generation."""
        if "prompt" in body:
            return "logprob"
        return (body.get("response_format") or {}).get("json_schema", {}).get("name") or "generation"

    def count(self) -> dict[str, int]:
        """Requests so far by kind; read before and after a run to get its requests."""
        with self.lock:
            kinds = [self.kind(b) for b in self.requests]
        return {k: kinds.count(k) for k in set(kinds)}


def _config(tmp_path: Path, url: str, scorers: list[dict[str, Any]], curate: str) -> PipelineConfig:
    return parse_config({
        "name": "identity", "prompts": {"path": str(write_jsonl(tmp_path / "p.jsonl", PROMPTS))},
        "generation": {"models": [_model(url, "policy")], "samples_per_prompt": 2, "sampling": {"seed": 1}},
        "scorers": scorers, "curation": {"scorer": curate, "min_margin": 0.0},
        "warehouse": str(tmp_path / "w.duckdb"),
    })  # fmt: skip


def _model(url: str, name: str) -> dict[str, Any]:
    return {"base_url": url, "model": name, "max_retries": 0, "max_concurrency": 4}


def _run(server: Models, config: PipelineConfig) -> tuple[RunSummary, dict[str, int]]:
    """A run, and its requests by kind."""
    before = server.count()
    summary = synthesize(config=config)
    assert summary.status == "completed"
    after = server.count()
    return summary, {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


def _q(config: PipelineConfig, sql: str) -> list[tuple]:
    with duckdb.connect(str(config.warehouse), read_only=True) as con:
        return con.execute(sql).fetchall()


def _scorer_ids(config: PipelineConfig, name: str) -> set[str]:
    return {r[0] for r in _q(config, f"SELECT DISTINCT scorer_id FROM scores WHERE scorer = '{name}'")}


def test_a_template_edit_gives_new_scorer_ids_and_new_calls_on_a_rerun(tmp_path, prefect_harness, monkeypatch):
    with Models() as server:
        judges = [{"kind": "pointwise_judge", "name": "judge", "model": _model(server.base_url, "judge")},
                  {"kind": "pairwise_judge", "name": "pair", "model": _model(server.base_url, "judge")}]  # fmt: skip
        config = _config(tmp_path, server.base_url, judges, "judge")
        _, first = _run(server, config)
        assert first == {"generation": 6, "judgment": 6, "verdict": 6}  # 3 comparisons in both orders
        judge_id, pair_id = _scorer_ids(config, "judge"), _scorer_ids(config, "pair")
        assert _run(server, config)[1] == {}  # templates unchanged: nothing is called again

        edited = pointwise_judge.TEMPLATE.replace("[Response to evaluate]", "[Response to evaluate:]")
        monkeypatch.setattr(pointwise_judge, "TEMPLATE", edited)
        _, rerun = _run(server, config)
        assert rerun == {"judgment": 6}  # the pointwise judge only, with the edited text
        assert all("[Response to evaluate:]" in b["messages"][1]["content"] for b in server.requests[-6:])
        assert len(_scorer_ids(config, "judge") - judge_id) == 1 and _scorer_ids(config, "pair") == pair_id

        monkeypatch.setattr(pairwise_judge, "SYSTEM", pairwise_judge.SYSTEM.replace("judge", "Judge"))
        assert _run(server, config)[1] == {"verdict": 6}
        assert _run(server, config)[1] == {}


def test_a_failed_router_call_is_retried_and_the_routed_score_reused(tmp_path, prefect_harness):
    with Models() as server:
        scorer = {"kind": "cdr", "name": "cdr", "strong": _model(server.base_url, "strong"),
                  "weak": _model(server.base_url, "weak"),
                  "customization": {"criteria": True, "router": _model(server.base_url, "router")}}  # fmt: skip
        config = _config(tmp_path, server.base_url, [scorer], "cdr")
        server.router_down, server.router_vague = {"Name a color."}, {"Name a planet."}
        summary, first = _run(server, config)
        # 2 routed prompts x 2 models x (2 replies + their shared context)
        assert first == {"generation": 6, "domain": 3, "logprob": 12}
        (stage,) = [s for s in summary.stages if s.stage == "score[cdr]"]
        assert (stage.new, stage.failed) == (4, 2)
        errors = _q(config, "SELECT DISTINCT error FROM failures")
        assert len(errors) == 1 and errors[0][0].startswith("router call failed: HTTP 500")

        _, again = _run(server, config)  # the router is still down: asked again, nothing else
        assert again == {"domain": 1}

        server.router_down = set()
        summary, recovered = _run(server, config)
        assert recovered == {"domain": 1, "logprob": 6}  # the color prompt's two replies, routed to "code"
        domains = _q(config, "SELECT json_extract_string(details, '$.domain'), count(*) FROM scores GROUP BY 1")
        assert sorted(domains) == [("chat", 2), ("code", 4)]  # the planet prompt: the default domain
        routes = _q(config, "SELECT domain, parsed FROM prompt_routes")
        assert sorted(routes) == [("chat", False), ("code", True), ("code", True)]

        summary, rerun = _run(server, config)
        assert rerun == {} and summary.model_calls == 0  # every score and route is reused


def _endpoint(spec: Any) -> Endpoint:
    return Endpoint(label=spec.model, identity=f"fake#{spec.model}", base_url="http://x/v1", model=spec.model,
                    api_key="", concurrency=1, timeout_s=1, max_retries=0, is_local=False)  # fmt: skip


MODEL = {"base_url": "http://x/v1", "model": "m"}
ROUTED = {"kind": "cdr", "strong": MODEL, "weak": {**MODEL, "model": "w"},
          "customization": {"criteria": True, "exemplars": 2, "router": {**MODEL, "model": "r"}}}  # fmt: skip
SINGLE = {"kind": "pointwise_judge", "model": MODEL}
ASPECTS = {**SINGLE, "aspects": "ultrafeedback"}
JSON_PAIR = {"kind": "pairwise_judge", "model": MODEL}
TAG_PAIR = {**JSON_PAIR, "style": "answer_tag"}
REWARD = {"kind": "reward_model", "model": MODEL}


def _scorer_id(spec: dict[str, Any]) -> str:
    config = parse_config({"prompts": {"builtin": "quickstart"}, "generation": {"models": [MODEL]}, "scorers": [spec]})
    return build_scorer(config.scorers[0], _endpoint).scorer_id


def _tweak(value: Any) -> Any:
    """`value` with one character more (a text) or plus one (a number); a dict with its first entry tweaked."""
    if isinstance(value, dict):
        first = next(iter(value))
        return {**value, first: _tweak(value[first])}
    return value + "." if isinstance(value, str) else value + 1


@pytest.mark.parametrize(
    ("module", "name", "spec", "changes"),
    [
        (pointwise_judge, "SYSTEM", SINGLE, True),
        (pointwise_judge, "TEMPLATE", ASPECTS, True),
        (pointwise_judge, "ASK", SINGLE, True),
        (pointwise_judge, "ASK", ASPECTS, False),  # a single-score judge's text: not sent with aspects
        (pointwise_judge, "ASK_ASPECTS", ASPECTS, True),
        (pointwise_judge, "ASPECT", ASPECTS, True),
        (pointwise_judge, "RATING", SINGLE, True),
        (pointwise_judge, "RATIONALE", SINGLE, True),
        (pointwise_judge, "REPAIR", SINGLE, True),
        (pairwise_judge, "SYSTEM", JSON_PAIR, True),
        (pairwise_judge, "TEMPLATE", TAG_PAIR, True),
        (pairwise_judge, "ASK", JSON_PAIR, True),  # its "json" entry
        (pairwise_judge, "ASK", TAG_PAIR, False),  # ... which an answer_tag judge does not send
        (pairwise_judge, "REPAIR", JSON_PAIR, True),
        (pairwise_judge, "RATIONALE", JSON_PAIR, True),
        (pairwise_judge, "RATIONALE", TAG_PAIR, False),
        (pairwise_judge, "TAG", TAG_PAIR, True),
        (cdr, "ROUTER_SYSTEM", ROUTED, True),
        (cdr, "ROUTER_TEMPLATE", ROUTED, True),
        (cdr, "ROUTER_PARAMS", ROUTED, True),
        (cdr, "EXEMPLARS", ROUTED, True),
        (cdr, "EXEMPLAR", ROUTED, True),
        (cdr, "EXEMPLAR_WHY", ROUTED, True),
        (cdr, "CRITERIA", ROUTED, True),
        (cdr, "ROUTER_TEMPLATE", {**ROUTED, "customization": {}}, False),  # vanilla CDR sends no text of its own
        (quirks, "reward_request", REWARD, True),
    ],
)
def test_every_text_a_scorer_sends_is_in_its_id(monkeypatch, module, name, spec, changes):
    before = _scorer_id(spec)
    value = getattr(module, name)
    if callable(value):  # a request builder: the same request with one more field
        monkeypatch.setattr(module, name, lambda *a, _f=value: {**_f(*a), "extra": 1})
    else:
        monkeypatch.setattr(module, name, _tweak(value))
    assert (_scorer_id(spec) != before) is changes


def test_the_in_process_reward_models_text_format_is_in_its_id(tmp_path, monkeypatch):
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("needs torch and transformers")
    (tmp_path / "config.json").write_text("{}")  # enough for an identity: nothing is loaded
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    spec = {"kind": "reward_model", "path": str(tmp_path)}
    before = _scorer_id(spec)
    monkeypatch.setattr(hf_reward, "conversation_text", lambda turns: "\n".join(t["content"] for t in turns))
    assert _scorer_id(spec) != before


def test_a_cdr_scorers_id_follows_the_chat_template_that_renders_its_texts():
    import dataclasses

    from prefsynth.backends.templates import configured_template

    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
    config = parse_config({"prompts": {"builtin": "quickstart"}, "generation": {"models": [MODEL]},
                           "scorers": [{"kind": "cdr", "strong": MODEL, "weak": {**MODEL, "model": "w"}}]})

    def scorer_id(template: str | None) -> str:
        def endpoint(spec: Any) -> Endpoint:
            return dataclasses.replace(_endpoint(spec), template=configured_template(template))

        return build_scorer(config.scorers[0], endpoint).scorer_id

    assert scorer_id(chatml) == scorer_id(chatml)
    assert len({scorer_id(None), scorer_id(chatml), scorer_id(chatml.replace("<|im_end|>", "<|end|>"))}) == 3
