"""Exports for margin-aware training: `margin` only for a chosen mode, `source` and `score_gap` on every row,
the dataset card's units, the OpenRLHF format, the CLI's --margin and the pipeline's `margin:` (issue 11).

The warehouses are written with the Store directly (no model); the pipeline test runs against a loopback
server, as test_truth.py does, since it checks what the export writes, not what a model says.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import duckdb
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from prefsynth import cli
from prefsynth.backends.client import Endpoint
from prefsynth.cli import app
from prefsynth.errors import ConfigError, ExportError
from prefsynth.schemas.config import parse_config
from prefsynth.schemas.records import Message, Pair, Prompt, Response, StageResult
from prefsynth.tasks.card import score_unit
from prefsynth.tasks.export import write_dataset
from prefsynth.tasks.scorers import build_scorer
from prefsynth.warehouse.store import Store
from tests.conftest import write_jsonl
from tests.fake_server import FakeOpenAI
from tests.test_truth import _good

runner = CliRunner()
JUDGE = {"kind": "pointwise", "models": {"judge": "m"}, "scale_min": 1, "scale_max": 9}
TEACHER = {"kind": "pointwise", "models": {"judge": "t"}, "scale_min": 1, "scale_max": 10}
# (pair, prompt, chosen, rejected, scorer, score_chosen, score_rejected, stored margin, source)
SAMPLED = [("a", "p1", "r1a", "r1b", "sj", 8.0, 2.0, 6.0, "sampled"),
           ("b", "p2", "r2a", "r2b", "sj", 9.0, 6.0, 3.0, "sampled")]  # fmt: skip
REFINED = [("c", "p1", "r1t", "r1b", "st", 7.0, 2.0, 4.0, "teacher_refinement")]
ANCHORED = [("d", "p2", "r2t", "r2b", "sj", 9.5, 6.0, 3.5, "teacher_anchor")]  # scored by the judge, not calibrated


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli.console, "_width", 1000)  # one line per message: paths are not wrapped


def _warehouse(path: Path, pairs: list[tuple]) -> Path:
    """A completed run `run1` with these pairs, their prompts and responses, and scorers sj (judge, 1-9) and
    st (teacher, 1-10)."""
    texts = {r: f"answer {r}" for p in pairs for r in p[2:4]}
    with Store(path) as store:
        store.begin_run("run1", "test", "{}", None)
        store.ingest_prompts("run1", [Prompt(prompt_id=p, messages=[Message(role="user", content=f"question {p}")],
                                             source="t", source_ref=p) for p in ("p1", "p2")])  # fmt: skip
        store.write("run1", StageResult(*(Response(
            response_id=r, prompt_id=f"p{r[1]}", model="m", model_identity="m", sampling="{}", sample_index=i,
            seed=0, text=text, finish_reason="stop", prompt_tokens=None, completion_tokens=None, latency_ms=1.0,
            call_id=f"call-{r}") for i, (r, text) in enumerate(texts.items()))))  # fmt: skip
        store.register_scorer("sj", "judge", "pointwise", json.dumps(JUDGE))
        store.register_scorer("st", "teacher", "pointwise", json.dumps(TEACHER))
        fields = ("pair_id", "prompt_id", "chosen_id", "rejected_id", "scorer_id", "score_chosen", "score_rejected",
                  "margin", "source")  # fmt: skip
        store.write_pairs("run1", [Pair(**dict(zip(fields, p, strict=True)), rule="{}") for p in pairs])
        store.end_run("run1", "completed", {})
    return path


def _export(db: Path, out: Path, fmt: str = "trl", margin: str = "none") -> list[dict]:
    with Store(db, create=False) as store:
        _, rows = store.export_rows()
        scorers = store.scorers_of(rows["scorer_id"])
    write_dataset(rows, out, fmt, margin=margin, scorers=scorers, run_id="run1")
    return _export_loaded(out)


def _export_loaded(out: Path) -> list[dict]:
    """The rows as a user loads the folder, with datasets' cache in the test's folder."""
    return list(datasets.load_dataset(str(out), split="train", cache_dir=str(out.parent / "hf-cache")))


def _by_pair(rows: list[dict], col: str) -> dict[str, object]:
    return {r["pair_id"]: r.get(col, "absent") for r in rows}


def test_the_default_export_has_no_margin_but_source_and_score_gap_on_every_row(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb", SAMPLED + REFINED)
    for fmt in ("trl", "jsonl", "openrlhf"):
        rows = _export(db, tmp_path / fmt, fmt)
        assert len(rows) == 3 and all("margin" not in r for r in rows), fmt
        assert _by_pair(rows, "score_gap") == {"a": 6.0, "b": 3.0, "c": 5.0}
        assert _by_pair(rows, "source") == {"a": "sampled", "b": "sampled", "c": "teacher_refinement"}


@pytest.mark.parametrize(("mode", "expected"), [
    ("raw", {"a": 6.0, "b": 3.0, "c": 5.0}),  # = score_gap
    ("scaled", {"a": 1.0, "b": 0.5, "c": 1.0}),  # / the largest gap of the same source and scorer
    ("teacher", {"a": 0.0, "b": 0.0, "c": 4.0}),  # the stored teacher gap; 0 for sampled pairs
])  # fmt: skip
def test_each_margin_mode_writes_a_value_on_every_row(tmp_path, mode, expected):
    db = _warehouse(tmp_path / "w.duckdb", SAMPLED + REFINED)
    for fmt in ("trl", "openrlhf"):
        rows = _export(db, tmp_path / fmt, fmt, mode)
        assert _by_pair(rows, "margin") == expected, fmt  # never null: TRL's collator looks at the first row
        assert _by_pair(rows, "score_gap") == {"a": 6.0, "b": 3.0, "c": 5.0}


def test_teacher_margins_are_only_the_teachers_calibrated_gaps(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb", SAMPLED + REFINED + ANCHORED)
    rows = _export(db, tmp_path / "trl", "trl", "teacher")
    assert _by_pair(rows, "margin") == {"a": 0.0, "b": 0.0, "c": 4.0, "d": 0.0}
    assert _by_pair(rows, "score_gap")["d"] == 3.5  # the anchor's gap is kept, in the judge's units


def test_teacher_margins_without_teacher_pairs_are_refused_naming_the_sources(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb", SAMPLED)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"'teacher' needs teacher pairs .*: 2 sampled; choose .* raw, scaled"):
        _export(db, out, "trl", "teacher")
    assert not out.exists()  # refused before the folder is made


def test_the_card_states_run_format_pairs_per_source_mode_and_units(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb", SAMPLED + REFINED)
    out = tmp_path / "out"
    _export(db, out, "trl", "scaled")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\ntags:\n- prefsynth\n")
    assert "`train.parquet` holds 3 pairs of run `run1` in the `trl` format" in card
    assert ("| sampled | 2 | `judge` (pointwise, id `sj`) | points on scorer `judge`'s 1–9 scale | "
            "`score_gap` / 6 |") in card  # fmt: skip
    assert ("| teacher_refinement | 1 | `teacher` (pointwise, id `st`) | points on scorer `teacher`'s 1–10 scale | "
            "`score_gap` / 5 |") in card  # fmt: skip
    assert "## Margin mode: `scaled`" in card and "`score_gap` = `score_chosen` - `score_rejected`" in card

    _export(db, tmp_path / "none", "openrlhf")
    card = (tmp_path / "none" / "README.md").read_text(encoding="utf-8")
    assert "## Margin mode: `none`" in card and "There is no `margin` column" in card
    assert "`openrlhf.jsonl` holds 3 pairs" in card and "--data.chosen_key chosen" in card


def test_a_card_names_the_files_of_other_exports_it_does_not_describe(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb", SAMPLED)
    _export(db, tmp_path, "trl", "raw")
    with Store(db, create=False) as store:
        write_dataset(store.export_rows()[1], tmp_path, "jsonl", run_id="run1")
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "`train.jsonl` holds 2 pairs" in card and "Other files here (`train.parquet`)" in card


def test_a_folder_exported_again_loads_its_new_rows(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb", SAMPLED)
    out = tmp_path / "out"
    assert "margin" not in _export(db, out)[0]
    with Store(db, create=False) as store:
        write_dataset(store.export_rows()[1], out, "trl", overwrite=True, margin="raw", run_id="run1")
    assert [r["margin"] for r in _export_loaded(out)] == [6.0, 3.0]  # not datasets' cached copy of the first


def test_the_openrlhf_file_holds_whole_conversations_under_its_default_keys(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb", SAMPLED)
    _export(db, tmp_path, "openrlhf", "raw")
    first = json.loads((tmp_path / "openrlhf.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert list(first)[:4] == ["chosen", "rejected", "margin", "source"] and "prompt" not in first
    assert first["chosen"] == [{"role": "user", "content": "question p1"},
                               {"role": "assistant", "content": "answer r1a"}]  # fmt: skip
    assert first["rejected"][-1] == {"role": "assistant", "content": "answer r1b"} and first["margin"] == 6.0


MODEL = {"base_url": "http://x/v1", "model": "m"}


def _config_json(spec: dict) -> tuple[str, dict]:
    config = parse_config({"prompts": {"builtin": "quickstart"}, "generation": {"models": [MODEL]}, "scorers": [spec]})
    endpoint = Endpoint(label="m", identity="fake#m", base_url="http://x/v1", model="m", api_key="", concurrency=1,
                        timeout_s=1, max_retries=0, is_local=False)  # fmt: skip
    scorer = build_scorer(config.scorers[0], lambda _spec: endpoint)
    return scorer.kind, json.loads(scorer.config_json)


@pytest.mark.parametrize(("spec", "unit"), [
    ({"kind": "pointwise_judge", "model": MODEL, "scale_min": 0, "scale_max": 5}, "points on scorer `s`'s 0–5 scale"),
    ({"kind": "cdr", "strong": MODEL, "weak": MODEL}, "CDR log-ratio log p_strong - log p_weak per token"),
    ({"kind": "cdr", "strong": MODEL, "weak": MODEL, "value": "sum"}, "log p_weak summed over tokens"),
    ({"kind": "pairwise_judge", "model": MODEL}, "share (0–1) of its pairwise comparisons a response won"),
    ({"kind": "reward_model", "model": MODEL}, "reward-model output of scorer `s`"),
])  # fmt: skip
def test_units_come_from_the_stored_config_of_each_scorer_kind(spec, unit):
    kind, config = _config_json(spec)
    assert unit in score_unit("s", kind, config)


def test_panel_and_unknown_scorers_units():
    assert "mean z-score" in score_unit("p", "panel", {"members": ["a", "b"], "aggregate": "mean_normalized"})
    assert "Copeland" in score_unit("p", "panel", {"members": ["a", "b"], "aggregate": "majority"})
    assert score_unit("x", "pointwise", {"kind": "pointwise", "models": {}}) == "scorer `x`'s own units"
    assert "1–10 scale" in score_unit("teacher", "teacher", {"kind": "teacher", "models": {"teacher": "m"}})


def test_cli_margin_option_and_a_bad_value(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb", SAMPLED + REFINED)
    result = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "raw"), "--margin", "raw"])
    assert result.exit_code == 0 and "3 pairs from run run1" in result.output and "(margin: raw)" in result.output
    assert pl.read_parquet(tmp_path / "raw" / "train.parquet")["margin"].sort().to_list() == [3.0, 5.0, 6.0]
    result = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "o"), "--format", "openrlhf"])
    assert result.exit_code == 0 and "margin" not in json.loads((tmp_path / "o" / "openrlhf.jsonl").read_text(
        encoding="utf-8").splitlines()[0])  # fmt: skip
    with duckdb.connect(str(db), read_only=True) as con:  # each snapshot records its margin mode
        snaps = con.execute("SELECT format, margin FROM dataset_snapshots ORDER BY format").fetchall()
    assert snaps == [("openrlhf", "none"), ("trl", "raw")]
    empty = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "sft"), "--format", "sft"])
    assert empty.exit_code == 0 and "no anchors (a run with `teacher.anchors: true` has them)" in empty.output

    bad = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "bad"), "--margin", "big"])
    assert bad.exit_code == 2 and "--margin must be one of none, raw, scaled, teacher, got 'big'" in bad.output
    assert not (tmp_path / "bad").exists()
    sampled = _warehouse(tmp_path / "s.duckdb", SAMPLED)
    refused = runner.invoke(app, ["export", "--db", str(sampled), "--out", str(tmp_path / "t"), "--margin", "teacher"])
    assert refused.exit_code == 2 and "error: margin mode 'teacher' needs teacher pairs" in refused.output
    assert "2 sampled" in refused.output and "Traceback" not in refused.output and not (tmp_path / "t").exists()
    help_text = runner.invoke(app, ["export", "--help"]).output
    assert "--margin" in help_text and "openrlhf" in help_text


def test_a_config_with_an_unknown_margin_mode_names_the_field():
    raw = {"prompts": {"builtin": "quickstart"}, "generation": {"models": [MODEL]},
           "scorers": [{"kind": "pointwise_judge", "model": MODEL}],
           "export": [{"path": "o", "margin": "big"}]}  # fmt: skip
    with pytest.raises(ConfigError, match="export.0.margin: Input should be 'none', 'raw', 'scaled' or 'teacher'"):
        parse_config(raw)
    assert parse_config({**raw, "export": [{"path": "o"}]}).export[0].margin == "none"
    with pytest.raises(ConfigError, match="export.0.margin teacher .* add the curation rule refined_vs_original"):
        parse_config({**raw, "export": [{"path": "o", "margin": "teacher"}]})  # known before any model call


def test_the_pipeline_export_honours_each_targets_margin(tmp_path, prefect_harness):
    prompts = write_jsonl(tmp_path / "p.jsonl", [f"q{i}" for i in range(8)])
    with FakeOpenAI(_good) as server:
        model = {"base_url": server.base_url, "model": "m", "max_retries": 2}
        raw = {"name": "margins", "prompts": {"path": str(prompts)},
               "generation": {"models": [model], "samples_per_prompt": 2},
               "scorers": [{"kind": "pointwise_judge", "model": model}], "curation": {"min_margin": 1},
               "export": [{"format": "trl", "path": str(tmp_path / "raw"), "margin": "raw"},
                          {"format": "openrlhf", "path": str(tmp_path / "plain")}],
               "warehouse": str(tmp_path / "w.duckdb")}  # fmt: skip
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(raw))
        result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    with_margin = pl.read_parquet(tmp_path / "raw" / "train.parquet")
    assert with_margin.height > 0  # the precondition: the run made pairs
    assert with_margin["margin"].to_list() == with_margin["score_gap"].to_list()
    assert (with_margin["score_gap"] >= 1).all() and with_margin["source"].unique().to_list() == ["sampled"]
    plain = [json.loads(line) for line in (tmp_path / "plain" / "openrlhf.jsonl").read_text().splitlines()]
    assert len(plain) == with_margin.height and all("margin" not in r and r["score_gap"] >= 1 for r in plain)
    card = (tmp_path / "raw" / "README.md").read_text(encoding="utf-8")
    assert "## Margin mode: `raw`" in card and "points on scorer `judge`'s 1–10 scale" in card
    assert "## Margin mode: `none`" in (tmp_path / "plain" / "README.md").read_text(encoding="utf-8")


def test_a_snapshot_is_listed_and_written_again_byte_for_byte(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb", SAMPLED + REFINED)
    first = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "v1"), "--margin", "raw"])
    assert first.exit_code == 0 and "3 pairs from run run1" in first.output, first.output
    listed = runner.invoke(app, ["datasets", "--db", str(db)], env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and "trl" in listed.output and "raw" in listed.output
    with duckdb.connect(str(db), read_only=True) as con:
        snap, sha, counts = con.execute("SELECT snapshot_id, file_sha256, counts FROM dataset_snapshots").fetchone()
        assert con.execute("SELECT count(*) FROM snapshot_rows").fetchone() == (3,)
    assert json.loads(counts) == {"sampled": 2, "teacher_refinement": 1} and snap[:12] in listed.output

    again = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "again"), "--snapshot", snap[:10]])
    assert again.exit_code == 0 and "byte-for-byte the same" in again.output, again.output
    for name in ("train.parquet", "README.md"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "v1" / name).read_bytes()
    assert hashlib.sha256((tmp_path / "again" / "train.parquet").read_bytes()).hexdigest() == sha
    missing = runner.invoke(app, ["export", "--db", str(db), "--out", str(tmp_path / "x"), "--snapshot", "nope"])
    assert missing.exit_code == 2 and "no snapshot 'nope'" in missing.output
