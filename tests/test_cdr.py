"""CDR scoring: exact log-probs through the real servers, the customization, the cache, eval and score-text."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from prefsynth.backends.client import ModelClient
from prefsynth.backends.local import LocalServers, resolve_gguf
from prefsynth.cli import app
from prefsynth.schemas.config import ModelSpec
from prefsynth.schemas.records import Failure, LogprobRow, Message, ModelCall, Route, Score
from prefsynth.tasks.score import score_items
from prefsynth.tasks.scorers import ScoreItem, build_scorer
from prefsynth.tasks.scorers.cdr import CDRScorer, CDRSpec
from prefsynth.warehouse.ids import prompt_id
from prefsynth.warehouse.store import Store

pytestmark = pytest.mark.model
SMOL = ModelSpec(gguf="smollm2-135m-instruct")
GEMMA = ModelSpec(gguf="gemma3-270m-base")
CASES = [
    ("What is 2+2?", "4"),
    ("Name a color.", "   Blue, like the sky."),  # starts with whitespace
    ("Traduis « merci » en allemand.", "« Danke » — ça veut dire merci. Ünïcödé ✓"),  # non-ASCII
    ("Write a haiku about rain.", "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"),
]


def _item(prompt: str, response: str, i: int = 0) -> ScoreItem:
    messages = [Message(role="user", content=prompt)]
    return ScoreItem(f"s{i}", f"r{i}", prompt_id([m.model_dump() for m in messages]), messages, response)


def reference_logprob(model: str, context: str, continuation: str) -> tuple[float, int]:
    """Independent in-process computation: evaluate context+continuation once with llama_cpp and sum the
    log-softmax of the reply's tokens: those after the first len(tokenize(context)) tokens."""
    from llama_cpp import Llama

    llm = Llama(str(resolve_gguf(model)[0]), n_ctx=1024, logits_all=True, verbose=False)
    add_bos = llm._model.add_bos_token()
    full = llm.tokenize((context + continuation).encode(), add_bos=add_bos, special=True)
    n_ctx = len(llm.tokenize(context.encode(), add_bos=add_bos, special=True))
    llm.eval(full)
    total = 0.0
    for pos in range(n_ctx, len(full)):
        row = np.asarray(llm.scores[pos - 1], dtype=np.float64)
        total += row[full[pos]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
    llm.close()
    return total, len(full) - n_ctx


@pytest.fixture(scope="module")
def servers():
    with LocalServers() as s:
        yield s


def _score(scorer, items, cache=None):
    return asyncio.run(score_items(scorer, items, cache))


@pytest.mark.parametrize("template", ["strong", "own"])
def test_cdr_matches_an_independent_in_process_computation(servers, template):
    scorer = build_scorer(CDRSpec(strong=SMOL, weak=GEMMA, template=template), servers.endpoint)
    items = [_item(p, r, i) for i, (p, r) in enumerate(CASES)]
    result = _score(scorer, items)
    assert not result.of(Failure)
    by_id = {s.response_id: json.loads(s.details) for s in result.of(Score)}
    for item in items:
        got, texts = by_id[item.response_id], scorer.texts(item)
        s_ref, s_n = reference_logprob("smollm2-135m-instruct", texts["strong_context"], texts["strong_continuation"])
        w_ref, w_n = reference_logprob("gemma3-270m-base", texts["weak_context"], texts["weak_continuation"])
        assert got["strong_tokens"] == s_n and got["weak_tokens"] == w_n
        assert got["strong_logprob"] == pytest.approx(s_ref, abs=1e-3)
        assert got["weak_logprob"] == pytest.approx(w_ref, abs=1e-3)
        assert got["cdr_sum"] == pytest.approx(s_ref - w_ref, abs=1e-3)
        assert got["cdr_mean"] == pytest.approx(s_ref / s_n - w_ref / w_n, abs=1e-3)
    texts = scorer.texts(items[1])
    assert texts["strong_continuation"] == "   Blue, like the sky.<|im_end|>"  # end-of-turn included
    if template == "own":  # Gemma base ships no chat template: the plain fallback
        assert texts["weak_context"].endswith("Assistant: ") and texts["weak_continuation"].endswith("\n\n")
    else:
        assert texts["weak_context"] == texts["strong_context"]


def test_echo_provider_handles_llama_cpp_quirks_exactly(servers):
    """llama-cpp-python's own echo path: null first entry, one generated token appended, BOS-id tokens
    dropped. Slow (it sorts the vocabulary per token), so one short text."""
    ep = servers.endpoint(ModelSpec(gguf="smollm2-135m-instruct", logprobs="echo"))
    assert ep.logprobs == "echo"
    context, continuation = ep.template.split_turn([{"role": "user", "content": "Hi!"}], " Hello there.")

    async def go():
        async with ModelClient(ep) as client:
            return await client.text_logprob(context + continuation), await client.text_logprob(context)

    full, ctx = asyncio.run(go())
    ref, n = reference_logprob("smollm2-135m-instruct", context, continuation)
    reply = full.values[len(ctx.values) :]
    assert len(reply) == n and sum(reply) == pytest.approx(ref, abs=1e-3)


def test_cache_rerun_and_a_new_weak_model_only_costs_its_own_passes(servers, tmp_path):
    items = [_item(p, r, i) for i, (p, r) in enumerate(CASES[:2])]
    with Store(tmp_path / "w.duckdb") as store:
        first = _score(build_scorer(CDRSpec(strong=SMOL, weak=GEMMA), servers.endpoint), items, store)
        store.write("run1", first)
        assert len(first.of(LogprobRow)) == 4 and {c.kind for c in first.of(ModelCall)} == {"logprob"}
        again = _score(build_scorer(CDRSpec(strong=SMOL, weak=GEMMA), servers.endpoint), items, store)
        assert again.of(ModelCall) == [] and again.of(LogprobRow) == []
        assert {s.response_id: s.value for s in again.of(Score)} == {s.response_id: s.value for s in first.of(Score)}
        # a "new" weak model: the same file named by path has another identity (its SHA-256)
        new_weak = ModelSpec(gguf=str(resolve_gguf("smollm2-135m-instruct")[0]))
        third = _score(build_scorer(CDRSpec(strong=SMOL, weak=new_weak), servers.endpoint), items, store)
        weak_identity = servers.endpoint(new_weak).identity
        assert third.of(ModelCall) and {c.model for c in third.of(ModelCall)} == {weak_identity}
        assert len(third.of(LogprobRow)) == 2


def test_customization_criteria_exemplars_and_router(servers):
    custom = {"criteria": True, "exemplars": 2, "router": SMOL.model_dump(), "seed": 3}
    spec = CDRSpec(strong=SMOL, weak=GEMMA, customization=custom)
    scorer: CDRScorer = build_scorer(spec, servers.endpoint)  # type: ignore[assignment]
    items = [_item("Solve: 12 * 11 = ?", "132"), _item("How do I reverse a list in Python?", "xs[::-1]", 1)]
    result = _score(scorer, items)
    assert not result.of(Failure) and len(result.of(Route)) == 2
    for route in result.of(Route):
        assert route.domain in scorer.custom.domains  # parsed, or the default when unparsable
    texts = scorer.texts(items[0])
    domain = scorer.domain_of(items[0].prompt_id)
    assert scorer.custom.domains[domain]["system"].split(".")[0] in texts["strong_context"]
    assert texts["strong_context"].count("Good answer:") == 2 and "Now the actual request:\nSolve" in texts[
        "strong_context"]
    # exemplars are chosen per prompt, deterministically under the seed
    twin = build_scorer(spec, servers.endpoint)
    other = build_scorer(spec.model_copy(update={"customization": spec.customization.model_copy(
        update={"seed": 4})}), servers.endpoint)  # fmt: skip
    many = [_item(f"Question number {i}?", "Answer.", i) for i in range(10)]
    assert [twin.customized(i) for i in many] == [scorer.customized(i) for i in many]
    assert [other.customized(i) for i in many] != [scorer.customized(i) for i in many]
    assert other.scorer_id != scorer.scorer_id
    vanilla = build_scorer(CDRSpec(strong=SMOL, weak=GEMMA), servers.endpoint)
    assert vanilla.scorer_id != scorer.scorer_id
    assert "Good answer" not in vanilla.texts(items[0])["strong_context"]


def test_score_text_cli_prints_the_exact_strings():
    result = CliRunner().invoke(app, ["score-text", "--scorer", "cdr", "--prompt", "Hi", "--response", " Hey!",
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for key in ("strong_logprob", "weak_logprob", "strong_tokens", "weak_tokens", "cdr_sum", "cdr_mean",
                "strong_context", "weak_context", "continuation"):  # fmt: skip
        assert key in out
    assert out["continuation"] == " Hey!<|im_end|>" and out["strong_context"].endswith("<|im_start|>assistant\n")
    assert out["cdr_sum"] == pytest.approx(out["strong_logprob"] - out["weak_logprob"])
