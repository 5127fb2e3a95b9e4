"""Chat templates as text: what a model sees before its reply, and the reply with its end-of-turn marker.

Log-prob scoring sends plain text, so the chat template is rendered here: from a GGUF file's metadata for
local models, from `chat_template` in the config for endpoints, or a plain fallback. BOS is never
rendered (servers add it where the model wants it).

Templates render with jinja2 the way llama-cpp-python's `Jinja2ChatFormatter` (0.3.36) and Transformers do
(sandboxed, trim_blocks, lstrip_blocks, loop controls, `{% generation %}` ignored, `tojson` without ASCII
escapes), so endpoint models need no llama.cpp; only reading a GGUF file's metadata does.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from prefsynth.errors import ConfigError
from prefsynth.schemas.records import Message

PLAIN = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


class _IgnoreGeneration(jinja2.ext.Extension):
    """Pass-through for Hugging Face's `{% generation %}` tag."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise ValueError(message)


@functools.cache
def _compiled(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_IgnoreGeneration, jinja2.ext.loopcontrols])  # fmt: skip
    env.filters["tojson"] = _tojson
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # Jinja text
    eos_token: str = ""
    plain: bool = False  # the fallback: "\n\n" ends a turn, there is no end-of-turn token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return _compiled(self.source).render(
            messages=messages, eos_token=self.eos_token, bos_token="", add_generation_prompt=add_generation_prompt,
            raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f),
            functions=None, function_call=None, tools=None, tool_choice=None,
        )  # fmt: skip

    def split_turn(self, messages: list[dict[str, str]], response: str) -> tuple[str, str]:
        """(context, continuation): the text before the reply, and the reply with its end-of-turn marker."""
        context = self.render(messages, add_generation_prompt=True)
        full = self.render([*messages, {"role": "assistant", "content": response}], add_generation_prompt=False)
        if not full.startswith(context):
            raise ValueError("the chat template does not render the conversation as a prefix of the reply")
        tail = full[len(context) :]
        # The turn ends with its end-of-turn token; the newline a template may put after it is not the reply's.
        return context, tail if self.plain else tail.rstrip("\n")


PLAIN_TEMPLATE = ChatTemplate(PLAIN, plain=True)


def conversation_text(messages: Sequence[Message] | Sequence[dict[str, str]]) -> str:
    """Turns as "Role: content" lines: how judges are shown a conversation, and what a reward model without
    a chat template reads."""
    rows = (m.model_dump() if isinstance(m, Message) else m for m in messages)
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in rows)


@functools.cache
def gguf_template(path: str) -> ChatTemplate:
    """The chat template and end-of-sequence text stored in a GGUF file (plain fallback if none)."""
    from llama_cpp import Llama  # the `local` extra: only local GGUF models get here

    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        llm = Llama(path, vocab_only=True, verbose=False)
    source = llm.metadata.get("tokenizer.chat_template")
    eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", errors="replace")
    llm.close()
    return ChatTemplate(source, eos) if source else PLAIN_TEMPLATE


def configured_template(value: str | None) -> ChatTemplate:
    """`chat_template` from a config: Jinja text or a .jinja file; none gives the plain fallback."""
    if value is None:
        return PLAIN_TEMPLATE
    if value.endswith(".jinja"):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"chat_template file not found: {path}")
        value = path.read_text(encoding="utf-8")
    return ChatTemplate(value)
