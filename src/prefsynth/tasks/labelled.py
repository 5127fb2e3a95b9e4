"""Human-labelled preference pairs for `prefsynth eval`: LLMBar, Anthropic HH-RLHF and RewardBench files.

Each pair is a prompt (chat messages ending in a user turn) with the response humans labelled better and the
one they labelled worse; `accuracy_report` then says how often a scorer agrees with those labels.

Public test sets are not clean, so reading screens the pairs (the same rules for every format):
- a pair read twice (same prompt, same better and same worse reply, whatever the order shown or the file or
  subset it came from) is evaluated once and counted once in accuracy, under its first occurrence; the
  later copies are counted as `duplicates`. Counting a copy again would only give that pair more weight.
  The same two replies with opposite labels are two different pairs, both evaluated.
- a pair whose two replies are the same text (ignoring leading and trailing whitespace) is skipped and
  counted as `identical`: there is no preference to measure, and any scorer would tie on it.
- a pair with one empty reply is evaluated: "nothing" against a real reply is a legitimate preference (HH-RLHF
  harmless labels prefer an empty reply to a harmful one). It is scored like any reply (CDR counts its
  end-of-turn token); a scorer that cannot score it records a failure. Two empty replies are identical.
- an HH-RLHF row whose dialogue before the final reply differs between `chosen` and `rejected`, or does not
  parse as alternating turns ending with the user's, is skipped and counted as `unusable`.
`--limit N` counts the pairs kept; `LabelledData.counts()` is what `prefsynth eval` reports.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefsynth.errors import ConfigError, InputError, PrefsynthError
from prefsynth.schemas.records import Comparison, Message
from prefsynth.warehouse.ids import content_id

if TYPE_CHECKING:
    from prefsynth.tasks.scorers import Scorer

FORMATS = ("llmbar", "hh-rlhf", "rewardbench")

_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class LabelledPair:
    pair_key: str  # content_id("labelled", prompt messages as dicts, better, worse)
    prompt: list[Message]  # chat messages ending in a user turn
    better: str  # the labelled-better response text
    worse: str
    subset: str
    source_ref: str  # "file:line" or "file[index]"
    better_first: bool  # shown first to a pairwise judge: the file's order (LLMBar), else by the key's parity


def _pair(
    prompt: list[Message], better: str, worse: str, subset: str, source_ref: str, better_first: bool | None = None
) -> LabelledPair:
    key = content_id("labelled", [m.model_dump() for m in prompt], better, worse)
    first = int(key, 16) % 2 == 0 if better_first is None else better_first
    return LabelledPair(pair_key=key, prompt=prompt, better=better, worse=worse, subset=subset, source_ref=source_ref,
                        better_first=first)  # fmt: skip


def _jsonl(path: Path) -> Iterator[tuple[str, str, Any]]:
    """Yield (where, ref, record) for each non-blank line of a JSONL file, gzip-compressed when it ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
                yield f"{path}:{lineno}", f"{path.name}:{lineno}", record
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read: {err}") from None


def _json_list(path: Path) -> Iterator[tuple[str, str, Any]]:
    """Yield (where, ref, record) for each element of a file holding one JSON list."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read: {err}") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path}[{i}]", f"{path.name}[{i}]", record


def _parquet(path: Path) -> Iterator[tuple[str, str, Any]]:
    """Yield (where, ref, record) for each row of a parquet file."""
    import polars as pl

    try:
        frame = pl.read_parquet(path)
    except Exception as err:  # polars raises its own error types for unreadable files
        raise InputError(f"{path}: cannot read parquet: {err}") from None
    for i, record in enumerate(frame.iter_rows(named=True)):
        yield f"{path}[{i}]", f"{path.name}[{i}]", record


def _fields(where: str, record: Any, types: dict[str, type]) -> dict[str, Any]:
    """The named fields of `record`, each checked to be present with the given type."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object, got {type(record).__name__}")
    for name, kind in types.items():
        if name not in record or record[name] is None:
            raise InputError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            raise InputError(f"{where}: field {name!r} must be {kind.__name__}, got {type(record[name]).__name__}")
    return record


def _user_prompt(where: str, text: str) -> list[Message]:
    """A one-turn prompt; an empty one is an error."""
    if not text.strip():
        raise InputError(f"{where}: the prompt is empty")
    return [Message(role="user", content=text)]


def _llmbar(path: Path) -> Iterator[LabelledPair | None]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no *.json files in this directory")
    for file in files:
        for where, ref, record in _json_list(file):
            rec = _fields(where, record, {"input": str, "output_1": str, "output_2": str, "label": int})
            if rec["label"] not in (1, 2):
                raise InputError(f"{where}: 'label' must be 1 or 2, got {rec['label']!r}")
            better, worse = ("output_1", "output_2") if rec["label"] == 1 else ("output_2", "output_1")
            yield _pair(_user_prompt(where, rec["input"]), rec[better], rec[worse], file.stem, ref, rec["label"] == 1)


def _dialogue(prefix: str) -> list[Message] | None:
    """HH-RLHF text before the final reply -> alternating user/assistant messages; None if it does not parse."""
    parts = _TURN.split(prefix)
    speakers, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    expected = ["Human" if i % 2 == 0 else "Assistant" for i in range(len(speakers))]
    if parts[0].strip() or speakers != expected or speakers[-1:] != ["Human"] or not all(texts):
        return None
    return [Message(role=_ROLES[s], content=t) for s, t in zip(speakers, texts, strict=True)]


def _hh_rlhf(path: Path) -> Iterator[LabelledPair | None]:
    for where, ref, record in _jsonl(path):
        rec = _fields(where, record, {"chosen": str, "rejected": str})
        prefix, sep, better = rec["chosen"].rpartition(_ASSISTANT)
        prefix_r, _, worse = rec["rejected"].rpartition(_ASSISTANT)
        prompt = _dialogue(prefix) if sep and prefix == prefix_r else None
        yield _pair(prompt, better.strip(), worse.strip(), "hh-rlhf", ref) if prompt else None


def _rewardbench(path: Path) -> Iterator[LabelledPair | None]:
    if path.name.endswith(".json"):
        records = _json_list(path)
    elif path.name.endswith(".parquet"):
        records = _parquet(path)
    else:
        records = _jsonl(path)
    for where, ref, record in records:
        rec = _fields(where, record, {"prompt": str, "chosen": str, "rejected": str})
        subset = rec.get("subset")
        if subset is not None and not isinstance(subset, str):
            raise InputError(f"{where}: field 'subset' must be str, got {type(subset).__name__}")
        yield _pair(_user_prompt(where, rec["prompt"]), rec["chosen"], rec["rejected"], subset or "default", ref)


_READERS = {"llmbar": _llmbar, "hh-rlhf": _hh_rlhf, "rewardbench": _rewardbench}


@dataclass(frozen=True)
class LabelledData:
    """The pairs to evaluate (distinct keys, in file order) and what reading left out, by reason."""

    pairs: list[LabelledPair]
    duplicates: int = 0  # later copies of a kept pair: evaluated once
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # "identical", "unusable"

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def counts(self) -> dict[str, Any]:
        """What a report says about the data: pairs kept, duplicates, skipped (total and by reason)."""
        return {"pairs": len(self.pairs), "duplicates": self.duplicates, "skipped": self.skipped,
                "skipped_by_reason": dict(sorted(self.skipped_by_reason.items()))}  # fmt: skip


def _screen(pair: LabelledPair, seen: dict[str, LabelledPair]) -> str | None:
    """Why this pair is not kept ("identical", "duplicate"), or None to keep it."""
    if pair.better.strip() == pair.worse.strip():
        return "identical"
    return "duplicate" if pair.pair_key in seen else None


def load_labelled_report(path: str | Path, fmt: str, limit: int | None = None) -> LabelledData:
    """Read labelled pairs, screened as the module says; with `limit`, reading stops after `limit` kept pairs."""
    if fmt not in _READERS:
        raise InputError(f"unknown labelled-data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")
    path = Path(path)
    if not path.exists():
        raise InputError(f"labelled data not found: {path}")
    if path.is_dir() and fmt != "llmbar":
        raise InputError(f"{path}: is a directory; the {fmt} format reads one file")
    kept: dict[str, LabelledPair] = {}
    left_out: Counter[str] = Counter()
    for pair in _READERS[fmt](path):
        if pair is None:
            left_out["unusable"] += 1
        elif reason := _screen(pair, kept):
            left_out[reason] += 1
        else:
            kept[pair.pair_key] = pair
            if len(kept) == limit:
                break
    duplicates = left_out.pop("duplicate", 0)
    data = LabelledData(list(kept.values()), duplicates, dict(left_out))
    if not data.pairs:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(left_out.items()))
        detail = f" ({data.skipped} rows skipped: {reasons})" if data.skipped else ""
        raise InputError(f"{path}: no labelled pairs found{detail}")
    return data


def load_labelled(path: str | Path, fmt: str, limit: int | None = None) -> list[LabelledPair]:
    """Read labelled pairs from `path` in format `fmt` (one of FORMATS); raise InputError naming the file at fault."""
    return load_labelled_report(path, fmt, limit).pairs


def check_keys(pairs: list[LabelledPair], scorers: Sequence[Scorer]) -> None:
    """Raise unless every evals row (eval, scorer) and eval_items row (eval, scorer, pair) has its own key.

    Called before any model call: a collision found at the final write would throw the whole evaluation away.
    """
    twice = [key for key, n in Counter(p.pair_key for p in pairs).items() if n > 1]
    if twice:
        raise PrefsynthError(f"labelled pairs need distinct keys; {len(twice)} appear more than once "
                             f"(pair_key {twice[0][:12]}…)")  # fmt: skip
    by_id: dict[str, list[str]] = {}
    for scorer in scorers:
        by_id.setdefault(scorer.scorer_id, []).append(scorer.name)
    same = [names for names in by_id.values() if len(names) > 1]
    if same:
        raise ConfigError(f"scorers {', '.join(same[0])} are the same scorer (identical settings and models); keep one")


def better_share(pair: LabelledPair, comparison: Comparison | None) -> float | None:
    """The labelled-better reply's share of a pairwise comparison in which `a` was the reply shown first.

    None when the comparison failed; 0.5 (a tie) when its verdict flipped and was dropped.
    """
    if comparison is None:
        return None
    share = 0.5 if comparison.winner is None else comparison.score_a
    return share if pair.better_first else 1 - share


def _counts(rows: list[tuple[float | None, float | None]]) -> dict[str, Any]:
    scored = [(b, w) for b, w in rows if b is not None and w is not None]
    correct = sum(b > w for b, w in scored)
    ties = sum(b == w for b, w in scored)
    return {
        "n": len(scored),
        "correct": correct,
        "accuracy": round(correct / len(scored), 4) if scored else 0.0,
        "accuracy_ties_half": round((correct + ties / 2) / len(scored), 4) if scored else 0.0,
        "ties": ties,
        "failed": len(rows) - len(scored),
    }


def accuracy_report(rows: list[tuple[str, float | None, float | None]]) -> dict:
    """rows: (subset, score_of_better, score_of_worse); None = the scorer failed on that side.

    A pair counts as correct only when the better response scores strictly higher (ties are wrong, as in
    RewardBench); `accuracy_ties_half` counts a tie as half right (a calibrated judge's "don't know").
    Failed pairs are left out of `n` and `accuracy` and counted apart.
    """
    by_subset: dict[str, list[tuple[float | None, float | None]]] = {}
    for subset, better, worse in rows:
        by_subset.setdefault(subset, []).append((better, worse))
    report = _counts([(b, w) for _, b, w in rows])
    report["by_subset"] = {name: _counts(by_subset[name]) for name in sorted(by_subset)}
    return report
