import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from prefsynth.errors import InputError
from prefsynth.schemas.records import Message
from prefsynth.tasks.labelled import FORMATS, accuracy_report, load_labelled, load_labelled_report
from prefsynth.warehouse.ids import content_id

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_jsonl(path: Path, rows: list) -> Path:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _llmbar_rows() -> list[dict]:
    return [
        {"input": "Say hi", "output_1": "hi", "output_2": "bye", "label": 1},
        {"input": "Count to 2", "output_1": "1 3", "output_2": "1 2", "label": 2},
    ]


def _hh(*turns: str) -> str:
    return "".join(f"\n\n{t}" for t in turns)


# --- llmbar -----------------------------------------------------------------------------------------------------


def test_llmbar_file_orders_better_and_worse_by_label(tmp_path):
    path = tmp_path / "natural.json"
    path.write_text(json.dumps(_llmbar_rows()))
    pairs = load_labelled(path, "llmbar")
    assert [(p.better, p.worse) for p in pairs] == [("hi", "bye"), ("1 2", "1 3")]
    assert pairs[0].prompt == [Message(role="user", content="Say hi")]
    assert {p.subset for p in pairs} == {"natural"}
    assert [p.source_ref for p in pairs] == ["natural.json[0]", "natural.json[1]"]
    assert pairs[0].pair_key == content_id("labelled", [{"role": "user", "content": "Say hi"}], "hi", "bye")


def test_llmbar_directory_loads_each_file_as_a_subset_in_name_order(tmp_path):
    rows = _llmbar_rows()
    (tmp_path / "b_second.json").write_text(json.dumps(rows))
    (tmp_path / "a_first.json").write_text(json.dumps(rows[:1]))
    (tmp_path / "notes.txt").write_text("not data")
    pairs = load_labelled(str(tmp_path), "llmbar")
    assert [p.subset for p in pairs] == ["a_first", "b_second", "b_second"]
    assert load_labelled(tmp_path, "llmbar", limit=2)[-1].source_ref == "b_second.json[0]"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"input": "q", "output_1": "a", "output_2": "b", "label": 3}, "'label' must be 1 or 2"),
        ({"input": "q", "output_1": "a", "output_2": "b", "label": True}, "'label' must be int"),
        ({"input": "q", "output_1": "a", "label": 1}, "missing field 'output_2'"),
        ({"input": 5, "output_1": "a", "output_2": "b", "label": 1}, "'input' must be str"),
        ({"input": " ", "output_1": "a", "output_2": "b", "label": 1}, "the prompt is empty"),
        (["not", "an", "object"], "expected an object"),
    ],
)
def test_llmbar_bad_record_names_file_and_index(tmp_path, row, message):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([_llmbar_rows()[0], row]))
    with pytest.raises(InputError, match=rf"x\.json\[1\]: .*{message}"):
        load_labelled(path, "llmbar")


def test_llmbar_invalid_json_and_non_list_are_reported(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n{"input": "q",\n oops}\n]')
    with pytest.raises(InputError, match=r"x\.json:3: invalid JSON"):
        load_labelled(path, "llmbar")
    path.write_text('{"input": "q"}')
    with pytest.raises(InputError, match="expected a JSON list"):
        load_labelled(path, "llmbar")


def test_llmbar_empty_directory_or_list_is_an_error(tmp_path):
    with pytest.raises(InputError, match=r"no \*\.json files"):
        load_labelled(tmp_path, "llmbar")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InputError, match="no labelled pairs found"):
        load_labelled(tmp_path, "llmbar")


# --- hh-rlhf ----------------------------------------------------------------------------------------------------


def test_hh_rlhf_splits_dialogue_at_last_assistant_turn(tmp_path):
    prefix = _hh("Human:  Hi there ", "Assistant: Hello!", "Human: Tell me a joke.")
    row = {"chosen": prefix + _hh("Assistant:  A good joke. "), "rejected": prefix + _hh("Assistant: No.")}
    path = _write_jsonl(tmp_path / "hh.jsonl", [row])
    [pair] = load_labelled(path, "hh-rlhf")
    assert pair.prompt == [
        Message(role="user", content="Hi there"),
        Message(role="assistant", content="Hello!"),
        Message(role="user", content="Tell me a joke."),
    ]
    assert (pair.better, pair.worse, pair.subset, pair.source_ref) == ("A good joke.", "No.", "hh-rlhf", "hh.jsonl:1")


def test_hh_rlhf_reads_gzip_and_counts_skipped_rows(tmp_path):
    good = {"chosen": _hh("Human: q", "Assistant: yes"), "rejected": _hh("Human: q", "Assistant: no")}
    rows = [
        {"chosen": _hh("Human: q", "Assistant: yes"), "rejected": _hh("Human: other", "Assistant: no")},  # differs
        {"chosen": _hh("Human: q", "Assistant:  "), "rejected": _hh("Human: q", "Assistant: no")},  # empty reply
        {"chosen": _hh("Human: q", "Assistant: a", "Assistant: b"), "rejected": _hh("Human: q", "Assistant: a")},
        {"chosen": "no markers at all", "rejected": "no markers at all"},
        "",
        good,
    ]
    path = _write_jsonl(tmp_path / "hh.jsonl.gz", rows)
    pairs, skipped = load_labelled_report(path, "hh-rlhf")
    assert skipped == 4
    assert [(p.better, p.worse, p.source_ref) for p in pairs] == [("yes", "no", "hh.jsonl.gz:6")]
    assert load_labelled(path, "hh-rlhf") == pairs


def test_hh_rlhf_with_only_skipped_rows_is_an_error(tmp_path):
    row = {"chosen": _hh("Human: q", "Assistant: "), "rejected": _hh("Human: q", "Assistant: no")}
    path = _write_jsonl(tmp_path / "hh.jsonl", [row])
    with pytest.raises(InputError, match=r"no labelled pairs found \(1 rows skipped"):
        load_labelled(path, "hh-rlhf")


def test_hh_rlhf_bad_lines_are_reported_with_their_number(tmp_path):
    good = {"chosen": _hh("Human: q", "Assistant: a"), "rejected": _hh("Human: q", "Assistant: b")}
    path = _write_jsonl(tmp_path / "hh.jsonl", [good, '{"chosen": oops}'])
    with pytest.raises(InputError, match=r"hh\.jsonl:2: invalid JSON"):
        load_labelled(path, "hh-rlhf")
    _write_jsonl(path, [good, good, {"chosen": "x"}])
    with pytest.raises(InputError, match=r"hh\.jsonl:3: missing field 'rejected'"):
        load_labelled(path, "hh-rlhf")
    _write_jsonl(path, [{"chosen": "x", "rejected": ["y"]}])
    with pytest.raises(InputError, match=r"hh\.jsonl:1: field 'rejected' must be str"):
        load_labelled(path, "hh-rlhf")


def test_corrupt_gzip_is_an_input_error(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="cannot read"):
        load_labelled(path, "hh-rlhf")


# --- rewardbench ------------------------------------------------------------------------------------------------


def _rb_rows() -> list[dict]:
    return [
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "subset": "chat"},
        {"prompt": "p2", "chosen": "right", "rejected": "wrong"},
        {"prompt": "p3", "chosen": "yes", "rejected": "no", "subset": "math", "id": 7},
    ]


def _check_rewardbench(pairs: list, refs: list[str]) -> None:
    assert [(p.better, p.worse, p.subset) for p in pairs] == [
        ("good", "bad", "chat"),
        ("right", "wrong", "default"),
        ("yes", "no", "math"),
    ]
    assert pairs[1].prompt == [Message(role="user", content="p2")]
    assert [p.source_ref for p in pairs] == refs


def test_rewardbench_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "rb.jsonl", _rb_rows())
    _check_rewardbench(load_labelled(path, "rewardbench"), ["rb.jsonl:1", "rb.jsonl:2", "rb.jsonl:3"])


def test_rewardbench_json_list(tmp_path):
    path = tmp_path / "rb.json"
    path.write_text(json.dumps(_rb_rows()))
    _check_rewardbench(load_labelled(path, "rewardbench"), ["rb.json[0]", "rb.json[1]", "rb.json[2]"])


def test_rewardbench_parquet(tmp_path):
    path = tmp_path / "rb.parquet"
    pl.DataFrame([{k: r.get(k) for k in ("prompt", "chosen", "rejected", "subset")} for r in _rb_rows()]).write_parquet(
        path
    )
    _check_rewardbench(load_labelled(path, "rewardbench"), ["rb.parquet[0]", "rb.parquet[1]", "rb.parquet[2]"])


def test_rewardbench_limit_keeps_the_first_pairs(tmp_path):
    path = _write_jsonl(tmp_path / "rb.jsonl", _rb_rows())
    assert [p.worse for p in load_labelled(path, "rewardbench", limit=2)] == ["bad", "wrong"]
    assert len(load_labelled(path, "rewardbench", limit=10)) == 3


def test_rewardbench_bad_rows_name_the_line(tmp_path):
    rows = _rb_rows()
    path = _write_jsonl(tmp_path / "rb.jsonl", [rows[0], {"prompt": "p", "chosen": "c"}])
    with pytest.raises(InputError, match=r"rb\.jsonl:2: missing field 'rejected'"):
        load_labelled(path, "rewardbench")
    _write_jsonl(path, [rows[0], rows[1], {**rows[2], "subset": 3}])
    with pytest.raises(InputError, match=r"rb\.jsonl:3: field 'subset' must be str"):
        load_labelled(path, "rewardbench")
    _write_jsonl(path, [rows[0], "[1, 2"])
    with pytest.raises(InputError, match=r"rb\.jsonl:2: invalid JSON"):
        load_labelled(path, "rewardbench")


# --- arguments --------------------------------------------------------------------------------------------------


def test_missing_path_unknown_format_and_bad_limit(tmp_path):
    with pytest.raises(InputError, match="labelled data not found"):
        load_labelled(tmp_path / "nope.jsonl", "rewardbench")
    with pytest.raises(InputError, match="unknown labelled-data format 'csv'.*" + ", ".join(FORMATS)):
        load_labelled(tmp_path, "csv")
    with pytest.raises(InputError, match="limit must be at least 1"):
        load_labelled(tmp_path, "llmbar", limit=0)
    with pytest.raises(InputError, match="is a directory"):
        load_labelled(tmp_path, "hh-rlhf")


def test_empty_jsonl_is_an_error(tmp_path):
    path = tmp_path / "rb.jsonl"
    path.write_text("\n\n")
    with pytest.raises(InputError, match="no labelled pairs found"):
        load_labelled(path, "rewardbench")


# --- accuracy_report --------------------------------------------------------------------------------------------


def test_accuracy_report_counts_ties_as_wrong_and_failures_apart():
    rows = [
        ("chat", 0.9, 0.1),  # correct
        ("chat", 0.5, 0.5),  # tie
        ("chat", 0.2, 0.8),  # wrong
        ("chat", None, 0.3),  # failed
        ("math", 3.0, 1.0),  # correct
        ("math", 2.0, 1.0),  # correct
        ("math", 1.0, None),  # failed
        ("code", None, None),  # failed, nothing scored
    ]
    assert accuracy_report(rows) == {
        "n": 5,
        "correct": 3,
        "accuracy": 0.6,
        "accuracy_ties_half": 0.7,
        "ties": 1,
        "failed": 3,
        "by_subset": {
            "chat": {"n": 3, "correct": 1, "accuracy": 0.3333, "accuracy_ties_half": 0.5, "ties": 1, "failed": 1},
            "code": {"n": 0, "correct": 0, "accuracy": 0.0, "accuracy_ties_half": 0.0, "ties": 0, "failed": 1},
            "math": {"n": 2, "correct": 2, "accuracy": 1.0, "accuracy_ties_half": 1.0, "ties": 0, "failed": 1},
        },
    }
    assert list(accuracy_report(rows)["by_subset"]) == ["chat", "code", "math"]


def test_accuracy_report_of_nothing():
    assert accuracy_report([]) == {"n": 0, "correct": 0, "accuracy": 0.0, "accuracy_ties_half": 0.0, "ties": 0,
                                   "failed": 0, "by_subset": {}}  # fmt: skip


# --- shared data ------------------------------------------------------------------------------------------------


def test_shared_llmbar_and_hh_rlhf_files():
    natural, hh = SHARED / "llmbar" / "natural.json", SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not natural.is_file() or not hh.is_file():
        pytest.skip("shared LLMBar / HH-RLHF data not present")
    pairs = load_labelled(natural, "llmbar")
    assert len(pairs) == 100 and {p.subset for p in pairs} == {"natural"}
    hh_pairs = load_labelled(hh, "hh-rlhf", limit=50)
    assert len(hh_pairs) == 50
    for pair in pairs + hh_pairs:
        assert pair.prompt[-1].role == "user" and pair.prompt[-1].content
        assert pair.better and pair.worse and pair.better != pair.worse
