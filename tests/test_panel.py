"""Panels: the aggregate of several scorers and their agreement, against hand-computed values."""

import math

import polars as pl
import pytest

from prefsynth.tasks.diagnostics import diagnostics, length_corr, position_stats
from prefsynth.tasks.panel import run_panel


def _values(rows):
    return pl.DataFrame(rows, schema={"prompt_id": pl.String, "response_id": pl.String, "value": pl.Float64},
                        orient="row")


JUDGE = _values([("p", "r1", 9), ("p", "r2", 5), ("p", "r3", 1), ("q", "s1", 5), ("q", "s2", 5)])
CDR = _values([("p", "r1", 0.2), ("p", "r2", 0.4), ("p", "r3", -0.6), ("q", "s1", 0.0), ("q", "s2", 0.2),
               ("x", "t1", 1.0)])  # fmt: skip


def test_mean_of_normalized_scores_and_agreement():
    scores, agreement, summary = run_panel({"judge": JUDGE, "cdr": CDR}, "P", "mean_normalized")
    # judge over r1,r2,r3,s1,s2 = 9,5,1,5,5: mean 5, population std sqrt(32/5) = 2.5298
    # cdr = 0.2,0.4,-0.6,0.0,0.2: mean 0.04, deviations^2 sum 0.592, std sqrt(0.592/5) = 0.344093
    zj = {"r1": 4 / 2.529822, "r2": 0.0, "r3": -4 / 2.529822, "s1": 0.0, "s2": 0.0}
    zc = {"r1": 0.16 / 0.344093, "r2": 0.36 / 0.344093, "r3": -0.64 / 0.344093, "s1": -0.04 / 0.344093,
          "s2": 0.16 / 0.344093}  # fmt: skip
    got = dict(zip(scores["response_id"], scores["value"], strict=True))
    assert set(got) == set(zj)  # t1 has no judge score: it is left out
    for rid in zj:
        assert got[rid] == pytest.approx((zj[rid] + zc[rid]) / 2, abs=1e-5)
    taus = {r["prompt_id"]: r["kendall_tau"] for r in agreement.filter(pl.col("scorer_a") == "judge").to_dicts()}
    # p: pairs (r1,r2) judge + cdr - discordant; (r1,r3) concordant; (r2,r3) concordant -> (2-1)/3
    assert taus["p"] == pytest.approx(1 / 3)
    assert taus["q"] is None  # the judge tied both of q's responses
    assert summary["mean_tau"] == pytest.approx(1 / 3) and summary["prompts"] == 2
    assert summary["members"] == ["judge", "cdr"]
    assert -1 <= summary["alpha"] <= 1
    alphas = {r["prompt_id"]: r["alpha"] for r in agreement.filter(pl.col("scorer_a") == "*").to_dicts()}
    assert set(alphas) == {"p", "q"}


def test_perfect_agreement_gives_alpha_one():
    scaled = JUDGE.with_columns(pl.col("value") * 3 + 1)  # same ranking and same z-scores
    _, agreement, summary = run_panel({"a": JUDGE, "b": scaled}, "P", "mean_normalized")
    assert summary["alpha"] == pytest.approx(1.0)
    assert agreement.filter(pl.col("prompt_id") == "p", pl.col("scorer_a") == "a")["kendall_tau"][0] == 1.0


def test_majority_of_pairwise_votes():
    third = _values([("p", "r1", 1), ("p", "r2", 2), ("p", "r3", 3), ("q", "s1", 1), ("q", "s2", 0)])
    scores, _, _ = run_panel({"judge": JUDGE, "cdr": CDR, "third": third}, "P", "majority")
    got = dict(zip(scores["response_id"], scores["value"], strict=True))
    # p: r1 vs r2: judge r1, cdr r2, third r2 -> r2; r1 vs r3: judge r1, cdr r1, third r3 -> r1;
    #    r2 vs r3: judge r2, cdr r2, third r3 -> r2. Wins: r1 1, r2 2, r3 0.
    # q: s1 vs s2: judge none (tie), cdr s2, third s1 -> a draw: 0.5 each.
    assert got == {"r1": 1.0, "r2": 2.0, "r3": 0.0, "s1": 0.5, "s2": 0.5}


def test_diagnostics_failure_rate_length_bias_and_position_bias():
    values = _values([("p", "a", 1.0), ("p", "b", 2.0), ("p", "c", 3.0), ("p", "d", 4.0)])
    lengths = pl.DataFrame({"response_id": ["a", "b", "c", "d"], "tokens": [10, 20, 40, 30]}, schema={
        "response_id": pl.String, "tokens": pl.Int32})
    # Spearman: ranks of value 1,2,3,4 and of tokens 1,2,4,3: d^2 = 0+0+1+1 = 2 -> 1 - 6*2/(4*15) = 0.8
    assert length_corr(values, lengths) == pytest.approx(0.8)
    assert length_corr(values.head(2), lengths) is None
    comps = pl.DataFrame({"comparison_id": ["c1", "c2", "c3", "c4"], "consistent": [True, False, False, None]},
                         schema={"comparison_id": pl.String, "consistent": pl.Boolean})
    # c9's comparison failed: its verdict is left out
    verdicts = pl.DataFrame({"comparison_id": ["c1", "c1", "c2", "c3", "c4", "c9"],
                             "verdict": ["A", "A", "A", "B", "tie", "B"]})
    assert position_stats(comps, verdicts) == {"position_consistency": pytest.approx(1 / 3, abs=1e-4),
                                               "first_position_rate": 0.75}  # fmt: skip
    row = diagnostics("id", "judge", 10, 7, values, lengths)
    assert row["failed"] == 3 and row["failure_rate"] == 0.3 and row["position_consistency"] is None
    assert math.isclose(row["length_corr"], 0.8)


def test_panel_alpha_against_a_hand_computation():
    a = _values([("p", "r1", 1.0), ("p", "r2", 2.0), ("p", "r3", 3.0)])
    b = _values([("p", "r1", 10.0), ("p", "r2", 30.0), ("p", "r3", 20.0)])
    _, agreement, summary = run_panel({"a": a, "b": b}, "P", "mean_normalized")
    # z-scores: a = (-s, 0, s), b = (-s, s, 0) with s = sqrt(3/2) = 1.2247.
    # Within units (ordered pairs, m_u = 2): r1 0, r2 2 * 1.5, r3 2 * 1.5 -> 6.
    # All ordered pairs of the 6 values: 2 * 6 * sum of squares (4 * 1.5 = 6) = 72.
    # alpha = 1 - (n - 1) * 6 / 72 = 1 - 5 * 6 / 72 = 7/12.
    assert summary["alpha"] == pytest.approx(7 / 12)
    assert agreement.filter(pl.col("scorer_a") == "*")["alpha"][0] == pytest.approx(7 / 12)
    # tau: (r1,r2) concordant, (r1,r3) concordant, (r2,r3) discordant -> 1/3
    assert summary["mean_tau"] == pytest.approx(1 / 3)


def test_min_panel_agreement_keeps_only_the_prompts_the_members_agree_on():
    from prefsynth.tasks.panel import agreed_only

    values = {"judge": JUDGE, "cdr": CDR}
    scores, agreement, _ = run_panel(values, "P", "mean_normalized")
    alphas = {r["prompt_id"]: r["alpha"] for r in agreement.filter(pl.col("scorer_a") == "*").to_dicts()}
    least = max(a for a in alphas.values() if a is not None) - 1e-9  # only the best-agreeing prompt passes
    best = [p for p, a in alphas.items() if a is not None and a >= least]
    kept, left_out = agreed_only({**values, "panel": scores.select("prompt_id", "response_id", "value")},
                                 agreement, least, "panel")  # fmt: skip
    assert len(best) == 1 and sorted(kept["panel"]["prompt_id"].unique()) == best and left_out == 1
    assert set(kept["cdr"]["prompt_id"]) == set(best)  # "x" has no panel alpha: it does not agree


def test_min_panel_agreement_needs_a_panel():
    from prefsynth.errors import ConfigError
    from prefsynth.schemas.config import parse_config

    raw = {"prompts": {"builtin": "quickstart"}, "generation": {"models": [{"base_url": "http://h/v1", "model": "m"}]},
           "scorers": [{"kind": "pointwise_judge", "model": {"base_url": "http://h/v1", "model": "m"}}],
           "curation": {"min_panel_agreement": 0.5}}  # fmt: skip
    with pytest.raises(ConfigError, match="add a `panel`"):
        parse_config(raw)
