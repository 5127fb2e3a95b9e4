"""Human review (issue 12): `prefsynth review export` picks the most doubtful pairs and writes what Argilla and
Label Studio import; `prefsynth review import` reads what they export after people labelled, as the scorer
`human`; curation lets those verdicts override the machine's and stats report each scorer against them.

The warehouses are written with the Store directly (known doubt: margins, agreement, flips); the annotated
files are written exactly in each tool's export shape (Argilla's through its own SDK, Label Studio's as its
JSON export documents it), since no tool runs here. The pipeline test runs against a loopback server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from prefsynth import cli, review_cli
from prefsynth.cli import app
from prefsynth.errors import PrefsynthError
from prefsynth.schemas.records import Comparison, Message, Pair, Prompt, Response, Score, StageResult
from prefsynth.tasks.review import HUMAN_ID, chosen_side, decisions, doubt, human_override, rank
from prefsynth.warehouse.store import Store
from tests.conftest import write_jsonl
from tests.fake_server import FakeOpenAI
from tests.test_truth import _good

runner = CliRunner()
# pair, prompt, (chosen, score), (rejected, score): judge `sj`; the second scorer `sc` agrees except on pair c
PAIRS = [("pa", "p1", ("r1a", 9.0), ("r1b", 2.0)),   # margin 7: the surest
         ("pb", "p2", ("r2a", 6.0), ("r2b", 5.0)),   # margin 1: the smallest
         ("pc", "p3", ("r3a", 8.0), ("r3b", 4.0)),   # sc disagrees: agreement 0
         ("pd", "p4", ("r4a", 7.0), ("r4b", 2.0))]   # the pairwise judge flipped on it  # fmt: skip
SC = {"r1a": 1.0, "r1b": 0.0, "r2a": 1.0, "r2b": 0.5, "r3a": 0.1, "r3b": 0.9, "r4a": 0.7, "r4b": 0.2}
TEXT = {r: f"answer {r}" for r in SC}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    for console in (cli.console, review_cli.console):
        monkeypatch.setattr(console, "_width", 1000)  # one line per message: paths are not wrapped


def _warehouse(path: Path, flips: bool = True) -> Path:
    """A completed run `run1` with PAIRS, judge sj, a second scorer sc, and pairwise judge pw's comparisons."""
    with Store(path) as store:
        store.begin_run("run1", "test", "{}", None)
        store.ingest_prompts("run1", [Prompt(prompt_id=p, messages=[Message(role="user", content=f"question {p}")],
                                             source="t", source_ref=p) for p in ("p1", "p2", "p3", "p4")])  # fmt: skip
        store.write("run1", StageResult(*(Response(
            response_id=r, prompt_id=f"p{r[1]}", model="m", model_identity="m", sampling="{}", sample_index=i % 2,
            seed=0, text=TEXT[r], finish_reason="stop", prompt_tokens=None, completion_tokens=None, latency_ms=1.0,
            call_id=f"call-{r}") for i, r in enumerate(SC))))  # fmt: skip
        for sid, name in (("sj", "judge"), ("sc", "second"), ("pw", "pairwise")):
            store.register_scorer(sid, name, "pairwise" if sid == "pw" else "pointwise", "{}")
        judge = {r: v for _, _, *ends in PAIRS for r, v in ends}
        scores = [Score(score_id=f"{sid}-{r}", response_id=r, scorer_id=sid, scorer=sid, value=v, rationale=None,
                        raw="", call_ids=[]) for sid, vals in (("sj", judge), ("sc", SC)) for r, v in vals.items()]
        comps = [Comparison(comparison_id=f"c{p}", scorer_id="pw", prompt_id=p, response_a_id=a, response_b_id=b,
                            winner=None if flipped else "a", score_a=0.5 if flipped else 1.0, consistent=not flipped,
                            flipped=flipped, judgments=2)
                 for p, a, b, flipped in (("p4", "r4a", "r4b", True), ("p1", "r1a", "r1b", False))] if flips else []
        store.write("run1", StageResult(*scores, *comps))
        store.write_pairs("run1", [Pair(pair_id=pid, prompt_id=p, chosen_id=c, rejected_id=r, scorer_id="sj",
                                        rule="{}", score_chosen=sc, score_rejected=sr, margin=sc - sr, source="sampled")
                                   for pid, p, (c, sc), (r, sr) in PAIRS])  # fmt: skip
        store.end_run("run1", "completed", {})
    return path


def _ranked(db: Path, by: str) -> list[str]:
    with Store(db, read_only=True) as store:
        return rank(doubt(*store.review_inputs("run1")), by)["pair_id"].to_list()


def _export(db: Path, out: Path, tool: str, budget: int = 4, by: str = "auto", seed: int = 0) -> str:
    result = runner.invoke(app, ["review", "export", "--db", str(db), "--budget", str(budget), "--format", tool,
                                 "--out", str(out), "--by", by, "--seed", str(seed)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


def _tasks(db: Path) -> dict[str, dict]:
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT * FROM review_tasks").pl().to_dicts()
    return {r["task_id"]: r for r in rows}


def test_each_criterion_ranks_the_pairs_it_doubts_most_first(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    assert _ranked(db, "agreement")[0] == "pc"  # the only pair the second scorer prefers the other way round
    assert _ranked(db, "margin")[:2] == ["pb", "pc"]  # gaps 1 and 4 (one scorer: the same z scale)
    assert _ranked(db, "flips")[0] == "pd"
    assert _ranked(db, "auto") == ["pd", "pc", "pb", "pa"]  # flips, then agreement, then margin
    with Store(db, read_only=True) as store:
        scored = doubt(*store.review_inputs("run1")).sort("pair_id")
    std = pl.Series([9.0, 2.0, 6.0, 5.0, 8.0, 4.0, 7.0, 2.0]).std()
    assert scored["z_margin"].to_list() == pytest.approx([7 / std, 1 / std, 4 / std, 5 / std])
    assert scored["agreement"].to_list() == [1.0, 1.0, 0.0, 1.0] and scored["flips"].to_list() == [0, 0, 0, 1]


def test_a_criterion_the_run_lacks_is_a_clear_error(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb", flips=False)
    assert _ranked(db, "auto") == ["pc", "pb", "pd", "pa"]  # no comparisons: agreement, then margin
    with pytest.raises(PrefsynthError, match="--by flips needs pairwise comparisons"):
        _ranked(db, "flips")
    result = runner.invoke(app, ["review", "export", "--db", str(db), "--budget", "1", "--format", "argilla",
                                 "--out", str(tmp_path / "o"), "--by", "flips"])  # fmt: skip
    assert result.exit_code == 2 and "needs pairwise comparisons" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("by, picked", [("agreement", {"pc"}), ("margin", {"pb", "pc"}), ("flips", {"pd", "pc"}),
                                        ("auto", {"pd", "pc"})])  # fmt: skip
def test_export_sends_the_budget_most_doubtful_pairs(tmp_path, by, picked):
    db = _warehouse(tmp_path / "w.duckdb")
    _export(db, tmp_path / "ls", "label-studio", budget=len(picked), by=by)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert {t["data"]["pair_id"] for t in tasks} == picked
    assert [t["rank"] for t in sorted(_tasks(db).values(), key=lambda t: t["rank"])] == list(range(1, len(picked) + 1))


def test_label_studio_tasks_show_sides_by_seed_and_the_config_uses_pairwise(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    out = _export(db, tmp_path / "ls", "label-studio")
    assert "4 pairs of run run1 by auto" in out
    tasks, stored = json.loads((tmp_path / "ls" / "tasks.json").read_text()), _tasks(db)
    chosen = {pid: (c, r) for pid, _, (c, _), (r, _) in PAIRS}
    for task in tasks:
        assert set(task) == {"data"} and set(task["data"]) == {"task_id", "pair_id", "prompt", "left", "right"}
        row = stored[task["data"]["task_id"]]
        c, r = chosen[row["pair_id"]]
        side = chosen_side(0, row["pair_id"])
        assert row["chosen_side"] == side
        assert (row["left_id"], row["right_id"]) == ((c, r) if side == "left" else (r, c))
        assert task["data"]["left"] == TEXT[row["left_id"]] and task["data"]["right"] == TEXT[row["right_id"]]
        assert task["data"]["prompt"] == f"user: question {row['prompt_id']}"
    assert {chosen_side(s, "pa") for s in range(8)} == {"left", "right"}  # the seed moves the sides
    config = (tmp_path / "ls" / "label_config.xml").read_text()
    assert '<Pairwise name="preference" toName="left,right"/>' in config
    assert '<Text name="left" value="$left"/>' in config and '<Choices name="tie" toName="prompt"' in config
    again = runner.invoke(app, ["review", "export", "--db", str(db), "--budget", "4", "--format", "label-studio",
                                "--out", str(tmp_path / "ls")])  # fmt: skip
    assert again.exit_code == 2 and "already holds tasks.json" in again.output


def _ls_annotated(tasks_file: Path, out: Path, verdicts: dict[str, list[tuple[str, str | None]]]) -> Path:
    """Label Studio's JSON export of these tasks after labelling: {pair_id: [(annotator email, left | right | tie
    | cancel)]} (as its export guide and the Pairwise tag's result show)."""
    exported = []
    for n, task in enumerate(json.loads(tasks_file.read_text()), start=1):
        annotations = []
        for k, (who, pick) in enumerate(verdicts.get(task["data"]["pair_id"], [])):
            result = ([{"id": f"x{k}", "from_name": "preference", "to_name": "left,right", "type": "pairwise",
                        "value": {"selected": pick}, "origin": "manual"}] if pick in ("left", "right") else
                      [{"id": f"t{k}", "from_name": "tie", "to_name": "prompt", "type": "choices",
                        "value": {"choices": ["Tie: neither is better"]}, "origin": "manual"}] if pick == "tie" else [])
            annotations.append({"id": 100 * n + k, "completed_by": {"id": k + 1, "email": who, "first_name": "",
                                                                     "last_name": ""},
                                "result": result, "was_cancelled": pick == "cancel", "ground_truth": False,
                                "created_at": f"2026-11-28T10:0{k}:00.000000Z",
                                "updated_at": f"2026-11-28T10:0{k}:30.000000Z", "lead_time": 4.2, "task": n,
                                "project": 1, "prediction": {}, "result_count": 0})  # fmt: skip
        exported.append({"id": n, "annotations": annotations, "drafts": [], "predictions": [], "data": task["data"],
                         "meta": {}, "created_at": "2026-11-28T09:00:00Z", "updated_at": "2026-11-28T10:10:00Z",
                         "inner_id": n, "total_annotations": len(annotations), "cancelled_annotations": 0,
                         "total_predictions": 0, "comment_count": 0, "project": 1})  # fmt: skip
    out.write_text(json.dumps(exported))
    return out


def _side(db: Path, pid: str, prefer: str) -> str:
    """The side (left/right) on which the pair's `chosen` or `rejected` response was shown."""
    (row,) = [t for t in _tasks(db).values() if t["pair_id"] == pid]
    return row["chosen_side"] if prefer == "chosen" else {"left": "right", "right": "left"}[row["chosen_side"]]


def test_label_studio_round_trip_override_and_accuracy(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    _export(db, tmp_path / "ls", "label-studio")
    picks = {"pc": [("ann@x.org", _side(db, "pc", "rejected")), ("bob@x.org", _side(db, "pc", "rejected"))],
             "pd": [("ann@x.org", _side(db, "pd", "chosen"))], "pb": [("ann@x.org", "tie")],
             "pa": [("ann@x.org", "cancel")]}  # fmt: skip
    annotated = _ls_annotated(tmp_path / "ls" / "tasks.json", tmp_path / "project-1.json", picks)
    first = runner.invoke(app, ["review", "import", str(annotated), "--db", str(db)])
    assert first.exit_code == 0, first.output
    assert "5 verdicts (5 new)" in first.output
    assert "by 2 annotators: chosen 1, rejected 2, tie 1, skip 1" in first.output
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT pair_id, verdict, preferred_id, annotator, labelled_at, tool, source_file, "
                           "scorer_id FROM human_labels ORDER BY pair_id, annotator").fetchall()  # fmt: skip
        human = con.execute("SELECT name, kind FROM scorers WHERE scorer_id = ?", [HUMAN_ID]).fetchone()
    assert human == ("human", "human")
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("pa", "skip", None, "label-studio:ann@x.org"), ("pb", "tie", None, "label-studio:ann@x.org"),
        ("pc", "rejected", "r3b", "label-studio:ann@x.org"), ("pc", "rejected", "r3b", "label-studio:bob@x.org"),
        ("pd", "chosen", "r4a", "label-studio:ann@x.org")]  # fmt: skip
    assert {r[4] for r in rows} == {"2026-11-28T10:00:30.000000Z", "2026-11-28T10:01:30.000000Z"}  # updated_at
    assert {r[5:] for r in rows} == {("label-studio", str(annotated), HUMAN_ID)}

    again = runner.invoke(app, ["review", "import", str(annotated), "--db", str(db)])
    assert again.exit_code == 0 and "5 verdicts (0 new)" in again.output, again.output
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM human_labels").fetchone() == (5,)
        assert con.execute("SELECT count(*) FROM runs WHERE kind = 'review'").fetchone() == (1,)

    with Store(db, read_only=True) as store:
        pairs = store.export_rows("run1")[1]
        curated, counts = human_override(pairs.select(list(Pair.model_fields)), decisions(store.human_labels()))
        stats = store.stats()
    assert counts == {"human_confirmed": 1, "human_flipped": 1, "human_tie_dropped": 1}
    by_prompt = {r["prompt_id"]: r for r in curated.to_dicts()}
    assert set(by_prompt) == {"p1", "p3", "p4"}  # the tie on p2 dropped its pair; the skip on p1 changed nothing
    flipped = by_prompt["p3"]
    assert (flipped["chosen_id"], flipped["rejected_id"], flipped["scorer_id"]) == ("r3b", "r3a", HUMAN_ID)
    assert (flipped["score_chosen"], flipped["score_rejected"]) == (1.0, 0.0) and flipped["pair_id"] != "pc"
    assert by_prompt["p4"]["pair_id"] == "pd" and by_prompt["p1"]["pair_id"] == "pa"

    accuracy = {r["scorer"]: r for r in stats["human_accuracy"]}
    assert set(accuracy) == {"judge", "second"}  # the pairwise judge has no values in `scores` here
    assert (accuracy["judge"]["n"], accuracy["judge"]["accuracy"]) == (2, 0.5)  # wrong on p3, right on p4
    assert (accuracy["second"]["n"], accuracy["second"]["accuracy"], accuracy["second"]["ties"]) == (2, 1.0, 0)
    shown = runner.invoke(app, ["stats", "--db", str(db)], env={"COLUMNS": "250"})
    assert shown.exit_code == 0 and "scorers against human labels" in shown.output

    # labelled pairs are not sent again (the skipped one is)
    later = _export(db, tmp_path / "ls2", "label-studio")
    assert "1 pairs of run run1" in later and "only 1 unlabelled pairs" in later
    assert [t["data"]["pair_id"] for t in json.loads((tmp_path / "ls2" / "tasks.json").read_text())] == ["pa"]


@pytest.mark.parametrize("tool", ["label-studio", "label-studio-created-only", "argilla"])
def test_a_verdict_changed_back_and_forth_across_three_exports_ends_as_the_last(tmp_path, tool):
    """left, then right, then left again, each in a newer cumulative export: the last import is the verdict, even
    where the tool kept the time (Label Studio's created_at of an edited annotation) or has none (Argilla)."""
    db = _warehouse(tmp_path / "w.duckdb")
    fmt = "argilla" if tool == "argilla" else "label-studio"
    _export(db, tmp_path / "out", fmt, budget=2)  # pd and pc
    sent = tmp_path / "out" / ("records.json" if fmt == "argilla" else "tasks.json")
    sides = {"chosen": _side(db, "pd", "chosen"), "rejected": _side(db, "pd", "rejected")}
    steps = [("chosen", 1), ("rejected", 2), ("chosen", 3)]
    for n, (prefer, minute) in enumerate(steps, start=1):
        pick = sides[prefer]
        file = tmp_path / f"export-{n}.json"
        if fmt == "argilla":
            records = json.loads(sent.read_text())
            for r in records:  # pc is labelled in the last export only: each export holds more than the one before
                if r["metadata"]["pair_id"] == "pd" or n == 3:
                    r["responses"] = {"preference": [{"value": pick, "user_id": "u1", "status": "submitted"}]}
            file.write_text(json.dumps(records))
        else:
            _ls_annotated(sent, file, {"pd": [("ann@x.org", pick)], **({"pc": [("bob@x.org", "tie")]} if n == 3
                                                                        else {})})  # fmt: skip
            exported = json.loads(file.read_text())
            for task in exported:
                for a in task["annotations"]:
                    a["created_at"] = "2026-11-28T10:00:00.000000Z"  # the annotation's creation: kept on edits
                    if tool == "label-studio-created-only":
                        del a["updated_at"]
                    else:
                        a["updated_at"] = f"2026-11-28T10:0{minute}:00.000000Z"
            file.write_text(json.dumps(exported))
        result = runner.invoke(app, ["review", "import", str(file), "--db", str(db)])
        assert result.exit_code == 0, result.output
        assert "(0 new)" not in result.output, result.output  # each export's verdicts are new rows
        with Store(db, read_only=True) as store:
            decided = decisions(store.human_labels()).filter(pl.col("a") == "r4a")
        assert decided["winner"].to_list() == [{"chosen": "r4a", "rejected": "r4b"}[prefer]], (n, tool)
    again = runner.invoke(app, ["review", "import", str(tmp_path / "export-3.json"), "--db", str(db)])
    assert again.exit_code == 0 and "(0 new)" in again.output, again.output  # the same file adds nothing
    with Store(db, read_only=True) as store:
        labels = store.human_labels()
    assert labels.filter(pl.col("pair_id") == "pd").height == 3


def _argilla_sdk():
    """Argilla's own SDK (the dev extra), offline: its client checks a server on creation, which is skipped."""
    rg = pytest.importorskip("argilla")
    from argilla._api._client import APIClient

    APIClient._validate_connection = lambda self: None  # no server here; nothing else is called
    rg.Argilla(api_url="http://127.0.0.1:9", api_key="offline")
    return rg


def test_argilla_files_load_with_argillas_own_sdk_and_round_trip(tmp_path, monkeypatch):
    rg = _argilla_sdk()
    from argilla._models import DatasetModel
    from argilla.records._io import GenericIO
    from argilla.records._io._json import JsonIO

    db = _warehouse(tmp_path / "w.duckdb")
    folder = tmp_path / "argilla"
    _export(db, folder, "argilla", budget=2)  # pd and pc
    settings = rg.Settings.from_json(folder / ".argilla" / "settings.json")
    assert [f.name for f in settings.fields] == ["prompt", "left", "right"]
    (question,) = settings.questions
    assert question.name == "preference" and question.labels == ["left", "right", "tie"]
    assert {m.name for m in settings.metadata} == {"task_id", "pair_id"}
    assert DatasetModel(**json.loads((folder / ".argilla" / "dataset.json").read_text())).name.startswith("prefsynth")
    records = JsonIO._records_from_json(folder / "records.json")
    stored = _tasks(db)
    assert {r.id for r in records} == set(stored) and {r.metadata["pair_id"] for r in records} == {"pc", "pd"}
    for r in records:
        assert r.fields["left"] == TEXT[stored[r.id]["left_id"]]

    # what dataset.to_disk writes after people answered: the SDK's own record export
    users = ("0f6b4f34-3c2f-4d8e-9d6a-1c1b7f0e2a11", "5b0c7c0e-8d9a-4e0e-b1a4-3f2d9e8c7b66")
    for r in records:
        pick = _side(db, r.metadata["pair_id"], "rejected" if r.metadata["pair_id"] == "pc" else "chosen")
        for user in users:
            r.responses.add(rg.Response("preference", pick, user_id=user, status="submitted"))
    done = tmp_path / "done"
    shutil.copytree(folder / ".argilla", done / ".argilla")
    (done / "records.json").write_text(json.dumps(GenericIO.to_list(records, flatten=False), default=str))
    assert json.loads((done / "records.json").read_text())[0]["responses"]["preference"][0]["user_id"] in users

    first = runner.invoke(app, ["review", "import", str(done), "--db", str(db)])
    assert first.exit_code == 0 and "4 verdicts (4 new) " in first.output, first.output
    assert "(argilla) by 2 annotators: chosen 2, rejected 2" in first.output
    again = runner.invoke(app, ["review", "import", str(done / "records.json"), "--db", str(db)])
    assert again.exit_code == 0 and "(0 new)" in again.output
    with Store(db, read_only=True) as store:
        labels = store.human_labels()
        decided = decisions(labels)
    assert labels["labelled_at"].is_null().all() and set(labels["annotator"]) == {f"argilla:{u}" for u in users}
    assert decided.select("a", "b", "winner").rows() == [("r3a", "r3b", "r3b"), ("r4a", "r4b", "r4a")]


def test_bad_input_is_a_clear_error_with_exit_2(tmp_path):
    db = _warehouse(tmp_path / "w.duckdb")
    base = ["review", "export", "--db", str(db), "--out", str(tmp_path / "o")]
    for args, message in ((["--budget", "2", "--format", "prodigy"], "--format must be one of argilla, label-studio"),
                          (["--budget", "0", "--format", "argilla"], "--budget must be at least 1"),
                          (["--budget", "2", "--format", "argilla", "--by", "vibes"], "--by must be one of"),
                          (["--budget", "2", "--format", "argilla", "--run", "nope"], "has no run 'nope'")):
        result = runner.invoke(app, base + args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "o").exists()

    def imported(content: object, name: str = "x.json") -> str:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        result = runner.invoke(app, ["review", "import", str(path), "--db", str(db)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        return result.output

    assert "not JSON" in imported("{oops")
    assert "neither Argilla records" in imported([{"text": "a"}])
    assert "expected a non-empty JSON list" in imported({"data": {}})
    foreign = [{"id": 1, "data": {"text": "hi"}, "annotations": [{"result": [], "completed_by": 1}]}]
    assert "no prefsynth task_id: not a task of `prefsynth review export`" in imported(foreign)
    unknown = [{"id": 1, "data": {"task_id": "elsewhere"}, "annotations": [
        {"result": [{"type": "pairwise", "value": {"selected": "left"}}], "completed_by": 1}]}]  # fmt: skip
    assert "task elsewhere is not one that `prefsynth review export` wrote into" in imported(unknown)
    assert "has no verdicts yet" in imported([{"id": 1, "data": {"task_id": "t"}, "annotations": []}])
    missing = runner.invoke(app, ["review", "import", str(tmp_path / "none.json"), "--db", str(db)])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_the_pipeline_lets_human_verdicts_override_its_pairs(tmp_path, prefect_harness):
    prompts = write_jsonl(tmp_path / "p.jsonl", [f"q{i}" for i in range(8)])
    with FakeOpenAI(_good) as server:
        model = {"base_url": server.base_url, "model": "m", "max_retries": 2}
        raw = {"name": "review", "prompts": {"path": str(prompts)},
               "generation": {"models": [model], "samples_per_prompt": 2},
               "scorers": [{"kind": "pointwise_judge", "model": model}], "curation": {"min_margin": 1},
               "warehouse": str(tmp_path / "w.duckdb")}  # fmt: skip
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(raw))
        first = runner.invoke(app, ["run", str(config)])
        assert first.exit_code == 0, first.output
        db = tmp_path / "w.duckdb"
        with Store(db, read_only=True) as store:
            run1, before = store.export_rows()
        assert before.height >= 2  # the precondition: the run made pairs
        _export(db, tmp_path / "ls", "label-studio", budget=2, by="margin")
        sent = [t["data"]["pair_id"] for t in json.loads((tmp_path / "ls" / "tasks.json").read_text())]
        picks = {pid: [("ann@x.org", _side(db, pid, "rejected"))] for pid in sent}
        annotated = _ls_annotated(tmp_path / "ls" / "tasks.json", tmp_path / "done.json", picks)
        assert runner.invoke(app, ["review", "import", str(annotated), "--db", str(db)]).exit_code == 0
        second = runner.invoke(app, ["run", str(config)])
        assert second.exit_code == 0, second.output
        config.write_text(yaml.safe_dump({**raw, "curation": {"min_margin": 1, "human_override": False}}))
        third = runner.invoke(app, ["run", str(config)])
        assert third.exit_code == 0, third.output
    with Store(db, read_only=True) as store:
        run2 = store.con.execute("SELECT run_id FROM runs WHERE kind = 'synthesize' ORDER BY started_at").fetchall()[1]
        after = store.export_rows(run2[0])[1]
        _, unchanged = store.export_rows()
        accuracy = store.stats()["human_accuracy"]
    old = {r["pair_id"]: (r["chosen_id"], r["rejected_id"]) for r in before.to_dicts()}
    new = {(r["chosen_id"], r["rejected_id"]): r for r in after.to_dicts()}
    for pid in sent:
        c, r = old[pid]
        assert (r, c) in new and new[(r, c)]["scorer_id"] == HUMAN_ID and (c, r) not in new
    assert after.height == before.height and run1 != run2[0]
    assert sorted(unchanged["pair_id"]) == sorted(before["pair_id"])  # human_override: false keeps the machine's
    assert [(a["scorer"], a["n"], a["accuracy"]) for a in accuracy] == [("judge", 2, 0.0)]
    exported = runner.invoke(app, ["export", "--db", str(db), "--run", run2[0], "--out", str(tmp_path / "x")])
    assert exported.exit_code == 0, exported.output
    assert "share (0–1) of the annotators who preferred" in (tmp_path / "x" / "README.md").read_text(encoding="utf-8")


def test_the_shipped_examples_are_what_the_tools_read_and_write():
    """examples/review/: the files to import into each tool, and each tool's export after two people labelled."""
    from prefsynth.tasks.review_formats import LABEL_CONFIG, read_export

    rg = _argilla_sdk()
    from argilla.records._io._json import JsonIO

    root = Path(__file__).resolve().parents[1] / "examples" / "review"
    assert (root / "label-studio" / "label_config.xml").read_text() == LABEL_CONFIG
    tasks = json.loads((root / "label-studio" / "tasks.json").read_text())
    for folder in ("argilla", "argilla-labelled"):
        assert [q.name for q in rg.Settings.from_json(root / folder / ".argilla" / "settings.json").questions] == [
            "preference"]  # fmt: skip
        assert len(JsonIO._records_from_json(root / folder / "records.json")) == len(tasks) == 2
    for path, tool in ((root / "label-studio" / "labelled-export.json", "label-studio"),
                       (root / "argilla-labelled", "argilla")):  # fmt: skip
        found, _, _, verdicts = read_export(path)
        assert found == tool and len(verdicts) == 4 and {v["selected"] for v in verdicts} <= {"left", "right"}


def test_each_annotators_latest_verdict_counts_once_and_equal_votes_tie():
    def label(annotator: str, preferred: str | None, verdict: str = "x") -> dict:
        return {"chosen_id": "r1", "rejected_id": "r2", "annotator": annotator, "preferred_id": preferred,
                "verdict": verdict}  # fmt: skip

    rows = pl.DataFrame([label("ann", "r2"), label("bob", "r1"), label("ann", "r1"), label("cy", "r1"),
                         label("dan", None, "skip")])  # fmt: skip
    decided = decisions(rows)  # ann changed her mind: r1 3 votes, r2 0; dan's skip does not count
    assert decided.rows(named=True) == [{"a": "r1", "b": "r2", "winner": "r1", "votes_a": 3, "votes_b": 0, "votes": 3}]
    split = decisions(pl.DataFrame([label("ann", "r2"), label("bob", "r1"), label("cy", None, "tie")]))
    assert split["winner"].to_list() == [None] and split["votes"].to_list() == [3]
    assert decisions(pl.DataFrame([label("dan", None, "skip")])).is_empty()


def test_argilla_discarded_answers_are_skips_and_drafts_are_left_out(tmp_path):
    from prefsynth.tasks.review_formats import read_export

    record = {"id": "t1", "fields": {"prompt": "p"}, "metadata": {"task_id": "t1", "pair_id": "p"},
              "responses": {"preference": [{"value": "left", "user_id": "u1", "status": "submitted"},
                                           {"value": None, "user_id": "u2", "status": "discarded"},
                                           {"value": "right", "user_id": "u3", "status": "draft"},
                                           {"value": "tie", "user_id": "u4"}]}}  # fmt: skip
    (tmp_path / "records.json").write_text(json.dumps([record]))
    tool, _, _, verdicts = read_export(tmp_path)
    assert tool == "argilla"
    assert [(v["annotator"], v["selected"]) for v in verdicts] == [("argilla:u1", "left"), ("argilla:u2", "skip"),
                                                                   ("argilla:u4", "tie")]  # fmt: skip
    record["responses"]["preference"][0]["value"] = "both"
    (tmp_path / "records.json").write_text(json.dumps([record]))
    with pytest.raises(PrefsynthError, match="answer 'both' to `preference` is not left, right or tie"):
        read_export(tmp_path / "records.json")


def test_export_ranks_without_texts_and_formats_only_the_pairs_it_sends(tmp_path, monkeypatch):
    from prefsynth.tasks import review_formats

    db = _warehouse(tmp_path / "w.duckdb")
    with Store(db, read_only=True) as store:
        pairs = store.review_inputs("run1")[0]
    assert len(pairs) == 4 and not {"prompt_messages", "chosen_text", "rejected_text"} & set(pairs.columns)
    formatted = []
    real = review_formats.conversation
    monkeypatch.setattr(review_formats, "conversation", lambda m: formatted.append(m) or real(m))
    _export(db, tmp_path / "ls", "label-studio", budget=1)
    assert len(formatted) == 1  # only the pair sent, of the 4 candidates
    (task,) = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert task["data"]["pair_id"] == "pd" and task["data"]["prompt"] == "user: question p4"
    assert {task["data"]["left"], task["data"]["right"]} == {TEXT["r4a"], TEXT["r4b"]}


def test_review_and_report_pick_a_pipeline_run_the_same_way(tmp_path):
    from prefsynth.errors import WarehouseError

    db = _warehouse(tmp_path / "w.duckdb")
    with Store(db) as store:
        store.begin_run("ev", "an eval", "{}", None, kind="eval")
        store.begin_run("busy", "still running", "{}", None)
        assert store.pipeline_run(None) == "run1"  # the newest completed
        assert store.pipeline_run(None, completed=False) == "run1"  # a completed one comes before one running
        assert store.pipeline_run("busy") == "busy"
        with pytest.raises(WarehouseError, match="run 'ev' is a `prefsynth eval` run, not a pipeline run"):
            store.pipeline_run("ev")
        store.con.execute("DELETE FROM run_ends")
        with pytest.raises(WarehouseError, match="has no completed pipeline run"):
            store.pipeline_run(None)
        assert store.pipeline_run(None, completed=False) in {"run1", "busy"}
    result = runner.invoke(app, ["review", "export", "--db", str(db), "--out", str(tmp_path / "o"), "--budget", "1",
                                 "--format", "argilla"])  # fmt: skip
    assert result.exit_code == 2 and "has no completed pipeline run" in result.output, result.output
    result = runner.invoke(app, ["review", "export", "--db", str(db), "--out", str(tmp_path / "o"), "--budget", "1",
                                 "--format", "argilla", "--run", "ev"])  # fmt: skip
    assert result.exit_code == 2 and "is a `prefsynth eval` run" in " ".join(result.output.split()), result.output
