import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from prefsynth.errors import ConfigError, InputError, PrefsynthError
from prefsynth.schemas.records import Message
from prefsynth.tasks.labelled import FORMATS, accuracy_report, check_keys, load_labelled, load_labelled_report
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
    (tmp_path / "a_first.json").write_text(json.dumps([{**rows[0], "input": "Say hello"}]))
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
        {"chosen": _hh("Human: q", "Assistant:  "), "rejected": _hh("Human: q", "Assistant: no")},  # empty: kept
        {"chosen": _hh("Human: q", "Assistant: a", "Assistant: b"), "rejected": _hh("Human: q", "Assistant: a")},
        {"chosen": "no markers at all", "rejected": "no markers at all"},
        {"chosen": _hh("Human: q", "Assistant: "), "rejected": _hh("Human: q", "Assistant:\n")},  # both empty
        "",
        good,
    ]
    path = _write_jsonl(tmp_path / "hh.jsonl.gz", rows)
    data = load_labelled_report(path, "hh-rlhf")
    assert data.skipped_by_reason == {"unusable": 3, "identical": 1} and data.duplicates == 0
    assert [(p.better, p.worse, p.source_ref) for p in data.pairs] == [("", "no", "hh.jsonl.gz:2"),
                                                                       ("yes", "no", "hh.jsonl.gz:7")]  # fmt: skip
    assert load_labelled(path, "hh-rlhf") == data.pairs


def test_hh_rlhf_with_only_skipped_rows_is_an_error(tmp_path):
    row = {"chosen": _hh("Human: q", "Assistant: "), "rejected": _hh("Human: q", "Assistant:  ")}
    path = _write_jsonl(tmp_path / "hh.jsonl", [row, {"chosen": "x", "rejected": "y"}])
    with pytest.raises(InputError, match=r"no labelled pairs found \(2 rows skipped: 1 identical, 1 unusable\)"):
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


# --- screening: duplicates, identical and empty replies -----------------------------------------------------


def test_a_pair_read_twice_is_kept_once_under_its_first_occurrence(tmp_path):
    a, b = _llmbar_rows()
    swapped = {**a, "output_1": a["output_2"], "output_2": a["output_1"], "label": 2}  # same pair, shown the other way
    path = tmp_path / "dup.json"
    path.write_text(json.dumps([a, b, a, swapped]))
    data = load_labelled_report(path, "llmbar")
    assert [p.source_ref for p in data.pairs] == ["dup.json[0]", "dup.json[1]"]
    assert data.pairs[0].better_first  # the first occurrence's order is kept
    assert data.duplicates == 2 and data.skipped == 0
    assert data.counts() == {"pairs": 2, "duplicates": 2, "skipped": 0, "skipped_by_reason": {}}


def test_opposite_labels_on_the_same_replies_are_two_pairs(tmp_path):
    a = _llmbar_rows()[0]
    path = tmp_path / "x.json"
    path.write_text(json.dumps([a, {**a, "label": 2}]))
    data = load_labelled_report(path, "llmbar")
    assert [(p.better, p.worse) for p in data.pairs] == [("hi", "bye"), ("bye", "hi")] and data.duplicates == 0


def test_a_pair_in_two_llmbar_files_counts_in_the_first_subset(tmp_path):
    rows = _llmbar_rows()
    (tmp_path / "a.json").write_text(json.dumps(rows[:1]))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    data = load_labelled_report(tmp_path, "llmbar")
    assert [(p.subset, p.source_ref) for p in data.pairs] == [("a", "a.json[0]"), ("b", "b.json[1]")]
    assert data.duplicates == 1


def test_identical_replies_are_skipped_and_counted(tmp_path):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": " same\n", "rejected": "same"},  # differs only in surrounding whitespace
            {"prompt": "p", "chosen": "", "rejected": "  "},  # both empty
            {"prompt": "p", "chosen": "same", "rejected": "Same"}]  # fmt: skip
    path = _write_jsonl(tmp_path / "rb.jsonl", rows)
    data = load_labelled_report(path, "rewardbench")
    assert [(p.better, p.worse) for p in data.pairs] == [("same", "Same")]
    assert data.counts() == {"pairs": 1, "duplicates": 0, "skipped": 3, "skipped_by_reason": {"identical": 3}}
    _write_jsonl(path, rows[:3])
    with pytest.raises(InputError, match=r"rb\.jsonl: no labelled pairs found \(3 rows skipped: 3 identical\)"):
        load_labelled(path, "rewardbench")


def test_one_empty_reply_is_a_pair_to_evaluate(tmp_path):
    rows = [{"prompt": "p", "chosen": "An answer.", "rejected": ""}, {"prompt": "q", "chosen": "", "rejected": "Harm."}]
    path = _write_jsonl(tmp_path / "rb.jsonl", rows)
    assert [(p.better, p.worse) for p in load_labelled(path, "rewardbench")] == [("An answer.", ""), ("", "Harm.")]
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"input": "q", "output_1": "", "output_2": "b", "label": 2}]))
    assert [(p.better, p.worse) for p in load_labelled(path, "llmbar")] == [("b", "")]


def test_limit_counts_kept_pairs(tmp_path):
    rows = _rb_rows()
    path = _write_jsonl(tmp_path / "rb.jsonl", [rows[0], rows[0], {"prompt": "p", "chosen": "x", "rejected": "x"},
                                                 rows[1], rows[2]])  # fmt: skip
    data = load_labelled_report(path, "rewardbench", limit=2)
    assert [p.source_ref for p in data.pairs] == ["rb.jsonl:1", "rb.jsonl:4"]
    assert (data.duplicates, data.skipped) == (1, 1)


# --- keys checked before any model call ----------------------------------------------------------------------


def _scorer(name: str, scorer_id: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, scorer_id=scorer_id)


def test_check_keys_refuses_a_pair_twice_or_two_scorers_with_one_id(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(_llmbar_rows()))
    pairs = load_labelled(path, "llmbar")
    check_keys(pairs, [_scorer("a", "1"), _scorer("b", "2")])  # distinct keys: passes
    with pytest.raises(PrefsynthError, match="1 appear more than once"):
        check_keys([*pairs, pairs[0]], [_scorer("a", "1")])
    with pytest.raises(ConfigError, match="scorers a, c are the same scorer"):
        check_keys(pairs, [_scorer("a", "1"), _scorer("b", "2"), _scorer("c", "1")])


def test_summary_frame_shows_duplicates_and_skipped():
    from prefsynth.flows.evaluate import summary_frame  # imports the flows: here, not for every test

    report = {**accuracy_report([("s", 1.0, 0.0)]), "position_consistency": None}
    result = {"duplicates": 2, "skipped": 3, "scorers": {"cdr": report}}
    row = summary_frame(result).row(0, named=True)
    assert (row["scorer"], row["n"], row["duplicates"], row["skipped"], row["acc[s]"]) == ("cdr", 1, 2, 3, 1.0)


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
    # the whole HH-RLHF harmless test set: 4 pairs with one empty reply are kept, none is read twice
    data = load_labelled_report(hh, "hh-rlhf")
    assert sum(not p.better or not p.worse for p in data.pairs) == 4
    assert data.duplicates == 0 and len({p.pair_key for p in data.pairs}) == len(data.pairs)
