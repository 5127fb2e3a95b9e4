"""Judges end to end on the embedded default (real SmolLM2 on llama.cpp, real DuckDB, real Prefect): a
calibrated pairwise judge and a multi-aspect rubric judge in one run with a panel, and `prefsynth eval`
of a pairwise judge with and without Balanced Position Calibration."""

from __future__ import annotations

import json

import duckdb
import pytest
from typer.testing import CliRunner

from prefsynth.cli import app
from prefsynth.flows.synthesize import synthesize
from tests.conftest import orphan_run_ids, small_config, write_jsonl
from tests.test_eval import PAIRS, _config

pytestmark = pytest.mark.model
runner = CliRunner()
SMOL = {"gguf": "smollm2-135m-instruct", "n_ctx": 4096}
PAIRWISE = {"kind": "pairwise_judge", "name": "pairwise", "model": SMOL, "max_tokens": 96}
ONE_ORDER = {**PAIRWISE, "name": "one_order", "balanced_position": False}  # the verdict of the order shown
RUBRIC = {"kind": "pointwise_judge", "name": "rubric", "model": SMOL, "max_tokens": 120, "aspects": "ultrafeedback",
          "scale_min": 1, "scale_max": 5}  # fmt: skip


def _q(db, sql):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_pipeline_with_a_calibrated_pairwise_judge_a_rubric_judge_and_a_panel(tmp_path, prefect_harness):
    prompts = write_jsonl(tmp_path / "p.jsonl", ["Name a fruit.", "What is 5 - 2?", "Say hello in Spanish.",
                                                 "Name a planet."])  # fmt: skip
    # SmolLM2 as a pairwise judge prefers whichever reply it is shown first, so calibration makes all its
    # verdicts ties, and it gives every reply one rubric rating: the one-order judge is what makes pairs
    config = small_config(
        tmp_path, prompts, scorers=[PAIRWISE, RUBRIC, ONE_ORDER], panel={"name": "panel"},
        curation={"scorer": "panel", "min_margin": 0.0, "require_agreement": ["one_order"]},
    )  # fmt: skip
    summary = synthesize(config=config)
    db = config.warehouse
    stage = next(s for s in summary.stages if s.stage == "score[pairwise]")
    assert stage.model_calls >= 8 and stage.tokens > 0  # two orders per comparison: the cost is reported
    # every comparison was judged in both orders; each judgment keeps order, verdict, rationale and raw text
    comps = _q(db, "SELECT comparison_id, winner, consistent, flipped, judgments FROM comparisons "
                   "JOIN scorers USING (scorer_id) WHERE name = 'pairwise'")  # fmt: skip
    failed = _q(db, "SELECT count(DISTINCT item_id) FROM failures f JOIN scorers s USING (scorer_id) "
                    "WHERE s.name = 'pairwise'")[0][0]  # fmt: skip
    assert len(comps) + failed == 4 and comps
    for cid, winner, consistent, flipped, n in comps:
        orders = _q(db, f"SELECT \"order\", verdict, preferred, raw FROM judgments WHERE comparison_id = '{cid}' "
                        "ORDER BY 1")  # fmt: skip
        assert [o for o, *_ in orders] == ["ab", "ba"] and n == 2
        assert all(v in ("A", "B", "tie") and p in ("a", "b", "tie") and raw for _, v, p, raw in orders)
        assert consistent == (orders[0][2] == orders[1][2])
        if flipped:
            assert winner == "tie"  # on_flip: tie
    # the rubric judge's aspects are kept, and its score is their mean
    details = [json.loads(d) for (d,) in _q(db, "SELECT details FROM scores WHERE scorer = 'rubric'")]
    values = [v for (v,) in _q(db, "SELECT value FROM scores WHERE scorer = 'rubric'")]
    assert details and all(set(d["aspects"]) == {"instruction_following", "honesty", "truthfulness", "helpfulness"}
                           for d in details)  # fmt: skip
    assert sorted(values) == sorted(sum(d["aspects"].values()) / 4 for d in details)
    # the panel, its agreement and every scorer's diagnostics are stored for the run
    panel = _q(db, "SELECT members, prompts FROM panel_runs")
    assert panel and panel[0][0] == ["pairwise", "rubric", "one_order"]
    taus = _q(db, "SELECT count(*) FROM panel_agreement WHERE scorer_a = 'pairwise' AND scorer_b = 'rubric'")
    assert taus[0][0] == panel[0][1]
    diags = {r[0]: r[1:] for r in _q(db, "SELECT scorer, items, position_consistency, first_position_rate "
                                         "FROM scorer_diagnostics")}  # fmt: skip
    assert diags["pairwise"][0] == diags["one_order"][0] == 4 and diags["rubric"][0] == 8
    assert diags["pairwise"][1] is not None and 0 <= diags["pairwise"][1] <= 1 and diags["rubric"][1] is None
    # pairs come from the panel: one per prompt that the one-order judge decided, and it agrees with each
    pairs = _q(db, "SELECT chosen_id, rejected_id FROM pairs")
    decided = _q(db, "SELECT count(*) FROM comparisons JOIN scorers USING (scorer_id) WHERE name = 'one_order' "
                     "AND winner <> 'tie'")[0][0]  # fmt: skip
    assert pairs and len(pairs) == summary.pairs == decided  # the precondition: there are pairs to check
    for chosen, rejected in pairs:
        wins = _q(db, "SELECT s1.value > s2.value FROM scores s1, scores s2 WHERE s1.scorer = 'one_order' AND "
                      f"s2.scorer = 'one_order' AND s1.response_id = '{chosen}' AND s2.response_id = '{rejected}'")
        assert wins == [(True,)]
    assert orphan_run_ids(db) == {}
    stats = runner.invoke(app, ["stats", "--db", db, "--json"])
    assert stats.exit_code == 0, stats.output
    shown = json.loads(stats.stdout)
    assert {d["scorer"] for d in shown["scorer_diagnostics"]} == {"pairwise", "rubric", "one_order"}
    assert shown["panels"]
    text = runner.invoke(app, ["stats", "--db", db], env={"COLUMNS": "200"})
    assert "position consistency" in text.stdout and "alpha" in text.stdout
    rerun = synthesize(config=config)
    assert rerun.model_calls == 0 and rerun.pairs == summary.pairs
    # the one-order pairwise judge as the curation scorer, with the default margin (auto: its win shares are
    # unitless, so any win): a pair per prompt it decided, from the same (cached) verdicts
    by_pairwise = config.model_copy(update={"curation": config.curation.model_copy(
        update={"scorer": "one_order", "min_margin": "auto", "require_agreement": []})})  # fmt: skip
    again = synthesize(config=by_pairwise)
    assert again.model_calls == 0 and again.pairs == decided > 0


def test_eval_of_a_pairwise_judge_with_and_without_calibration(tmp_path, prefect_harness):
    data = tmp_path / "mini.json"
    data.write_text(json.dumps(PAIRS))
    args = ["--data", str(data), "--format", "llmbar", "--json"]
    result = runner.invoke(app, ["eval", "--config", _config(tmp_path, [PAIRWISE]), *args])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["n"] + out["failed"] == 3 and {"accuracy", "ties", "position_consistency"} <= set(out)
    assert out["calls_per_pair"] == 2
    db = tmp_path / "w.duckdb"
    judged = _q(db, 'SELECT "order", count(*) FROM judgments GROUP BY 1 ORDER BY 1')
    assert [o for o, _ in judged] == ["ab", "ba"]
    consistent = [c for (c,) in _q(db, "SELECT consistent FROM eval_items WHERE consistent IS NOT NULL")]
    assert out["position_consistency"] == round(sum(consistent) / len(consistent), 4)
    # one order: the same calls (it judges the swap only to measure consistency), so nothing new is asked
    one_order = _config(tmp_path, [{**PAIRWISE, "balanced_position": False}])
    single = runner.invoke(app, ["eval", "--config", one_order, *args])
    assert single.exit_code == 0, single.output
    one = json.loads(single.stdout)
    assert one["model_calls"] == 0 and one["calls_per_pair"] == 1
    assert one["position_consistency"] == out["position_consistency"]
    runs = _q(db, "SELECT kind, status FROM runs JOIN run_ends USING (run_id)")
    assert runs == [("eval", "completed")] * 2 and orphan_run_ids(db) == {}


@pytest.mark.transformers
def test_pipeline_with_an_in_process_reward_model_and_a_majority_panel(tmp_path, prefect_harness):
    from tests.test_reward_model import make_model

    folder = make_model(tmp_path / "rm")  # a small randomly initialised classifier
    prompts = write_jsonl(tmp_path / "p.jsonl", ["Name a fruit.", "What is 5 - 2?", "Name a planet."])
    reward = {"kind": "reward_model", "name": "reward", "path": str(folder), "batch_size": 4}
    judge = {"kind": "pointwise_judge", "name": "judge", "model": {"gguf": "smollm2-135m-instruct"}, "max_tokens": 64}
    config = small_config(tmp_path, prompts, scorers=[reward, judge], panel={"aggregate": "majority"},
                          curation={"scorer": "reward", "min_margin": 0.0})  # fmt: skip
    summary = synthesize(config=config)
    db = config.warehouse
    rewards = _q(db, "SELECT response_id, value, details FROM scores WHERE scorer = 'reward'")
    assert len(rewards) == 6 and all("logits" in json.loads(d) for _, _, d in rewards)
    assert not _q(db, "SELECT * FROM model_calls WHERE kind = 'reward'")  # in process: no HTTP calls
    # every prompt with two distinct rewards gives a pair (min_margin 0), chosen = the higher reward
    by_prompt = _q(db, "SELECT r.prompt_id, max(s.value) > min(s.value) FROM scores s JOIN responses r "
                       "USING (response_id) WHERE s.scorer = 'reward' GROUP BY 1")  # fmt: skip
    assert summary.pairs == sum(distinct for _, distinct in by_prompt)
    # majority of two members per pair of responses: each response's Copeland score is 0, 0.5 or 1
    panel = _q(db, "SELECT value FROM panel_scores")
    assert panel and all(v in (0.0, 0.5, 1.0) for (v,) in panel)
    assert _q(db, "SELECT aggregate, members FROM panel_runs") == [("majority", ["reward", "judge"])]
