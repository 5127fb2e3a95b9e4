"""Screening before curation: duplicate prompts, prompts found in evaluation sets, pairs of the same text.

- **Exact duplicates**: texts equal after normalization (NFKC, lower case, punctuation dropped, whitespace
  collapsed), by hash.
- **Near duplicates**: MinHash LSH (datasketch) over word 3-grams, at an estimated Jaccard similarity of at
  least `near_threshold`. Of a group, the prompt with the smallest id stays.
- **Contamination**: a prompt sharing a word n-gram (default 13, as in GPT-3's decontamination) with an item
  of a user-given evaluation set is left out. An item shorter than n words (a short question) matches a
  prompt that contains its whole word sequence, and a prompt shorter than n words matches an item that
  contains it (a benchmark question asked alone), if the shorter text has at least `ngram_min` words; below
  that, only equal texts match. The match is kept (`prompt_flags`: the benchmark and the item).
- **Same text**: a pair whose two replies are duplicates (exactly, or near with `dedup: near`) teaches
  nothing and is dropped.
- **Duplicate responses across prompts** (`dedup_responses`): a reply that duplicates a reply to another prompt
  (exactly, or near with `dedup: near`), such as the same boilerplate answer to different questions, is left
  out of curation; of a group the reply with the smallest id stays, and replies to that reply's own prompt
  are not duplicates of it (same-text pairs handle those). Listed in `prompt_flags` with `response_id` and
  the reply it duplicates (`of_id`).
The n-gram join is polars; MinHash is the library's.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from prefsynth.errors import InputError
from prefsynth.schemas.config import CurationSpec, EvalSet
from prefsynth.schemas.records import PromptFlag

SHINGLE = 3  # words per MinHash shingle
NUM_PERM = 128


def normalized(text: pl.Expr) -> pl.Expr:
    """NFKC, lower case, punctuation dropped, whitespace collapsed."""
    folded = text.str.normalize("NFKC").str.to_lowercase().str.replace_all(r"[^\w\s]", "")
    return folded.str.replace_all(r"\s+", " ").str.strip_chars()


def prompt_texts(prompts: pl.DataFrame) -> pl.DataFrame:
    """prompt_id, text (the prompt's non-system turns) of prompt_id, messages (JSON) rows."""
    texts = ["\n".join(m.get("content") or "" for m in json.loads(raw) if m["role"] != "system")
             for raw in prompts["messages"]]
    return pl.DataFrame({"prompt_id": prompts["prompt_id"], "text": texts}, schema={"prompt_id": pl.String,
                                                                                    "text": pl.String})  # fmt: skip


def duplicates(texts: pl.DataFrame, near_threshold: float | None, id_col: str = "prompt_id",
               group_col: str | None = None) -> pl.DataFrame:  # fmt: skip
    """id_col, [group_col,] duplicate_of, kind (exact | near), similarity of every duplicate among `texts`
    (id_col, [group_col,] text): of texts equal after normalization the smallest id stays, and, with
    `near_threshold`, of near ones (MinHash). With `group_col`, a text is never a duplicate of one of its own
    group (replies to one prompt)."""
    keyed = texts.with_columns(norm=normalized(pl.col("text"))).filter(pl.col("norm") != "")  # nothing to compare
    keyed = keyed.with_columns(key=pl.col("norm").hash(), group=pl.col(group_col or id_col)).drop("norm")
    keyed = keyed.sort(id_col)
    first = keyed.group_by("key").agg(duplicate_of=pl.col(id_col).min())
    first = first.join(keyed.select(duplicate_of=id_col, of_group="group"), on="duplicate_of")
    out = [id_col, *([group_col] if group_col else []), "duplicate_of", "kind", "similarity"]
    exact = (keyed.join(first, on="key").filter(pl.col("group") != pl.col("of_group"))
             .with_columns(kind=pl.lit("exact"), similarity=pl.lit(1.0)).select(out))  # fmt: skip
    if near_threshold is None:
        return exact.sort(id_col)
    kept = keyed.join(exact.select(id_col), on=id_col, how="anti").sort(id_col)
    near = _near(kept[id_col].to_list(), [_words(t) for t in kept["text"]], near_threshold,
                 kept["group"].to_list() if group_col else None).rename({"id": id_col})  # fmt: skip
    if group_col:
        near = near.join(kept.select(id_col, group_col), on=id_col)
    return pl.concat([exact, near.select(out)]).sort(id_col)


def _words(text: str) -> list[str]:
    """The words of a text as `normalized` sees them (lower case, no punctuation)."""
    return re.sub(r"[^\w\s]", "", unicodedata.normalize("NFKC", text).lower()).split() or [""]


def _near(ids: list[str], words: list[list[str]], threshold: float, groups: list[str] | None = None) -> pl.DataFrame:
    """id, duplicate_of, kind, similarity of the near duplicates among `ids`; with `groups`
    (one per id), an item is never a duplicate of an item of its own group."""
    from datasketch import MinHashLSH

    hashes = dict(zip(ids, _minhashes(words), strict=True))
    group = dict(zip(ids, groups or ids, strict=True))
    lsh = MinHashLSH(threshold=min(threshold, 0.9), num_perm=NUM_PERM)  # candidates; each is checked below
    rows = []
    for pid, mh in hashes.items():  # in id order: the smallest id of a group stays
        found = [(other, mh.jaccard(hashes[other])) for other in lsh.query(mh) if group[other] != group[pid]]
        found = [(o, s) for o, s in found if s >= threshold]
        if found:
            other, similarity = min(found)
            rows.append({"id": pid, "duplicate_of": other, "kind": "near", "similarity": similarity})
        else:
            lsh.insert(pid, mh)
    return pl.DataFrame(rows, schema={"id": pl.String, "duplicate_of": pl.String, "kind": pl.String,
                                      "similarity": pl.Float64})  # fmt: skip


def response_duplicates(texts: pl.DataFrame, near_threshold: float | None) -> pl.DataFrame:
    """`duplicates` of replies (response_id, prompt_id, text) across prompts: a reply is never a duplicate of a
    reply to its own prompt."""
    return duplicates(texts, near_threshold, id_col="response_id", group_col="prompt_id")


@task(name="screen-responses", cache_policy=NO_CACHE)
def screen_responses(texts: pl.DataFrame, spec: CurationSpec) -> list[PromptFlag]:
    """Prefect task: the flags of responses (response_id, prompt_id, text) that duplicate a response to another
    prompt, per `spec.dedup` (exact, or near as well)."""
    dups = response_duplicates(texts, spec.near_threshold if spec.dedup == "near" else None)
    return [PromptFlag(prompt_id=r["prompt_id"], kind=f"{r['kind']}_duplicate_response", of_id=r["duplicate_of"],
                       benchmark=None, item=None, similarity=r["similarity"], response_id=r["response_id"])
            for r in dups.iter_rows(named=True)]  # fmt: skip


def _ngrams(texts: pl.DataFrame, n: int) -> pl.DataFrame:
    """id, gram: every word n-gram of each text (a text shorter than n words: the whole text)."""
    words = texts.with_columns(words=normalized(pl.col("text")).str.split(" "))
    window = pl.concat_str([pl.element().shift(-i) for i in range(n)], separator=" ").drop_nulls()
    whole = pl.concat_list(pl.col("words").list.join(" "))
    grams = words.with_columns(gram=pl.when(pl.col("words").list.len() >= n).then(
        pl.col("words").list.eval(window)).otherwise(whole))  # fmt: skip
    return grams.select("id", "gram").explode("gram").drop_nulls("gram")


def read_eval_set(spec: EvalSet) -> pl.DataFrame:
    """benchmark, item (text) of an evaluation set: a JSONL/JSON/CSV/Parquet file or a saved HF dataset."""
    path = Path(spec.path)
    try:
        if path.is_dir():
            import datasets

            frame = pl.from_arrow(datasets.load_from_disk(str(path)).data.table)
        else:
            reader = {".jsonl": pl.read_ndjson, ".json": pl.read_json, ".csv": pl.read_csv,
                      ".parquet": pl.read_parquet}.get(path.suffix)  # fmt: skip
            if reader is None:
                raise InputError(f"evaluation set {path}: use .jsonl, .json, .csv, .parquet or a saved HF dataset")
            frame = reader(path)
    except (OSError, pl.exceptions.PolarsError, ValueError) as err:
        raise InputError(f"cannot read evaluation set {path}: {err}") from None
    assert isinstance(frame, pl.DataFrame)
    if spec.field not in frame.columns:
        raise InputError(f"evaluation set {path} has no field {spec.field!r}; it has {frame.columns}")
    return frame.select(benchmark=pl.lit(spec.name or path.stem), item=pl.col(spec.field).cast(pl.String)).drop_nulls()


def contaminated(texts: pl.DataFrame, items: pl.DataFrame, n: int, n_min: int | None = None) -> pl.DataFrame:
    """prompt_id, benchmark, item, gram: each prompt that shares an n-gram with an evaluation item, or where the
    shorter of the two (fewer than n words, at least `n_min`; default n: none) is a whole word sequence of the
    other (the first match by benchmark and item)."""
    schema = {"prompt_id": pl.String, "benchmark": pl.String, "item": pl.String, "gram": pl.String}
    if items.is_empty() or texts.is_empty():
        return pl.DataFrame(schema=schema)
    indexed = items.with_row_index("id").with_columns(pl.col("id").cast(pl.String))
    item_grams = _ngrams(indexed.select("id", text="item"), n).join(indexed, on="id").drop("id")
    prompts = texts.rename({"prompt_id": "id"})
    prompt_grams = _ngrams(prompts, n).rename({"id": "prompt_id"})
    hits = [prompt_grams.join(item_grams, on="gram").select(*schema)]
    # a short item inside a prompt, or a short prompt inside an item: the longer side's k-grams for each length
    # k of the shorter side's texts (one join per length, not per text)
    for k, short_items in _short(indexed, "item", n, n_min):
        grams = _ngrams(prompts, k).rename({"id": "prompt_id"})
        hits.append(grams.join(short_items.select("gram", "benchmark", "item"), on="gram").select(*schema))
    for k, short_prompts in _short(prompts, "text", n, n_min):
        grams = _ngrams(indexed.select("id", text="item"), k).join(indexed, on="id").drop("id")
        hits.append(grams.join(short_prompts.select("gram", prompt_id="id"), on="gram").select(*schema))
    found = pl.concat(hits).sort("prompt_id", "benchmark", "item", "gram")
    return found.group_by("prompt_id", maintain_order=True).first()


def _short(frame: pl.DataFrame, column: str, n: int, n_min: int | None) -> list[tuple[int, pl.DataFrame]]:
    """Per word count k in [n_min, n): the rows whose normalized `column` has k words, with it as `gram`."""
    short = frame.with_columns(gram=normalized(pl.col(column))).with_columns(
        k=pl.col("gram").str.split(" ").list.len()).filter(
        (pl.col("k") < n) & (pl.col("k") >= (n_min or n)) & (pl.col("gram") != ""))  # fmt: skip
    return [(k, short.filter(pl.col("k") == k)) for k in sorted(short["k"].unique().to_list())]


@task(name="screen", cache_policy=NO_CACHE)
def screen(prompts: pl.DataFrame, spec: CurationSpec) -> list[PromptFlag]:
    """Prefect task: the flags of a run's prompts (prompt_id, messages JSON) that curation leaves out."""
    texts = prompt_texts(prompts)
    flags = []
    if spec.dedup != "none":
        dups = duplicates(texts, spec.near_threshold if spec.dedup == "near" else None)
        flags += [PromptFlag(prompt_id=r["prompt_id"], kind=f"{r['kind']}_duplicate", of_id=r["duplicate_of"],
                             benchmark=None, item=None, similarity=r["similarity"])
                  for r in dups.iter_rows(named=True)]  # fmt: skip
    if spec.decontaminate:
        items = pl.concat([read_eval_set(e) for e in spec.decontaminate])
        flags += [PromptFlag(prompt_id=r["prompt_id"], kind="contaminated", of_id=None, benchmark=r["benchmark"],
                             item=r["item"][:1000], similarity=None) for r in
                  contaminated(texts, items, spec.ngram, spec.ngram_min).iter_rows(named=True)]  # fmt: skip
    return flags


def same_text(pairs: pl.DataFrame, texts: pl.DataFrame, spec: CurationSpec) -> list[str]:
    """The pair ids of the pairs whose two replies are duplicates (texts: response_id, text), sorted."""
    if pairs.is_empty() or spec.dedup == "none":
        return []
    both = (pairs.select("pair_id", "chosen_id", "rejected_id")
            .join(texts.rename({"response_id": "chosen_id", "text": "c"}), on="chosen_id", how="left")
            .join(texts.rename({"response_id": "rejected_id", "text": "r"}), on="rejected_id", how="left")
            .with_columns(same=(normalized(pl.col("c")) == normalized(pl.col("r"))).fill_null(False)))  # fmt: skip
    if spec.dedup == "near":
        rows = both.select("pair_id", "c", "r", "same").to_dicts()
        near = {r["pair_id"] for r in rows if not r["same"] and _similar(_words(r["c"] or ""), _words(r["r"] or ""),
                                                                           spec.near_threshold)}  # fmt: skip
        both = both.with_columns(same=pl.col("same") | pl.col("pair_id").is_in(sorted(near)))
    return sorted(both.filter(pl.col("same"))["pair_id"].to_list())


def _similar(a: list[str], b: list[str], threshold: float) -> bool:
    one, two = _minhashes([a, b])
    return one.jaccard(two) >= threshold


def _minhashes(words: list[list[str]]) -> list[Any]:
    """The MinHash of each text's word 3-gram shingles."""
    from datasketch import MinHash

    shingles = [{" ".join(w[i : i + SHINGLE]).encode() for i in range(max(1, len(w) - SHINGLE + 1))} for w in words]
    return MinHash.bulk(shingles, num_perm=NUM_PERM)
