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
