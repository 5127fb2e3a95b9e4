"""Prompts in: files, Hugging Face datasets on disk, warehouse tables, the built-in set or prompts given in
memory to `prefsynth.run` -> chat messages.

Every record becomes a list of {role, content} messages (whitespace trimmed, line endings and Unicode
normalized); its id is the hash of those messages, and exact duplicates are dropped (first one kept).
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import json
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from prefsynth.errors import InputError, not_utf8
from prefsynth.schemas.config import PromptSource
from prefsynth.schemas.records import Message, Prompt
from prefsynth.warehouse.ids import prompt_id

ROLES = ("system", "user", "assistant")
_given: contextvars.ContextVar[Any] = contextvars.ContextVar("prefsynth_prompts", default=None)


@contextlib.contextmanager
def giving(prompts: Any) -> Iterator[None]:
    """Runs started inside read `prompts` for a source `in_memory` (see `in_memory_records`)."""
    token = _given.set(prompts)
    try:
        yield
    finally:
        _given.reset(token)


def in_memory_records(prompts: Any) -> Iterator[dict[str, Any]]:
    """Prompts given in memory as records: a polars or pandas DataFrame, a `datasets.Dataset`, or an iterable
    of texts, message lists or mappings (str -> {"prompt": text}, list -> {"messages": list})."""
    if hasattr(prompts, "iter_rows"):  # polars
        yield from prompts.iter_rows(named=True)
        return
    if hasattr(prompts, "to_dict") and hasattr(prompts, "columns"):  # pandas
        yield from prompts.to_dict("records")
        return
    if isinstance(prompts, str | bytes | Mapping) or not isinstance(prompts, Iterable):
        raise InputError(f"prompts must be a list, a DataFrame or a Dataset, got {type(prompts).__name__}")
    for item in prompts:
        if isinstance(item, str):
            yield {"prompt": item}
        elif isinstance(item, list):
            yield {"messages": item}
        else:
            yield item


@dataclass
class Ingested:
    prompts: list[Prompt]
    read: int  # records read from the source
    duplicates: int  # exact duplicates dropped


def _clean(text: str) -> str:
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n")).strip()


def to_messages(record: dict[str, Any], source: PromptSource, system_prompt: str | None) -> list[Message]:
    """One record -> chat messages; raises ValueError saying what is wrong with it."""
    raw = record.get(source.messages_field)
    if raw is not None and not isinstance(raw, str):
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{source.messages_field!r} must be a non-empty list of {{role, content}}")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{source.messages_field}[{i}] needs a role in {ROLES} and a string content")
            messages.append(Message(role=m["role"], content=_clean(m["content"])))
        if messages[-1].role != "user":
            raise ValueError(f"the last message of {source.messages_field!r} must be a user turn")
    else:
        text = record.get(source.prompt_field)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"record has no non-empty {source.prompt_field!r} text (nor a {source.messages_field!r} list)"
            )
        messages = [Message(role="user", content=_clean(text))]
    system = record.get(source.system_field) if source.system_field else None
    system = system if isinstance(system, str) and system.strip() else system_prompt
    if system and messages[0].role != "system":
        messages.insert(0, Message(role="system", content=_clean(system)))
    if any(not m.content for m in messages if m.role == "user"):
        raise ValueError("a user message is empty")
    return messages


def _records(source: PromptSource, table_rows: list[dict[str, Any]] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, record) with `where` naming the line or row for error messages."""
    if source.builtin:
        path = resources.files("prefsynth").joinpath("data", f"{source.builtin}_prompts.jsonl")
        yield from _jsonl(Path(str(path)))
    elif source.path:
        path = Path(source.path)
        if not path.is_file():
            raise InputError(f"prompt file not found: {path}")
        try:
            yield from _file(path)
        except UnicodeDecodeError:
            raise InputError(not_utf8(path, path.read_bytes())) from None
    elif source.hf_dataset:
        import datasets

        try:
            ds = datasets.load_from_disk(source.hf_dataset)
        except FileNotFoundError as err:
            raise InputError(f"cannot load Hugging Face dataset from {source.hf_dataset}: {err}") from None
        if isinstance(ds, datasets.DatasetDict):
            split = source.split or ("train" if "train" in ds else next(iter(ds)) if len(ds) == 1 else None)
            if split not in ds:
                raise InputError(f"{source.hf_dataset}: choose `split` among {sorted(ds)}")
            ds = ds[split]
        for i, rec in enumerate(ds):
            yield f"{source.hf_dataset}[row {i}]", rec
    elif source.in_memory:
        given = _given.get()
        if given is None:
            raise InputError("prompts.in_memory: pass the prompts in memory, as prefsynth.run(config, prompts=...)")
        for i, rec in enumerate(in_memory_records(given)):
            yield f"{source.origin}[{i}]", rec
    else:
        for i, rec in enumerate(table_rows or []):
            yield f"{source.warehouse_table}[row {i}]", rec


def _file(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Records of a .jsonl, .json, .csv or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of records")
        for i, rec in enumerate(data):
            yield f"{path}[{i}]", rec
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for rec in reader:
                yield f"{path}:{reader.line_num}", rec
    else:
        import polars as pl

        for i, rec in enumerate(pl.read_parquet(path).iter_rows(named=True)):
            yield f"{path}[row {i}]", rec


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None


def read_prompts(
    source: PromptSource, system_prompt: str | None = None, table_rows: list[dict[str, Any]] | None = None
) -> Iterator[Prompt]:
    """Read and normalize prompts one by one (duplicates included, up to `source.limit` distinct ones);
    raise InputError naming the file and line at fault."""
    origin = source.origin
    seen: set[str] = set()  # only with a limit, which bounds it
    for where, record in _records(source, table_rows):
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected an object, got {type(record).__name__}")
        try:
            messages = to_messages(record, source, system_prompt)
        except ValueError as err:
            raise InputError(f"{where}: {err}") from None
        pid = prompt_id([m.model_dump() for m in messages])
        if source.limit is not None:
            if pid not in seen and len(seen) == source.limit:
                return
            seen.add(pid)
        ref = where.removeprefix(str(origin)).lstrip(":") or where
        yield Prompt(prompt_id=pid, messages=messages, source=str(origin), source_ref=ref)


def no_prompts(source: PromptSource) -> InputError:
    return InputError(f"{source.origin}: no prompts found (the source is empty)")


def load_prompts(
    source: PromptSource, system_prompt: str | None = None, table_rows: list[dict[str, Any]] | None = None
) -> Ingested:
    """All prompts in memory, exact duplicates dropped (the first kept): for small sets. Runs stream instead
    (`read_prompts` into `Store.ingest_prompts`)."""
    prompts: dict[str, Prompt] = {}
    read = 0
    for prompt in read_prompts(source, system_prompt, table_rows):
        read += 1
        prompts.setdefault(prompt.prompt_id, prompt)
    if not prompts:
        raise no_prompts(source)
    return Ingested(prompts=list(prompts.values()), read=read, duplicates=read - len(prompts))
