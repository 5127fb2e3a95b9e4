"""Screening before curation (issue 12): duplicate prompts (exact after normalization, near by MinHash LSH),
prompts found in evaluation sets (word n-gram overlap), and pairs whose two replies are the same text, on
hand-made data with known answers and through a run on the loopback server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest

from prefsynth.errors import InputError
from prefsynth.schemas.config import CurationSpec, EvalSet
from prefsynth.tasks.screen import contaminated, duplicates, read_eval_set, same_text
from tests.conftest import write_jsonl
from tests.fake_server import FakeOpenAI, Reply, chat_reply

LONG = "What is the capital city of France and why is it famous for its art museums"


def _texts(rows: dict[str, str]) -> pl.DataFrame:
    return pl.DataFrame({"prompt_id": list(rows), "text": list(rows.values())})


def test_exact_and_near_duplicates_keep_the_smallest_id():
    texts = _texts({"a": "Name a fruit.", "b": "  name a FRUIT!", "c": LONG, "d": LONG.replace("its art", "the art"),
                    "e": "Say hi."})  # fmt: skip
    exact = duplicates(texts, None)
    assert exact.select("prompt_id", "duplicate_of", "kind").rows() == [("b", "a", "exact")]
    near = duplicates(texts, 0.5)
    assert near.select("prompt_id", "duplicate_of", "kind").rows() == [("b", "a", "exact"), ("d", "c", "near")]
    assert 0.5 <= near["similarity"][1] < 1.0
    assert duplicates(texts, 0.99).height == 1  # d is not that similar


def test_contamination_by_shared_ngrams_and_short_prompts_by_equality():
    texts = _texts({"a": LONG, "b": "Say hi", "c": "Name a river in Africa."})
    items = pl.DataFrame({"benchmark": ["geo", "chat"], "item": [f"Q: {LONG}? Answer: Paris.", "say hi!"]})
    hits = contaminated(texts, items, 13)
    assert hits.select("prompt_id", "benchmark").rows() == [("a", "geo"), ("b", "chat")]
    assert len(hits["gram"][0].split()) == 13
    assert contaminated(texts, items.clear(), 13).is_empty()


def test_eval_sets_are_read_from_files_and_bad_ones_are_clear_errors(tmp_path: Path):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps({"question": "Q1"}) + "\n" + json.dumps({"question": "Q2"}) + "\n")
    items = read_eval_set(EvalSet(path=str(path), field="question"))
    assert items.rows() == [("mmlu", "Q1"), ("mmlu", "Q2")]
    with pytest.raises(InputError, match="has no field 'prompt'"):
        read_eval_set(EvalSet(path=str(path)))
    with pytest.raises(InputError, match="use .jsonl"):
        read_eval_set(EvalSet(path=str(tmp_path / "x.txt")))


def test_pairs_of_the_same_text_are_found():
    pairs = pl.DataFrame({"pair_id": ["x", "y", "z"], "chosen_id": ["a", "c", "e"], "rejected_id": ["b", "d", "f"]})
    texts = pl.DataFrame({"response_id": ["a", "b", "c", "d", "e", "f"],
                          "text": ["Paris.", "paris", "Paris is the capital.", "Lyon.",
                                   "The capital of France is Paris, a city on the Seine.",
                                   "The capital of France is Paris, a city on the Seine river."]})  # fmt: skip
    assert same_text(pairs, texts, CurationSpec()) == ["x"]
    assert same_text(pairs, texts, CurationSpec(dedup="near", near_threshold=0.7)) == ["x", "z"]
    assert same_text(pairs, texts, CurationSpec(dedup="none")) == []


def _respond(body: dict[str, Any]) -> Reply:
    """Replies that differ only in case and punctuation; the judge scores a reply with a full stop 9, else 2."""
    kind = (body.get("response_format") or {}).get("json_schema", {}).get("name")
    if kind == "judgment":
        shown = body["messages"][-1]["content"]
        return chat_reply(json.dumps({"rationale": "ok", "score": 9 if "Paris." in shown else 2}))
    return chat_reply("The answer is Paris." if body.get("seed", 0) % 2 == 0 else "the answer is paris")


def test_a_run_leaves_out_duplicates_and_contaminated_prompts(tmp_path: Path, prefect_harness: Any) -> None:
    import prefsynth

    prompts = write_jsonl(tmp_path / "p.jsonl", ["Name a fruit.", "name a FRUIT!", LONG, "Name a color."])
    bench = tmp_path / "geo.jsonl"
    bench.write_text(json.dumps({"prompt": f"{LONG}?"}) + "\n")
    with FakeOpenAI(_respond) as fake:
        model = {"base_url": fake.base_url, "model": "m"}
        config = {"name": "screen", "prompts": {"path": str(prompts)},
                  "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"seed": 0}},
                  "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
                  "curation": {"decontaminate": [{"path": str(bench)}]},
                  "warehouse": str(tmp_path / "w.duckdb")}  # fmt: skip
        kept = prefsynth.run({**config, "curation": {**config["curation"], "dedup": "none"}})
        screened = prefsynth.run(config)
    assert kept.summary.pairs == 3, "precondition: without dedup, every prompt with its two replies makes a pair"
    assert screened.summary.pairs == 0 and screened.summary.curation["same_text"] == 2
    assert screened.summary.curation["left_out_prompts"] == 2
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        flags = con.execute("SELECT p.messages, f.kind, f.benchmark FROM prompt_flags f JOIN prompts p "
                            "USING (prompt_id) WHERE f.run_id = ? ORDER BY f.kind",
                            [screened.run_id]).fetchall()  # fmt: skip
    assert [(json.loads(m)[-1]["content"], k, b) for m, k, b in flags] == [
        (LONG, "contaminated", "geo"), ("name a FRUIT!", "exact_duplicate", None)]
    # the flow publishes the curation counts as a markdown artifact next to its summary table
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        key = ArtifactFilterKey(any_=["prefsynth-curation"])
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    assert any(f"Curation of run {screened.run_id}" in a.data and "| same_text | 2 |" in a.data for a in found)


def test_duplicates_of_replies_are_never_of_their_own_group():
    """The one `duplicates` serves replies too: id_col names the id, group_col the prompt whose replies are never
    duplicates of each other (the same answer as response_duplicates)."""
    texts = pl.DataFrame({"response_id": ["r1", "r2", "r3", "r4"], "prompt_id": ["p1", "p1", "p2", "p2"],
                          "text": ["Name a fruit.", "name a FRUIT", LONG, "Name a fruit!"]})  # fmt: skip
    dups = duplicates(texts, 0.5, id_col="response_id", group_col="prompt_id")
    assert dups.columns == ["response_id", "prompt_id", "duplicate_of", "kind", "similarity"]
    assert dups.select("response_id", "prompt_id", "duplicate_of", "kind").rows() == [("r4", "p2", "r1", "exact")]
    alone = duplicates(texts.drop("prompt_id").rename({"response_id": "prompt_id"}), None)
    assert alone["prompt_id"].to_list() == ["r2", "r4"]  # without a group, every later equal text is a duplicate
