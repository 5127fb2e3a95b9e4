"""Teacher refinement, calibrated scoring and anchors (issue 11): parsers and rules without a model, the
repair path and the identical-text drop with replies injected by the loopback server, and one run on the real
embedded model (lineage, edit distances, margins, the min_gap filter, stats, a rerun without calls)."""

from __future__ import annotations

import asyncio
import json

import duckdb
import polars as pl
import pytest
from rapidfuzz.distance import Levenshtein
from typer.testing import CliRunner

from prefsynth.backends.client import Endpoint, ModelClient
from prefsynth.cli import app
from prefsynth.errors import ConfigError
from prefsynth.flows.synthesize import synthesize
from prefsynth.schemas.config import TeacherSpec
from prefsynth.schemas.records import Failure, Message, ModelCall, Refinement, Response
from prefsynth.tasks.curate import anchor_vs_sampled, refined_vs_original
from prefsynth.tasks.teacher import RefineItem, Teacher, parse_revision, parse_revision_json
from tests.conftest import small_config, write_jsonl
from tests.fake_server import FakeOpenAI, chat_reply

# ---- parsing ---------------------------------------------------------------------------------------


def test_a_tagged_refinement_parses_with_its_kind():
    rev = parse_revision("Sure.\n<explanation>Wrong city.</explanation>\n<kind>Correctness</kind>\n"
                         "<revised>\nThe capital is Paris.\n</revised>")  # fmt: skip
    assert (rev.explanation, rev.kind, rev.text) == ("Wrong city.", "correctness", "The capital is Paris.")


def test_free_text_before_the_revision_is_the_explanation_and_an_unknown_kind_is_other():
    rev = parse_revision("It names the wrong city. <kind>geography</kind> <revised>Paris.</revised>")
    assert (rev.explanation, rev.kind, rev.text) == ("It names the wrong city.", "other", "Paris.")


@pytest.mark.parametrize("text, problem", [
    ("The capital is Paris.", "there is no <revised>...</revised> block"),
    ("<explanation>x</explanation><revised>Paris, and then the reply was cut", "not closed"),
    ("<explanation>x</explanation><revised>  </revised>", "the <revised> block is empty"),
    ("<revised>Paris.</revised>", "there is no <explanation>"),
])  # fmt: skip
def test_malformed_refinements_say_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem.replace(".", r"\.")):
        parse_revision(text)


def test_a_json_refinement_parses_and_names_a_missing_field():
    rev = parse_revision_json('{"explanation": "Wrong city.", "kind": "correctness", "revised": "Paris."}')
    assert (rev.explanation, rev.kind, rev.text) == ("Wrong city.", "correctness", "Paris.")
    with pytest.raises(ValueError, match='no "revised"'):
        parse_revision_json('{"explanation": "Wrong city.", "kind": "correctness"}')


# ---- config and curation rules ---------------------------------------------------------------------

TEACHER = {"model": {"gguf": "smollm2-135m-instruct"}}


def test_a_single_rule_still_loads_and_teacher_rules_need_their_teacher(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", ["hi"])
    assert small_config(tmp_path, prompts).curation.rules == ["best_vs_worst"]
    both = small_config(tmp_path, prompts, teacher=TEACHER,
                        curation={"rule": ["best_vs_worst", "refined_vs_original"]})  # fmt: skip
    assert both.curation.rules == ["best_vs_worst", "refined_vs_original"]
    cases = [
        ({"curation": {"rule": "refined_vs_original"}}, "needs a `teacher`"),
        ({"teacher": {**TEACHER, "refine": "none"}, "curation": {"rule": "refined_vs_original"}}, "not none"),
        ({"teacher": TEACHER, "curation": {"rule": ["anchor_vs_sampled"]}}, "anchors: true"),
        ({"teacher": {**TEACHER, "reference": True}}, "teacher.anchors: true"),
        ({"teacher": TEACHER, "curation": {"rule": []}}, "empty list"),
        ({"teacher": {**TEACHER, "refine": "worst"}}, "teacher.refine"),
        ({"teacher": TEACHER, "export": [{"format": "sft", "path": "out"}]}, "anchors: true"),
        ({"teacher": {**TEACHER, "anchors": True}, "export": [{"format": "sft", "path": "o", "margin": "raw"}]},
         "an sft export has none"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace("`", ".")):
            small_config(tmp_path, prompts, **overrides)


def _refinement(rid: str, kept: bool, s_w: float | None, s_l: float = 3.0) -> Refinement:
    return Refinement(refinement_id=f"f{rid}", prompt_id="p", response_id=rid, parent_id="parent", teacher="t",
                      edit_kind="clarity", explanation="e", edit_distance=4, score_parent=s_l,
                      parent_scored_by="scorer:judge", score_refined=s_w, kept=kept, reference_id=None, call_ids=[],
                      margin=None if s_w is None else s_w - s_l, drop_reason=None if kept else "below_min_gap")


def test_refined_vs_original_pairs_only_kept_refinements_with_the_teachers_margin():
    pairs = refined_vs_original([_refinement("a", True, 8.0), _refinement("b", False, 3.5),
                                 _refinement("c", False, None)], "teacher-id", 1.0)  # fmt: skip
    assert pairs.select("chosen_id", "rejected_id", "margin", "source", "scorer_id").to_dicts() == [
        {"chosen_id": "a", "rejected_id": "parent", "margin": 5.0, "source": "teacher_refinement",
         "scorer_id": "teacher-id"}]  # fmt: skip


def test_anchor_vs_sampled_pairs_the_anchor_with_each_lower_scored_sample():
    anchors = pl.DataFrame({"prompt_id": ["p", "q"], "response_id": ["A", "B"], "value": [7.0, 2.0]})
    samples = pl.DataFrame({"prompt_id": ["p", "p", "p", "q"], "response_id": ["x", "y", "z", "w"],
                            "value": [2.0, 6.5, 9.0, 5.0]})  # fmt: skip
    pairs = anchor_vs_sampled(anchors, samples, "judge-id", 1.0)
    assert pairs.select("chosen_id", "rejected_id", "margin", "source").rows() == [("A", "x", 5.0, "teacher_anchor")]


def test_anchor_vs_sampled_skips_values_that_are_not_numbers():
    anchors = pl.DataFrame({"prompt_id": ["p", "q"], "response_id": ["A", "B"], "value": [7.0, float("nan")]})
    samples = pl.DataFrame({"prompt_id": ["p", "p", "q"], "response_id": ["x", "y", "w"],
                            "value": [float("nan"), 2.0, 1.0]})  # fmt: skip
    pairs = anchor_vs_sampled(anchors, samples, "judge-id", 1.0)
    assert pairs.select("chosen_id", "rejected_id", "margin").rows() == [("A", "y", 5.0)]


# ---- repair path and identical drop (replies injected at the HTTP layer) -------------------------------

PARENT = "The capital of France is Lyon."


def _teacher_reply(revised: str, score: int, malformed_first: bool):
    """A fake teacher: refinement requests get tags (a malformed first reply if asked), score requests JSON."""

    def respond(body):
        last = body["messages"][-1]["content"]
        if body.get("response_format"):
            return chat_reply(json.dumps({"rationale": "r", "score": score}))
        if malformed_first and "could not be used" not in last:
            return chat_reply(f"Here is a better answer: {revised}")
        return chat_reply(f"<explanation>Wrong city.</explanation><kind>correctness</kind><revised>{revised}</revised>")

    return respond


def _refine(respond, score_parent: float | None = 3.0, min_gap: float = 1.0):
    spec = TeacherSpec(model={"base_url": "http://unused/v1", "model": "m"}, min_gap=min_gap)
    with FakeOpenAI(respond) as fake:
        ep = Endpoint(label="teacher", identity="fake#teacher", base_url=fake.base_url, model="m", api_key="k",
                      concurrency=1, timeout_s=10, max_retries=0, is_local=False)  # fmt: skip
        item = RefineItem("p", [Message(role="user", content="Capital of France?")], "parent", PARENT, score_parent,
                          "scorer:judge" if score_parent is not None else "teacher")  # fmt: skip

        async def go():
            async with ModelClient(ep) as client:
                return await Teacher(spec, ep).refine(client, item)

        return asyncio.run(go()), fake.requests


def test_a_malformed_refinement_gets_one_repair_then_is_scored_and_kept_with_its_lineage():
    result, requests = _refine(_teacher_reply("The capital of France is Paris.", 8, malformed_first=True))
    (ref,) = result.of(Refinement)
    (resp,) = result.of(Response)
    assert len(requests) == 3 and "could not be used: there is no <revised>" in requests[1]["messages"][-1]["content"]
    assert "(scored 3 on a scale from 1 to 10)" in requests[2]["messages"][-1]["content"]  # calibrated on s_l
    assert resp.text == "The capital of France is Paris." and resp.source == "teacher_refinement"
    assert resp.model_identity == ref.teacher == "fake#teacher" and ref.response_id == resp.response_id
    assert (ref.parent_id, ref.edit_kind, ref.explanation) == ("parent", "correctness", "Wrong city.")
    assert ref.edit_distance == Levenshtein.distance(PARENT, resp.text) == 5
    assert (ref.score_parent, ref.score_refined, ref.margin, ref.kept, ref.drop_reason) == (3, 8, 5, True, None)
    assert len(ref.call_ids) == 3 and len(result.of(ModelCall)) == 3


def test_a_refinement_that_never_parses_is_a_failure_with_both_raw_replies():
    result, requests = _refine(lambda body: chat_reply("I would rather not."))
    (failure,) = result.of(Failure)
    assert len(requests) == 2 and not result.of(Refinement) and not result.of(Response)
    assert failure.stage == "refine" and "there is no <revised>" in failure.error
    assert failure.raw == "I would rather not.\n--- repair ---\nI would rather not."


def test_an_identical_revision_is_dropped_without_a_score_call():
    result, requests = _refine(_teacher_reply("  The capital of France\n is Lyon. ", 9, malformed_first=False))
    (ref,) = result.of(Refinement)
    assert len(requests) == 1  # no calibrated score for a text that did not change
    assert (ref.kept, ref.drop_reason, ref.score_refined, ref.margin) == (False, "identical", None, None)


def test_a_gap_not_above_min_gap_is_dropped_and_the_teacher_scores_an_unscored_parent_first():
    result, requests = _refine(_teacher_reply("The capital of France is Paris.", 4, malformed_first=False),
                               score_parent=None, min_gap=1.0)  # fmt: skip
    (ref,) = result.of(Refinement)
    assert len(requests) == 3 and "[Original response]" not in requests[1]["messages"][-1]["content"]
    assert (ref.parent_scored_by, ref.score_parent, ref.score_refined) == ("teacher", 4, 4)
    assert (ref.kept, ref.drop_reason, ref.margin) == (False, "below_min_gap", 0)


# ---- one run on the real embedded model ------------------------------------------------------------

PROMPTS = ["Name one primary color.", "What do bees make?", "What is 3 + 4?"]


def _q(db, sql):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def taught(tmp_path_factory, prefect_harness):
    tmp = tmp_path_factory.mktemp("teacher")
    config = small_config(
        tmp, write_jsonl(tmp / "p.jsonl", PROMPTS),
        teacher={**TEACHER, "refine": "every", "reference": True, "anchors": True, "reply": "json", "min_gap": 0,
                 "max_tokens": 128},
        curation={"rule": ["best_vs_worst", "refined_vs_original", "anchor_vs_sampled"], "min_margin": 1})  # fmt: skip
    summary = synthesize(config=config)
    refinements = _q(config.warehouse, "SELECT count(*), count(*) FILTER (WHERE kept) FROM refinements")[0]
    assert refinements[0] >= 3 and refinements[1] >= 1, f"too few refinements to check: {refinements}"
    return config, summary


@pytest.mark.model
def test_refinements_store_lineage_edit_distances_and_margins(taught):
    config, summary = taught
    db = config.warehouse
    counts = {s.stage: s for s in summary.stages}
    assert counts["refine[teacher]"].total == 6 and counts["anchor[teacher]"].total == 3
    rows = _q(db, "SELECT f.edit_distance, p.text, c.text, c.source, p.source, c.model_identity, f.teacher, "
                  "f.score_parent, s.value, f.parent_scored_by, f.score_refined, f.margin, f.kept, f.drop_reason, "
                  "f.reference_id, a.source, f.edit_kind FROM refinements f "
                  "JOIN responses c ON c.response_id = f.response_id "
                  "JOIN responses p ON p.response_id = f.parent_id JOIN scores s ON s.response_id = f.parent_id "
                  "JOIN responses a ON a.response_id = f.reference_id")  # fmt: skip
    assert rows
    for (dist, parent, child, child_src, parent_src, identity, teacher, s_l, judged, by, s_w, margin, kept, drop,
         _, anchor_src, kind) in rows:  # fmt: skip
        assert dist == Levenshtein.distance(parent, child)
        assert (child_src, parent_src, anchor_src) == ("teacher_refinement", "sampled", "teacher_anchor")
        assert identity == teacher and (s_l, by) == (judged, "scorer:judge") and kind in (
            "correctness", "completeness", "relevance", "clarity", "style")
        if drop != "identical":
            assert margin == s_w - s_l and kept == (margin > 0) and drop == (None if kept else "below_min_gap")
    pairs = _q(db, "SELECT p.margin, f.margin FROM pairs p JOIN refinements f ON f.response_id = p.chosen_id "
                   "AND f.parent_id = p.rejected_id WHERE p.source = 'teacher_refinement'")  # fmt: skip
    assert len(pairs) == _q(db, "SELECT count(*) FROM refinements WHERE kept")[0][0]
    assert all(a == b for a, b in pairs)


@pytest.mark.model
def test_stats_report_teacher_pairs_and_a_rerun_makes_no_call(taught, tmp_path):
    config, _ = taught
    result = CliRunner().invoke(app, ["stats", "--db", config.warehouse, "--json"])
    by_source = json.loads(result.output)["pairs_by_source"]
    assert by_source["teacher_refinement"] >= 1
    again = synthesize(config=config)
    assert again.model_calls == 0 and again.pairs == sum(by_source.values())
    assert _q(config.warehouse, f"SELECT count(*) FROM run_anchors WHERE run_id = '{again.run_id}'") == [(3,)]
    counts = {s.stage: s for s in again.stages}
    assert counts["refine[teacher]"].reused + counts["refine[teacher]"].failed == 6


@pytest.mark.model
def test_min_gap_filters_refinements_without_new_calls(taught):
    config, _ = taught
    strict = config.model_copy(update={"teacher": config.teacher.model_copy(update={"min_gap": 9.0})})
    summary = synthesize(config=strict)
    assert summary.model_calls == 0  # the same replies: only the filter changed
    scored = _q(config.warehouse, "SELECT count(*), count(*) FILTER (WHERE kept) FROM refinements WHERE "
                                  f"run_id = '{summary.run_id}' AND score_refined IS NOT NULL")[0]  # fmt: skip
    assert scored[0] >= 1 and scored[1] == 0  # a margin is at most 10 - 1 = 9: nothing is above 9
    assert not _q(config.warehouse, "SELECT * FROM run_pairs rp JOIN pairs USING (pair_id) WHERE "
                                    f"rp.run_id = '{summary.run_id}' AND source = 'teacher_refinement'")  # fmt: skip


@pytest.mark.model
def test_sft_export_writes_the_runs_anchors_with_their_prompts(taught, tmp_path):
    config, summary = taught
    anchors = _q(config.warehouse, "SELECT r.text, r.prompt_id FROM responses r WHERE source = 'teacher_anchor' "
                                   "ORDER BY prompt_id")  # fmt: skip
    assert len(anchors) == 3, "precondition: the run stored one anchor per prompt"
    out = tmp_path / "sft"
    result = CliRunner().invoke(app, ["export", "--db", config.warehouse, "--out", str(out), "--format", "sft",
                                      "--run", summary.run_id])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert [(r["completion"], r["prompt_id"]) for r in rows] == [
        ([{"role": "assistant", "content": text}], pid) for text, pid in anchors]
    assert sorted(r["prompt"][-1]["content"] for r in rows) == sorted(PROMPTS)
    assert {r["source"] for r in rows} == {"teacher_anchor"} and all(r["finish_reason"] for r in rows)
    assert "TRL's SFTTrainer" in (out / "README.md").read_text()
    snap = _q(config.warehouse, "SELECT format, n_pairs, margin FROM dataset_snapshots WHERE format = 'sft'")
    assert snap == [("sft", 3, "none")]
    refused = CliRunner().invoke(app, ["export", "--db", config.warehouse, "--out", str(tmp_path / "x"),
                                       "--format", "sft", "--margin", "raw"])  # fmt: skip
    assert refused.exit_code != 0 and "an sft export has none" in refused.output


def test_without_its_anchor_a_reference_refinement_waits_for_a_later_run(tmp_path, prefect_harness):
    """reference: true asks to show the teacher its own answer; when that answer fails, refining without it
    would store a refinement of another kind (and pay for a second one later): it is a failure instead."""
    import prefsynth
    from tests.test_truth import _good

    def respond(body):
        return (500, {"error": {"message": "teacher down"}}) if body["model"] == "t" else _good(body)

    with FakeOpenAI(respond) as fake:
        model = {"base_url": fake.base_url, "model": "m", "max_retries": 0}
        config = {"generation": {"models": [model], "samples_per_prompt": 2},
                  "scorers": [{"kind": "pointwise_judge", "model": model}],
                  "teacher": {"model": {**model, "model": "t"}, "reference": True, "anchors": True},
                  "curation": {"rule": ["best_vs_worst", "refined_vs_original"]},
                  "warehouse": str(tmp_path / "w.duckdb")}  # fmt: skip
        result = prefsynth.run(config, prompts=["q1", "q2", "q3"])
        teacher_requests = [b for b in fake.requests if b["model"] == "t"]
    assert result.counts["score[judge]"].new == 6, "precondition: the samples were scored"
    assert result.counts["anchor[teacher]"].failed == 3 and len(teacher_requests) == 3  # anchors only
    failures = prefsynth.Warehouse(result.warehouse).failures(run=result.run_id).filter(pl.col("stage") == "refine")
    assert len(failures) == 3 and set(failures["error"]) == {"no reference: the teacher's own answer failed"}
