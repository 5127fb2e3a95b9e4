import math

import polars as pl

from prefsynth.schemas.config import CurationSpec
from prefsynth.tasks.curate import best_vs_worst


def _scores(rows):
    return pl.DataFrame(rows, schema={"prompt_id": pl.String, "response_id": pl.String, "value": pl.Float64},
                        orient="row")


def test_best_vs_worst_with_margin():
    df = _scores([("p1", "a", 9.0), ("p1", "b", 2.0), ("p1", "c", 5.0), ("p2", "d", 6.0), ("p2", "e", 5.5)])
    pairs = best_vs_worst(df, "s", CurationSpec(min_margin=1.0))
    assert pairs.to_dicts()[0] | {"pair_id": None, "rule": None} == {
        "pair_id": None, "prompt_id": "p1", "chosen_id": "a", "rejected_id": "b", "scorer_id": "s", "rule": None,
        "score_chosen": 9.0, "score_rejected": 2.0, "margin": 7.0, "source": "sampled",
    }
    assert len(pairs) == 1  # p2's margin 0.5 < 1
    assert len(best_vs_worst(df, "s", CurationSpec(min_margin=0.5))) == 2


def test_ties_single_responses_and_nothing_scored_give_no_pair():
    df = _scores([("tie", "a", 5.0), ("tie", "b", 5.0), ("one", "c", 9.0)])
    assert best_vs_worst(df, "s", CurationSpec(min_margin=0.0)).is_empty()
    assert best_vs_worst(_scores([]), "s", CurationSpec()).is_empty()
    assert best_vs_worst(_scores([("p", "a", math.nan), ("p", "b", 3.0)]), "s", CurationSpec(min_margin=0)).is_empty()


def test_tie_breaker_is_deterministic_whatever_the_row_order():
    rows = [("p", "z", 8.0), ("p", "m", 8.0), ("p", "y", 1.0), ("p", "b", 1.0), ("p", "k", 4.0)]
    first = best_vs_worst(_scores(rows), "s", CurationSpec())
    for shift in range(1, len(rows)):
        again = best_vs_worst(_scores(rows[shift:] + rows[:shift]), "s", CurationSpec())
        assert again.to_dicts() == first.to_dicts()
    assert first["chosen_id"].to_list() == ["m"] and first["rejected_id"].to_list() == ["b"]


def test_pair_ids_depend_on_the_rule():
    df = _scores([("p", "a", 9.0), ("p", "b", 1.0)])
    a = best_vs_worst(df, "s", CurationSpec(min_margin=1))["pair_id"][0]
    b = best_vs_worst(df, "s", CurationSpec(min_margin=2))["pair_id"][0]
    c = best_vs_worst(df, "t", CurationSpec(min_margin=1))["pair_id"][0]
    assert len({a, b, c}) == 3


def test_output_is_sorted_by_prompt():
    rows = [(f"p{i:03d}", f"r{i}{j}", float(j * (i % 3 + 1))) for i in range(200) for j in range(3)]
    pairs = best_vs_worst(_scores(rows), "s", CurationSpec(min_margin=1))
    assert pairs["prompt_id"].to_list() == sorted(pairs["prompt_id"].to_list())
    assert len(pairs) == 200


def test_require_agreement_keeps_only_pairs_every_named_scorer_orders_the_same_way():
    judge = _scores([("p1", "a", 9.0), ("p1", "b", 2.0), ("p2", "c", 8.0), ("p2", "d", 1.0), ("p3", "e", 7.0),
                     ("p3", "f", 1.0)])
    cdr = _scores([("p1", "a", 0.3), ("p1", "b", -0.1), ("p2", "c", -0.5), ("p2", "d", 0.2), ("p3", "e", 0.1)])
    plain = best_vs_worst(judge, "judge", CurationSpec())
    agreed = best_vs_worst(judge, "judge", CurationSpec(), {"cdr": cdr})
    assert plain["prompt_id"].to_list() == ["p1", "p2", "p3"]
    # p2: CDR prefers d (disagrees); p3: CDR has no value for f (cannot agree)
    assert agreed["prompt_id"].to_list() == ["p1"]
    assert agreed["pair_id"][0] != plain["pair_id"][0]  # the rule is part of the pair's id
    assert best_vs_worst(judge, "judge", CurationSpec(), {}).to_dicts() == plain.to_dicts()


# ---- rules, margins and filters of issue 12, on hand-made data with known answers ---------------------------

from prefsynth.tasks.curate import Curated, sampled_pairs, threshold  # noqa: E402

ROWS = [("p1", "a", 9.0), ("p1", "b", 7.0), ("p1", "c", 4.0), ("p1", "d", 1.0),
        ("p2", "e", 6.0), ("p2", "f", 5.5), ("p2", "g", 2.0)]  # fmt: skip


def _responses(tokens: dict[str, int] | None = None, cut: tuple[str, ...] = ()) -> pl.DataFrame:
    ids = [r for _, r, _ in ROWS]
    return pl.DataFrame({"response_id": ids, "tokens": [(tokens or {}).get(r, 10) for r in ids],
                         "finish_reason": ["length" if r in cut else "stop" for r in ids]},
                        schema={"response_id": pl.String, "tokens": pl.Int32, "finish_reason": pl.String})  # fmt: skip


def _pairs(rule: str, margin: float = 1.0, responses: pl.DataFrame | None = None, **spec: object) -> Curated:
    return sampled_pairs(_scores(ROWS), _responses() if responses is None else responses, "s",
                         CurationSpec(rule=rule, **spec), margin)  # type: ignore[arg-type]  # fmt: skip


def _cr(curated: Curated) -> list[tuple[str, str]]:
    return list(zip(curated.pairs["chosen_id"], curated.pairs["rejected_id"], strict=True))


def test_each_sampled_rule_gives_its_known_pairs():
    assert _cr(_pairs("best_vs_worst")) == [("a", "d"), ("e", "g")]
    assert _cr(_pairs("above_margin", 3.0)) == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d"),
                                                ("e", "g"), ("f", "g")]  # fmt: skip
    assert _cr(_pairs("top_k_vs_bottom_k", k=2)) == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("e", "g")]
    drawn = _pairs("best_vs_random", 1.0, seed=7)
    assert [c for c, _ in _cr(drawn)] == ["a", "e"] and dict(_cr(drawn))["a"] in {"b", "c", "d"}
    assert dict(_cr(drawn))["e"] == "g"  # f is not below e by the margin
    assert _cr(_pairs("best_vs_random", 1.0, seed=7)) == _cr(drawn)  # the same seed, the same pairs
    seeds = {dict(_cr(_pairs("best_vs_random", 1.0, seed=s)))["a"] for s in range(20)}
    assert seeds == {"b", "c", "d"}  # every lower response can be drawn


def test_margins_in_units_z_scores_and_quantiles():
    scores = _scores(ROWS)
    assert threshold(CurationSpec(), scores, scaled=True) == 1.0 and threshold(CurationSpec(), scores, False) == 0.0
    assert threshold(CurationSpec(min_margin=2.5), scores, scaled=True) == 2.5
    std = scores["value"].std()
    assert threshold(CurationSpec(min_margin={"z": 0.5}), scores, True) == 0.5 * std
    assert threshold(CurationSpec(min_margin={"quantile": 0.5}), scores, True) == 6.0  # gaps 8 and 4
    assert threshold(CurationSpec(min_margin={"quantile": 1.0}), scores, True) == 8.0


def test_truncated_replies_are_not_paired_unless_allowed():
    cut = _responses(cut=("a",))
    assert _cr(_pairs("best_vs_worst", responses=cut)) == [("b", "d"), ("e", "g")]
    assert _pairs("best_vs_worst", responses=cut).counts["truncated_responses"] == 1
    assert _cr(_pairs("best_vs_worst", responses=cut, allow_truncated=True)) == [("a", "d"), ("e", "g")]


def test_length_ratio_and_length_matching():
    lengths = _responses({"a": 100, "b": 30, "c": 20, "d": 10, "e": 10, "f": 10, "g": 40})
    capped = _pairs("best_vs_worst", responses=lengths, max_length_ratio=4)
    assert _cr(capped) == [("e", "g")] and capped.counts["length_ratio"] == 1  # a/d is 10x
    matched = _pairs("above_margin", 3.0, responses=lengths, length_matched=True)
    assert _cr(matched) == [("b", "c"), ("e", "g")]  # p1: b/c's 1.5 is the closest; p2: both 4, e/g's margin wins
    assert matched.counts["over_cap"] == 5


def test_max_pairs_per_prompt_keeps_the_largest_margins():
    assert _cr(_pairs("above_margin", 3.0, max_pairs_per_prompt=2)) == [("a", "d"), ("b", "d"), ("e", "g"), ("f", "g")]


def test_the_counts_say_which_step_removed_everything():
    everything = _pairs("best_vs_worst", 20.0)
    assert everything.pairs.is_empty() and everything.empty_because() == "below_margin"
    assert everything.counts | {} == {"prompts_scored": 2, "truncated_responses": 0, "prompts_without_two": 0,
                                      "candidates": 2, "below_margin": 2, "kept": 0}  # fmt: skip
    lonely = sampled_pairs(_scores([("p", "a", 3.0)]), _responses(), "s", CurationSpec(), 1.0)
    assert lonely.empty_because() == "prompts_without_two"
    assert _pairs("best_vs_worst").empty_because() is None


def test_one_sampled_rule_per_config():
    import pytest

    with pytest.raises(ValueError, match="one rule over sampled responses"):
        CurationSpec(rule=["best_vs_worst", "above_margin"])
