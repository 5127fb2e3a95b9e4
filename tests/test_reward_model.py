"""Reward-model scorer: vLLM's /pooling and /classify over HTTP (a loopback server replaying the documented
response shapes), and an in-process transformers model built and saved by the test (no hub, no download)."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from prefsynth.backends import quirks
from prefsynth.backends.client import Endpoint
from prefsynth.errors import ConfigError
from prefsynth.schemas.records import Failure, Message, ModelCall, Score
from prefsynth.tasks.score import score_items
from prefsynth.tasks.scorers import ScoreItem
from prefsynth.tasks.scorers.reward_model import RewardModelScorer, RewardModelSpec
from prefsynth.warehouse.store import Store
from tests.fake_server import LoopbackServer, Reply

FIXTURES = Path(__file__).parent / "fixtures"
POOLING = json.loads((FIXTURES / "vllm_pooling_response.json").read_text())
CLASSIFY = json.loads((FIXTURES / "vllm_classify_response.json").read_text())
RESPONSES = ["Paris.", "The capital of France is Paris.", "I think it is Lyon, but I am not sure."]

class FakeVLLM(LoopbackServer):
    """`respond(path, body)` answers each POST; requests are kept as (path, body)."""

    def __init__(self, respond: Callable[[str, dict[str, Any]], Reply]) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        super().__init__(respond)

    def keep(self, path: str, body: dict[str, Any]) -> None:
        self.requests.append((path, body))


def expected(body: dict[str, Any]) -> float:
    """The reward the fake server gives: depends on the response text it received."""
    assert body["messages"][-1]["role"] == "assistant"
    return len(body["messages"][-1]["content"]) / 10


def pooling_reply(path: str, body: dict[str, Any], token_wise: bool = True) -> Reply:
    reply = copy.deepcopy(POOLING)
    reward = expected(body)
    reply["data"][0]["data"] = [[-7.0], [3.5], [reward]] if token_wise else [reward]
    return 200, reply


def classify_reply(path: str, body: dict[str, Any]) -> Reply:
    reply = copy.deepcopy(CLASSIFY)
    p = expected(body) / 10
    reply["data"][0]["probs"] = [1 - p, p]
    return 200, reply


def endpoint(url: str) -> Endpoint:
    return Endpoint(label="rm", identity="rm#reward", base_url=url, model="internlm2-reward", api_key="sk-secret",
                    concurrency=4, timeout_s=10, max_retries=0, is_local=False, server="vllm")  # fmt: skip


def http_scorer(url: str, **spec: Any) -> RewardModelScorer:
    model = {"base_url": url, "model": "internlm2-reward", "max_retries": 0}
    return RewardModelScorer(RewardModelSpec(model=model, **spec), {"reward": endpoint(url)})


def items(responses: list[str] = RESPONSES) -> list[ScoreItem]:
    messages = [Message(role="system", content="Be brief."), Message(role="user", content="Capital of France?")]
    return [ScoreItem(f"s{i}", f"r{i}", "p0", messages, text) for i, text in enumerate(responses)]


def values(result) -> dict[str, float]:
    return {s.response_id: s.value for s in result.of(Score)}


# ---- quirks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("http://h:8000/v1", "http://h:8000/pooling"),
        ("http://h:8000/v1/", "http://h:8000/pooling"),
        ("http://h:8000", "http://h:8000/pooling"),
        ("https://h/proxy/v1", "https://h/proxy/pooling"),
    ],
)
def test_pooling_paths_are_at_the_server_root(base_url, url):
    assert quirks.reward_url(base_url, "pooling") == url
    assert quirks.reward_url(base_url, "classify") == url.replace("pooling", "classify")


def test_rewards_are_read_from_the_documented_shapes():
    assert quirks.parse_reward("pooling", POOLING, 0) == 2.15625  # token-wise: the last token's row
    sequence = copy.deepcopy(POOLING)
    sequence["data"][0]["data"] = [0.25, -1.5]  # sequence-wise: one value per label
    assert quirks.parse_reward("pooling", sequence, 1) == -1.5
    assert quirks.parse_reward("classify", CLASSIFY, 1) == pytest.approx(0.4340292513370514)
    compact = quirks.compact_reward_response("pooling", POOLING)
    assert compact["data"][0]["data"] == [[2.15625]] and compact["prompt_tokens"] == 3
    assert quirks.parse_reward("pooling", compact, 0) == 2.15625
    with pytest.raises(ValueError, match="out of range"):
        quirks.parse_reward("classify", CLASSIFY, 2)
    base64 = copy.deepcopy(POOLING)
    base64["data"][0]["data"] = "AAAAPw=="
    with pytest.raises(ValueError, match="encoding_format float"):
        quirks.parse_reward("pooling", base64, 0)
    with pytest.raises(ValueError, match="non-empty `data` list"):
        quirks.parse_reward("pooling", {"object": "error", "message": "oops"}, 0)


# ---- over HTTP ---------------------------------------------------------------------------------------


def test_pooling_rewards_reach_the_right_responses_and_the_request_is_vllms():
    with FakeVLLM(pooling_reply) as fake:
        scorer = http_scorer(fake.base_url)
        result = asyncio.run(score_items(scorer, items()))
    assert not result.of(Failure)
    assert values(result) == {f"r{i}": len(text) / 10 for i, text in enumerate(RESPONSES)}
    assert len(fake.requests) == 3 and {path for path, _ in fake.requests} == {"/pooling"}
    path, body = next(r for r in fake.requests if r[1]["messages"][-1]["content"] == RESPONSES[1])
    assert body == {
        "model": "internlm2-reward",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": RESPONSES[1]},
        ],
        "use_activation": False,
    }
    calls = result.of(ModelCall)
    assert [c.kind for c in calls] == ["reward"] * 3 and all(c.status == "ok" for c in calls)
    assert all(s.call_ids and s.raw == "" for s in result.of(Score))
    assert {c.call_id for c in result.of(ModelCall)} == {s.call_ids[0] for s in result.of(Score)}


def test_sequence_wise_pooling_output_uses_label_index():
    def respond(path, body):
        status, reply = pooling_reply(path, body, token_wise=False)
        reply["data"][0]["data"] = [-100.0, expected(body)]
        return status, reply

    with FakeVLLM(respond) as fake:
        result = asyncio.run(score_items(http_scorer(fake.base_url, label_index=1), items()))
    assert values(result) == {f"r{i}": len(text) / 10 for i, text in enumerate(RESPONSES)}


def test_classify_rewards_are_the_probability_of_label_index():
    with FakeVLLM(classify_reply) as fake:
        scorer = http_scorer(fake.base_url, api="classify", label_index=1)
        result = asyncio.run(score_items(scorer, items()))
    assert not result.of(Failure)
    assert values(result) == pytest.approx({f"r{i}": len(text) / 100 for i, text in enumerate(RESPONSES)})
    assert {path for path, _ in fake.requests} == {"/classify"}
    assert all("use_activation" not in body and body["model"] == "internlm2-reward" for _, body in fake.requests)


def test_a_second_run_with_the_same_cache_makes_no_request(tmp_path):
    with FakeVLLM(pooling_reply) as fake, Store(tmp_path / "w.duckdb") as store:
        scorer = http_scorer(fake.base_url)
        first = asyncio.run(score_items(scorer, items(), store))
        store.write("run1", first)
        second = asyncio.run(score_items(http_scorer(fake.base_url), items(), store))
        other_label = asyncio.run(score_items(http_scorer(fake.base_url, label_index=1), items(), store))
    assert len(fake.requests) == 3
    assert second.of(ModelCall) == [] and values(second) == values(first)
    assert {s.response_id: s.call_ids for s in second.of(Score)} == {s.response_id: s.call_ids for s in first.of(Score)}
    # the cache holds the server's output, so another label_index is read from it, not re-requested
    assert other_label.of(ModelCall) == [] and not other_label.of(Score) and len(other_label.of(Failure)) == 3
    assert all("label_index 1 is out of range" in f.error for f in other_label.of(Failure))


def test_an_http_error_fails_only_its_item():
    def respond(path, body):
        if body["messages"][-1]["content"] == RESPONSES[1]:
            return 500, {"object": "error", "message": "CUDA out of memory", "type": "InternalServerError"}
        return pooling_reply(path, body)

    with FakeVLLM(respond) as fake:
        result = asyncio.run(score_items(http_scorer(fake.base_url), items()))
    assert values(result) == {"r0": len(RESPONSES[0]) / 10, "r2": len(RESPONSES[2]) / 10}
    (failure,) = result.of(Failure)
    assert failure.item_id == "s1" and failure.stage == "score"
    assert "reward call failed: HTTP 500" in failure.error and "CUDA out of memory" in failure.error
    assert sorted(c.status for c in result.of(ModelCall)) == ["error", "ok", "ok"] and len(fake.requests) == 3


def test_an_unparsable_response_is_a_failure_with_a_clear_error():
    def respond(path, body):
        if body["messages"][-1]["content"] == RESPONSES[2]:
            return 200, {"object": "list", "data": [{"index": 0, "object": "pooling", "embedding": [0.1]}]}
        return pooling_reply(path, body)

    with FakeVLLM(respond) as fake:
        result = asyncio.run(score_items(http_scorer(fake.base_url), items()))
    assert set(values(result)) == {"r0", "r1"}
    (failure,) = result.of(Failure)
    assert failure.item_id == "s2"
    assert "unreadable response" in failure.error and "`data[0].data` is not a non-empty list" in failure.error
    assert sorted(c.status for c in result.of(ModelCall)) == ["error", "ok", "ok"]  # recorded, never cached as ok


# ---- in process: the transformers extra (fail without it, unless deselected: -m "not transformers") ------

WORDS = ["User: Capital of France? System: Be brief.", "Assistant: The capital of France is Paris.",
         "I think it is Lyon, but I am not sure."]  # fmt: skip
TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }} [EOS] {% endfor %}"


def make_model(folder: Path, seed: int = 0, chat_template: str | None = None) -> Path:
    """A randomly initialised 2-layer Llama sequence classifier and a word-level tokenizer, saved to `folder`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(WORDS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, num_labels=1, pad_token_id=0,
        initializer_range=0.5,  # logits of order 1, so that comparisons at 1e-5 mean something
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


def token_ids(folder: Path, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return [tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"] for text in texts]


def direct_rewards(folder: Path, inputs: list[list[int]]) -> list[float]:
    """An independent forward pass, one input at a time, no padding."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in inputs]


def local_scorer(folder: Path, **spec: Any) -> RewardModelScorer:
    return RewardModelScorer(RewardModelSpec(path=str(folder), **spec), {})


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("rm") / "plain")


@pytest.mark.transformers
def test_in_process_rewards_equal_a_direct_forward_pass_and_do_not_depend_on_batching(plain_model):
    texts = [f"System: Be brief.\nUser: Capital of France?\nAssistant: {r}" for r in RESPONSES]
    want = direct_rewards(plain_model, token_ids(plain_model, texts, add_special_tokens=True))
    assert len({round(v, 3) for v in want}) == 3  # distinct, so a mix-up would show
    batched = local_scorer(plain_model, batch_size=2)
    assert batched.endpoints == {}
    result = asyncio.run(score_items(batched, items()))
    one_by_one = asyncio.run(score_items(local_scorer(plain_model, batch_size=1), items()))
    assert not result.of(Failure) and result.of(ModelCall) == []
    assert values(result) == pytest.approx({f"r{i}": v for i, v in enumerate(want)}, abs=1e-5)
    assert values(one_by_one) == pytest.approx(values(result), abs=1e-5)
    details = json.loads(next(s for s in result.of(Score) if s.response_id == "r1").details)
    assert details["logits"] == pytest.approx([values(result)["r1"]]) and details["truncated"] is False
    assert all(s.raw == "" and s.call_ids == [] for s in result.of(Score))


@pytest.mark.transformers
def test_in_process_uses_the_chat_template_and_truncates_from_the_left(tmp_path):
    folder = make_model(tmp_path / "chat", chat_template=TEMPLATE)
    texts = [f"<system> Be brief. [EOS] <user> Capital of France? [EOS] <assistant> {r} [EOS] " for r in RESPONSES]
    inputs = token_ids(folder, texts, add_special_tokens=False)
    want = direct_rewards(folder, inputs)
    result = asyncio.run(score_items(local_scorer(folder, batch_size=3), items()))
    assert values(result) == pytest.approx({f"r{i}": v for i, v in enumerate(want)}, abs=1e-5)
    # at 16 tokens the end of the conversation is kept: the value is that of its last 16 tokens alone
    short = asyncio.run(score_items(local_scorer(folder, max_length=16), items(RESPONSES[2:])))
    assert len(inputs[2]) > 16 and json.loads(short.of(Score)[0].details)["truncated"] is True
    assert short.of(Score)[0].value == pytest.approx(direct_rewards(folder, [inputs[2][-16:]])[0], abs=1e-5)


@pytest.mark.transformers
def test_identity_follows_the_weights_not_the_folder(plain_model, tmp_path):
    copy_folder = tmp_path / "copy"
    shutil.copytree(plain_model, copy_folder)
    original = local_scorer(plain_model)
    assert local_scorer(copy_folder).scorer_id == original.scorer_id
    assert local_scorer(plain_model, label_index=0, max_length=64).scorer_id != original.scorer_id
    make_model(copy_folder, seed=1)  # new weights, same place
    assert local_scorer(copy_folder).scorer_id != original.scorer_id
    assert "hf:sha256:" in original.config_json and str(plain_model) not in original.config_json


def test_a_missing_folder_or_extra_is_a_clear_config_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="reward model folder does not exist: .*nowhere"):
        local_scorer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        local_scorer(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    import importlib.util

    real = importlib.util.find_spec
    # both missing, whether or not this environment has the extra
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n in ("torch", "transformers") else real(n))
    with pytest.raises(ConfigError, match=r"needs torch and transformers: pip install 'prefsynth\[transformers\]'"):
        local_scorer(tmp_path / "empty")


@pytest.mark.transformers
def test_a_model_without_a_trained_head_fails_its_items(tmp_path):
    import transformers

    folder = make_model(tmp_path / "lm")
    config = transformers.AutoConfig.from_pretrained(folder)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)  # a language model, not a reward model
    result = asyncio.run(score_items(local_scorer(folder), items()))
    assert not result.of(Score) and len(result.of(Failure)) == 3
    assert all("no trained classification head" in f.error for f in result.of(Failure))
