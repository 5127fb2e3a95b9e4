"""Duplicate responses across prompts (issue 12): the same boilerplate reply to different prompts, exactly or
nearly, is left out of curation (the reply with the smallest id stays) and listed in prompt_flags with the
reply it matched; replies to the kept reply's own prompt are not duplicates of it. Hand-made data with known
answers, and a run on the loopback server that also exports with splits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest

from prefsynth.errors import ConfigError
from prefsynth.schemas.config import CurationSpec, parse_config
from prefsynth.tasks.screen import response_duplicates, screen_responses
from tests.conftest import write_jsonl
from tests.fake_server import FakeOpenAI, Reply, chat_reply

SORRY = "I'm sorry, but I cannot help with that request."
OVERVIEW = ("As an AI language model I do not have personal opinions, but here is a balanced overview of the "
            "main arguments that people usually make on both sides of the debate")  # fmt: skip


def _texts(rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"response_id": pl.String, "prompt_id": pl.String, "text": pl.String},
                        orient="row")  # fmt: skip


TEXTS = _texts([
    ("a1", "p1", SORRY),
    ("a2", "p1", SORRY),  # the same prompt as the kept a1: not a duplicate across prompts
    ("a3", "p1", OVERVIEW),
    ("b1", "p2", "i'm SORRY but i cannot help with that request!"),  # exact after normalization
    ("b2", "p2", "Paris is the capital of France."),
    ("c1", "p3", OVERVIEW.replace("the debate", "this debate")),  # near
    ("c2", "p3", "Lyon is in France."),
    ("d1", "p1", OVERVIEW.replace("people", "folks")),  # near a3, but the same prompt
])  # fmt: skip


def test_exact_duplicates_across_prompts_keep_the_smallest_id():
    exact = response_duplicates(TEXTS, None)
    assert exact.select("response_id", "prompt_id", "duplicate_of", "kind").rows() == [("b1", "p2", "a1", "exact")]


def test_near_duplicates_across_prompts_by_minhash():
    near = response_duplicates(TEXTS, 0.7)
    assert near.select("response_id", "duplicate_of", "kind").rows() == [("b1", "a1", "exact"), ("c1", "a3", "near")]
    assert 0.7 <= near["similarity"][1] < 1.0
    assert response_duplicates(TEXTS, 0.99).height == 1  # c1 is not that similar


def test_the_flags_name_the_reply_and_what_it_matched():
    flags = screen_responses.fn(TEXTS, CurationSpec(dedup="near", near_threshold=0.7, dedup_responses=True))
    assert [(f.response_id, f.prompt_id, f.kind, f.of_id) for f in flags] == [
        ("b1", "p2", "exact_duplicate_response", "a1"), ("c1", "p3", "near_duplicate_response", "a3")]
    with pytest.raises(ConfigError, match="dedup_responses follows `dedup`"):
        model = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
        parse_config({"prompts": {"builtin": "quickstart"}, "generation": {"models": [model]},
                      "scorers": [{"kind": "pointwise_judge", "model": model}],
                      "curation": {"dedup": "none", "dedup_responses": True}})  # fmt: skip


def _respond(body: dict[str, Any]) -> Reply:
    """Sample 0 of every prompt is the same refusal, sample 1 a reply naming the prompt; the judge scores the
    refusal 2 and the others 9."""
    kind = (body.get("response_format") or {}).get("json_schema", {}).get("name")
    if kind == "judgment":
        score = 2 if SORRY in body["messages"][-1]["content"] else 9
        return chat_reply(json.dumps({"rationale": "ok", "score": score}))
    asked = body["messages"][-1]["content"]
    return chat_reply(SORRY if body.get("seed", 0) % 2 == 0 else f"Here is my answer to: {asked}")


def test_a_run_leaves_out_replies_duplicated_across_prompts(tmp_path: Path, prefect_harness: Any) -> None:
    import prefsynth

    questions = [f"Question number {i}: name a country in Europe." for i in range(6)]
    prompts = write_jsonl(tmp_path / "p.jsonl", questions)
    with FakeOpenAI(_respond) as fake:
        model = {"base_url": fake.base_url, "model": "m"}
        config = {"name": "dups", "prompts": {"path": str(prompts)},
                  "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"seed": 0}},
                  "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
                  "warehouse": str(tmp_path / "w.duckdb"),
                  "export": [{"path": str(tmp_path / "e"), "splits": {"train": 0.5, "test": 0.5}, "seed": 1}]}
        kept = prefsynth.run(config)
        screened = prefsynth.run({**config, "curation": {"dedup_responses": True}})
    assert kept.summary.pairs == 6, "precondition: without dedup_responses every prompt makes a pair"
    assert screened.summary.curation["duplicate_responses"] == 5
    assert screened.summary.pairs == 1  # only the prompt whose refusal has the smallest id still has two replies
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        flags = con.execute("SELECT f.response_id, f.of_id, f.kind, r.text, r.prompt_id = f.prompt_id FROM "
                            "prompt_flags f JOIN responses r USING (response_id) WHERE f.run_id = ?",
                            [screened.run_id]).fetchall()  # fmt: skip
        snaps = con.execute("SELECT n_pairs, splits FROM dataset_snapshots ORDER BY created_at").fetchall()
    assert len(flags) == 5 and {f[2] for f in flags} == {"exact_duplicate_response"}
    assert {f[3] for f in flags} == {SORRY} and all(f[4] for f in flags) and len({f[1] for f in flags}) == 1
    assert min(f[0] for f in flags) > flags[0][1]  # the kept refusal has the smallest id
    # the run's export with splits: one file per split, its rows' splits in the snapshot
    first = json.loads(snaps[0][1])
    assert snaps[0][0] == 6 and sum(f["rows"] for f in first["files"].values()) == 6 and first["seed"] == 1
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["README.md", "test.parquet", "train.parquet"]
