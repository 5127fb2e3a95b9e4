import json

import datasets
import polars as pl
import pytest

from prefsynth.errors import ExportError
from prefsynth.tasks.export import write_dataset

ROWS = pl.DataFrame(
    {
        "run_id": ["r", "r"],
        "pair_id": ["x2", "x1"],
        "prompt_id": ["p2", "p1"],
        "prompt_messages": [
            json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ü"}]),
            json.dumps([{"role": "user", "content": "2+2?"}]),
        ],
        "chosen_text": ["Hello!", "4"],
        "rejected_text": ["Go away.", "5"],
        "score_chosen": [9.0, 8.0],
        "score_rejected": [2.0, 1.0],
        "margin": [7.0, 7.0],
        "chosen_id": ["c2", "c1"],
        "rejected_id": ["j2", "j1"],
        "chosen_model": ["m", "m"],
        "rejected_model": ["m", "m"],
        "scorer_id": ["s", "s"],
        "rule": ["{}", "{}"],
        "source": ["sampled", "sampled"],
        "chosen_finish_reason": ["stop", "stop"],
        "rejected_finish_reason": ["length", "stop"],
    }
)


def _message_list(feature) -> bool:
    inner = getattr(feature, "feature", None)
    return inner is not None and set(inner) == {"role", "content"}


def test_trl_parquet_loads_back_with_message_lists(tmp_path):
    done = write_dataset(ROWS, tmp_path, "trl")
    assert done.path.name == "train.parquet" and done.n_pairs == 2
    ds = datasets.Dataset.from_parquet(str(done.path))
    for col in ("prompt", "chosen", "rejected"):
        assert _message_list(ds.features[col]), ds.features[col]
    first = ds[0]
    assert first["prompt"] == [{"role": "user", "content": "2+2?"}]  # sorted by prompt id
    assert first["chosen"] == [{"role": "assistant", "content": "4"}]
    assert first["rejected"] == [{"role": "assistant", "content": "5"}]
    assert ds[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    for col in ("source", "score_gap", "score_chosen", "score_rejected", "pair_id", "chosen_id", "rejected_id",
                "run_id"):
        assert col in ds.column_names
    assert "margin" not in ds.column_names  # TRL would train with it: only a chosen margin mode writes one
    assert ds["rejected_finish_reason"] == ["stop", "length"]  # a reply cut off at max_tokens says so


def test_jsonl_export_and_snapshot_ids(tmp_path):
    done = write_dataset(ROWS, tmp_path, "jsonl")
    lines = done.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and "Hi ü" in lines[1]
    again = write_dataset(ROWS.reverse(), tmp_path / "b", "jsonl")
    assert again.snapshot_id == done.snapshot_id
    assert write_dataset(ROWS, tmp_path / "c", "trl").snapshot_id != done.snapshot_id


def test_empty_export_keeps_the_schema(tmp_path):
    import pyarrow.parquet as pq

    done = write_dataset(ROWS.clear(), tmp_path, "trl")
    table = pq.read_table(done.path)  # datasets refuses to load a 0-row parquet; its features are in the schema
    features = datasets.Features.from_arrow_schema(table.schema)
    assert table.num_rows == 0 and _message_list(features["chosen"])


def test_an_existing_dataset_is_replaced_only_with_overwrite(tmp_path):
    done = write_dataset(ROWS, tmp_path, "trl")
    done.path.write_bytes(b"earlier")
    with pytest.raises(ExportError, match=f"{tmp_path} already holds a dataset .*train.parquet"):
        write_dataset(ROWS, tmp_path, "trl")
    assert done.path.read_bytes() == b"earlier" and not list(tmp_path.glob("*.tmp"))
    assert write_dataset(ROWS, tmp_path, "trl", overwrite=True).n_pairs == 2
    assert datasets.Dataset.from_parquet(str(done.path)).num_rows == 2


def test_an_output_folder_that_is_a_file_is_named(tmp_path):
    out = tmp_path / "taken"
    out.write_text("mine")
    with pytest.raises(ExportError, match=f"cannot export to {out}: it is a file, not a folder"):
        write_dataset(ROWS, out, "jsonl")
    with pytest.raises(ExportError, match=f"cannot create the export folder {out / 'sub'}: Not a directory"):
        write_dataset(ROWS, out / "sub", "jsonl")
    assert out.read_text() == "mine"
