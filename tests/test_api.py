"""The Python API as a notebook user calls it: no YAML, prompts in memory, frames out."""

from __future__ import annotations

from pathlib import Path

import datasets
import polars as pl
import pytest

import prefsynth
from prefsynth.errors import ConfigError, InputError, WarehouseError

PROMPTS = ["Name a prime number.", "Say hello in French.", "What is 2 + 2?", "Give a synonym of big."]


def _config(tmp_path: Path) -> dict:
    return {
        "name": "notebook",
        "generation": {"models": [{"gguf": "smollm2-135m-instruct"}], "samples_per_prompt": 3,
                       "sampling": {"temperature": 1.0, "max_tokens": 12, "seed": 3}},
        "scorers": [{"kind": "pointwise_judge", "model": {"gguf": "smollm2-135m-instruct"}, "max_tokens": 48}],
        "curation": {"min_margin": 0, "allow_truncated": True},
        "warehouse": str(tmp_path / "nb.duckdb"),
    }  # fmt: skip


@pytest.mark.model
def test_run_on_a_list_of_prompts_gives_pairs_then_a_cached_rerun(tmp_path: Path, prefect_harness) -> None:
    result = prefsynth.run(_config(tmp_path), prompts=PROMPTS)
    assert result.status == "completed"
    assert result.counts["generate"].new == len(PROMPTS) * 3 and result.counts["score[judge]"].new > 0
    assert result.summary.pairs > 0, "precondition: the run made pairs"
    assert isinstance(result.pairs, pl.DataFrame) and len(result.pairs) == result.summary.pairs
    assert set(result.pairs["chosen_text"]) and not set(result.pairs["chosen_id"]) & set(result.pairs["rejected_id"])
    ds = result.dataset
    assert isinstance(ds, datasets.Dataset) and len(ds) == result.summary.pairs
    assert ds[0]["chosen"][0]["role"] == "assistant" and ds[0]["prompt"][-1]["role"] == "user"

    wh = prefsynth.Warehouse(result.warehouse)
    runs = wh.runs()
    assert runs.filter(pl.col("run_id") == result.run_id)["status"].to_list() == ["completed"]
    assert sorted(wh.pairs()["pair_id"]) == sorted(result.pairs["pair_id"])
    prompts = wh.prompts(run=result.run_id)
    assert len(prompts) == len(PROMPTS) and set(prompts["source"]) == {"in_memory:python"}
    assert len(wh.responses(run=result.run_id)) == len(PROMPTS) * 3
    assert len(wh.scores(run=result.run_id, scorer="judge")) == result.counts["score[judge]"].new
    assert wh.failures(run=result.run_id).columns[:3] == ["run_id", "stage", "item_id"]

    # the same prompts as a polars frame and as a Dataset: the same prompt ids, so nothing is called again
    again = prefsynth.run(_config(tmp_path), prompts=pl.DataFrame({"prompt": PROMPTS}))
    assert again.summary.model_calls == 0 and sorted(again.pairs["pair_id"]) == sorted(result.pairs["pair_id"])
    third = prefsynth.run(_config(tmp_path), prompts=datasets.Dataset.from_dict({"prompt": PROMPTS[:2]}))
    assert third.summary.model_calls == 0 and third.summary.prompts == 2
    assert len(wh.runs()) == 3


@pytest.mark.model
def test_score_outside_a_pipeline() -> None:
    judge = {"kind": "pointwise_judge", "model": {"gguf": "smollm2-135m-instruct"}, "max_tokens": 64}
    out = prefsynth.score(judge, [("What is 2 + 2?", "4."), {"prompt": "Say hi.", "response": "Hi!"}])
    assert out["index"].to_list() == [0, 1]
    scored = out.filter(pl.col("value").is_not_null())
    assert len(scored) > 0, "precondition: the judge scored something"
    assert scored["value"].is_between(1, 10).all()
    assert out.filter(pl.col("value").is_null())["error"].is_not_null().all()


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    judge = {"kind": "pointwise_judge", "model": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    with pytest.raises(ConfigError, match=r"items\[0\]: expected \(prompt, response\)"):
        prefsynth.score(judge, ["just a string"])
    with pytest.raises(ConfigError, match="kind"):
        prefsynth.score({"kind": "nope"}, [])
    with pytest.raises(ConfigError, match="generation"):
        prefsynth.run({"scorers": []}, prompts=PROMPTS)
    with pytest.raises(WarehouseError, match="not found"):
        prefsynth.Warehouse(tmp_path / "missing.duckdb")


def test_in_memory_source_without_prompts_says_how(tmp_path: Path) -> None:
    from prefsynth.tasks.ingest import in_memory_records, read_prompts

    source = prefsynth.PipelineConfig.model_validate({**_config(tmp_path), "prompts": {"in_memory": "x"}}).prompts
    with pytest.raises(InputError, match=r"prefsynth.run\(config, prompts=...\)"):
        list(read_prompts(source))
    with pytest.raises(InputError, match="a list, a DataFrame or a Dataset"):
        list(in_memory_records("one prompt"))
    assert list(in_memory_records(["a", [{"role": "user", "content": "b"}], {"prompt": "c"}])) == [
        {"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}, {"prompt": "c"}]  # fmt: skip


def test_prefects_workers_are_drained_inside_a_notebooks_event_loop() -> None:
    """In a running event loop Prefect's drain_all returns a coroutine: it must still run, not be dropped."""
    import asyncio
    import gc
    import warnings

    from prefsynth.flows.prefect_api import _drain

    async def cell() -> None:
        _drain(0.5)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        asyncio.run(cell())
        gc.collect()
    assert not [w for w in seen if "never awaited" in str(w.message)]
