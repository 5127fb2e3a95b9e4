import json

import polars as pl
import pytest

from prefsynth.errors import InputError, PrefsynthError
from prefsynth.schemas.config import PromptSource
from prefsynth.tasks.ingest import load_prompts
from prefsynth.warehouse.store import Store


def test_builtin_quickstart_set_is_large_diverse_and_unique():
    got = load_prompts(PromptSource(builtin="quickstart"))
    assert len(got.prompts) >= 40 and got.duplicates == 0
    texts = [p.messages[-1].content for p in got.prompts]
    assert len({t.split()[0].lower() for t in texts}) > 10  # not one template repeated


def test_jsonl_normalizes_and_drops_exact_duplicates(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "  Hello\r\nworld "}, {"prompt": "Hello\nworld"}, {"prompt": "Other"}, {}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n")
    got = load_prompts(PromptSource(path=str(path)))
    assert [p.messages[0].content for p in got.prompts] == ["Hello\nworld", "Other"]
    assert got.read == 3 and got.duplicates == 1
    assert got.prompts[0].source_ref == "1"


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
    with pytest.raises(InputError, match=r"p.jsonl:3: invalid JSON"):
        load_prompts(PromptSource(path=str(path)))


def test_record_without_prompt_is_reported_with_its_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(InputError, match=r"p.jsonl:2: record has no non-empty 'prompt'"):
        load_prompts(PromptSource(path=str(path)))


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    with pytest.raises(InputError, match="no prompts found"):
        load_prompts(PromptSource(path=str(path)))


@pytest.mark.parametrize("name, body, line", [
    ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', 2),
    ("p.json", b'[\n{"prompt": "a"},\n{"prompt": "\xff"}]', 3),
    ("p.csv", b"prompt\nhello\nna\xefve\n", 3),
])  # fmt: skip
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, name, body, line):
    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(InputError, match=rf"{name}:{line}: not UTF-8 text \(byte \d+: .*save the file as UTF-8"):
        load_prompts(PromptSource(path=str(path)))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(InputError, match="prompt file not found"):
        load_prompts(PromptSource(path=str(tmp_path / "none.csv")))


def test_messages_and_system_prompt(tmp_path):
    path = tmp_path / "p.json"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    path.write_text(json.dumps([{"messages": msgs}, {"prompt": "d", "sys": "Be terse."}]))
    got = load_prompts(PromptSource(path=str(path), system_field="sys"), system_prompt="Default.")
    assert [m.role for m in got.prompts[0].messages] == ["system", "user", "assistant", "user"]
    assert got.prompts[0].messages[0].content == "Default."
    assert got.prompts[1].messages[0].content == "Be terse."
    path.write_text(json.dumps([{"messages": msgs[:2]}]))
    with pytest.raises(InputError, match=r"p.json\[0\]: the last message"):
        load_prompts(PromptSource(path=str(path)))


def test_csv_parquet_and_limit(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text('question,id\n"What is 2+2?",1\n"Name a color, please",2\n"",3\n')
    with pytest.raises(InputError, match=r"p.csv:4"):
        load_prompts(PromptSource(path=str(csv), prompt_field="question"))
    csv.write_text('question,id\n"What is 2+2?",1\n"Name a color, please",2\n')
    got = load_prompts(PromptSource(path=str(csv), prompt_field="question"))
    assert [p.messages[0].content for p in got.prompts] == ["What is 2+2?", "Name a color, please"]
    pq = tmp_path / "p.parquet"
    pl.DataFrame({"prompt": ["x", "y", "z"]}).write_parquet(pq)
    assert len(load_prompts(PromptSource(path=str(pq), limit=2)).prompts) == 2


def test_hugging_face_dataset_on_disk(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"prompt": ["a", "b"]})
    datasets.DatasetDict({"train": train, "test": datasets.Dataset.from_dict({"prompt": ["c"]})}).save_to_disk(
        tmp_path / "ds"
    )
    assert len(load_prompts(PromptSource(hf_dataset=str(tmp_path / "ds"))).prompts) == 2
    assert len(load_prompts(PromptSource(hf_dataset=str(tmp_path / "ds"), split="test")).prompts) == 1
    with pytest.raises(InputError, match="choose `split`"):
        load_prompts(PromptSource(hf_dataset=str(tmp_path / "ds"), split="dev"))


def test_warehouse_table_rows():
    rows = [{"prompt": "from a table"}, {"prompt": "from a table"}]
    got = load_prompts(PromptSource(warehouse_table="my_prompts"), table_rows=rows)
    assert len(got.prompts) == 1 and got.prompts[0].source == "my_prompts"


def test_a_warehouse_table_in_a_schema_is_read(tmp_path):
    with Store(tmp_path / "w.duckdb") as store:
        store.con.execute("CREATE SCHEMA src; CREATE TABLE src.my_prompts AS SELECT 'from a schema' AS prompt")
        rows = store.prompts_from_table("src.my_prompts").to_dicts()
        with pytest.raises(PrefsynthError, match="no table or view named 'src.missing'"):
            store.prompts_from_table("src.missing")
    got = load_prompts(PromptSource(warehouse_table="src.my_prompts"), table_rows=rows)
    assert [p.messages[0].content for p in got.prompts] == ["from a schema"]


@pytest.mark.parametrize("name", ["a.b.c", "a..b", ".a", "a.", 'my"table', "a. "])
def test_a_warehouse_table_name_must_be_name_or_schema_dot_name(name):
    with pytest.raises(ValueError, match="`warehouse_table` must be NAME or SCHEMA.NAME"):
        PromptSource(warehouse_table=name)


def test_a_quoted_warehouse_table_name_needs_no_identifier_rules(tmp_path):
    with Store(tmp_path / "w.duckdb") as store:
        store.con.execute('CREATE TABLE "my-prompts" AS SELECT \'hyphen\' AS prompt')
        rows = store.prompts_from_table("my-prompts").to_dicts()
    got = load_prompts(PromptSource(warehouse_table="my-prompts"), table_rows=rows)
    assert [p.messages[0].content for p in got.prompts] == ["hyphen"]
