"""Parsing of recorded log-prob responses and chat-template splitting (no model needed)."""

import pytest
from jinja2.exceptions import SecurityError

from prefsynth.backends.client import Endpoint
from prefsynth.backends.quirks import json_response_format, logprob_request, parse_logprobs
from prefsynth.backends.templates import PLAIN_TEMPLATE, ChatTemplate
from prefsynth.tasks.scorers.cdr import cdr_values, parse_domain


def _ep(method: str, server: str = "llama-cpp") -> Endpoint:
    return Endpoint(label="m", identity="m", base_url="http://x/v1", model="m", api_key="k", concurrency=1,
                    timeout_s=1, max_retries=0, is_local=False, server=server, logprobs=method)  # fmt: skip


# llama-cpp-python 0.3.36 echo response (recorded; top_logprobs trimmed): the first entry is null and the
# last one is the token it had to generate (max_tokens=1).
ECHO = {
    "choices": [{"text": "Hi there!", "index": 0, "finish_reason": "length", "logprobs": {
        "tokens": ["Hi", " there", "!"], "text_offset": [0, 2, 8], "token_logprobs": [None, -1.5, -0.25],
        "top_logprobs": [None, {" there": -1.5}, {"!": -0.25}]}}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
}  # fmt: skip
# vLLM /v1/completions with "prompt_logprobs": 0 (shape from vllm.logprobs.PromptLogprobs).
VLLM = {
    "choices": [{"text": "x", "index": 0, "logprobs": None, "finish_reason": "length", "prompt_logprobs": [
        None, {"22557": {"logprob": -2.0, "rank": 3, "decoded_token": " there"}},
        {"0": {"logprob": -0.5, "rank": 1, "decoded_token": "!"}}]}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}  # fmt: skip


def test_echo_drops_the_null_first_entry_and_the_generated_token():
    assert parse_logprobs(_ep("echo"), ECHO) == [None, -1.5]
    stopped = {**ECHO, "usage": {"prompt_tokens": 3, "completion_tokens": 0}}  # EOS sampled: nothing appended
    assert parse_logprobs(_ep("echo"), stopped) == [None, -1.5, -0.25]
    assert logprob_request(_ep("echo"), "t") == {"prompt": "t", "max_tokens": 1, "temperature": 0.0, "echo": True,
                                                 "logprobs": 1}  # fmt: skip


def test_prompt_logprobs_give_every_token_but_the_first():
    assert parse_logprobs(_ep("prompt_logprobs", "vllm"), VLLM) == [None, -2.0, -0.5]
    assert logprob_request(_ep("prompt_logprobs"), "t")["prompt_logprobs"] == 0
    two = {"choices": [{"prompt_logprobs": [None, {"1": {"logprob": -1.0}, "2": {"logprob": -2.0}}]}]}
    with pytest.raises(ValueError, match="exactly one log-prob"):
        parse_logprobs(_ep("prompt_logprobs"), two)


@pytest.mark.parametrize("payload", [{}, {"choices": []}, {"choices": [{"text": "x"}]}])
def test_unreadable_responses_raise(payload):
    for method in ("echo", "prompt_logprobs"):
        with pytest.raises(ValueError):
            parse_logprobs(_ep(method), payload)


def test_structured_output_format_per_server():
    schema = {"type": "object"}
    assert json_response_format(_ep("echo", "llama-cpp"), "j", schema) == {"type": "json_object", "schema": schema}
    assert json_response_format(_ep("echo", "vllm"), "j", schema)["json_schema"]["schema"] == schema


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


def test_split_turn_keeps_the_end_of_turn_token_and_the_reply_verbatim():
    t = ChatTemplate(CHATML, "<|im_end|>")
    ctx, cont = t.split_turn([{"role": "user", "content": "Hi"}], "  Hey\n")
    assert ctx == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert cont == "  Hey\n<|im_end|>"
    ctx, cont = PLAIN_TEMPLATE.split_turn([{"role": "user", "content": "Hi"}], "Hey")
    assert (ctx, cont) == ("User: Hi\n\nAssistant: ", "Hey\n\n")


def test_templates_that_do_not_render_a_prefix_are_refused():
    odd = ChatTemplate("{% if add_generation_prompt %}A:{% else %}B:{% endif %}{{ messages[-1]['content'] }}")
    with pytest.raises(ValueError, match="prefix"):
        odd.split_turn([{"role": "user", "content": "Hi"}], "Hey")


def test_cdr_values_and_domain_parsing():
    v = cdr_values(-10.0, 5, -20.0, 8)
    assert v["cdr_sum"] == 10.0 and v["cdr_mean"] == pytest.approx(-2.0 + 2.5)
    names = ["chat", "reasoning", "safety", "code"]
    assert parse_domain('{"domain": "code"}', names) == "code"
    assert parse_domain("I think this is Reasoning, not chat", names) == "reasoning"
    assert parse_domain('{"domain": "cooking"}', names) is None
    assert parse_domain("", names) is None


# What templates in the wild use: whitespace control, loop controls, tojson (non-ASCII kept), the generation
# tag, raise_exception, strftime_now, eos_token, namespaces.
FEATURES = """{% set ns = namespace(system=none) %}
{% for m in messages %}
  {% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif %}
  {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role: ' + m['role']) }}{% endif %}
  <{{ m['role'] }}>{% if m['role'] == 'assistant' %}
    {% generation %}{{ m['content'] | trim }}{% endgeneration %}{{ eos_token }}
  {%- else %}{{ m | tojson }}|{{ m | tojson(indent=1, sort_keys=true) }}{% endif %}
  {% if loop.index > 5 %}{% break %}{% endif %}
{% endfor %}
[{{ ns.system }}][{{ strftime_now('%Y-%m-%d') }}]{% if add_generation_prompt %}<assistant>{% endif %}"""
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ça va? \"quoted\" 日本"},
            {"role": "assistant", "content": " Oui.  "}, {"role": "user", "content": "Et toi?"}]  # fmt: skip


@pytest.mark.parametrize("source", [CHATML, PLAIN_TEMPLATE.source, FEATURES], ids=["chatml", "plain", "features"])
def test_templates_render_exactly_as_llama_cpp_python_renders_them(source):
    """jinja2 directly (no llama.cpp needed) against llama-cpp-python's own formatter, the reference."""
    reference = pytest.importorskip("llama_cpp.llama_chat_format").Jinja2ChatFormatter
    for add in (True, False):
        expected = reference(source, "</s>", "", add_generation_prompt=add)(messages=MESSAGES).prompt
        assert ChatTemplate(source, "</s>").render(MESSAGES, add_generation_prompt=add) == expected
    assert "Ça va? \\\"quoted\\\" 日本" in ChatTemplate(FEATURES).render(MESSAGES, True)  # the precondition of tojson


def test_template_errors_and_the_sandbox_are_those_of_llama_cpp_python():
    reference = pytest.importorskip("llama_cpp.llama_chat_format").Jinja2ChatFormatter
    bad = [*MESSAGES, {"role": "tool", "content": "x"}]
    for render in (lambda s: reference(s, "", "")(messages=bad).prompt, lambda s: ChatTemplate(s).render(bad, True)):
        with pytest.raises(ValueError, match="bad role: tool"):
            render(FEATURES)
        with pytest.raises(SecurityError):
            render("{% set _ = messages.append(1) %}")
