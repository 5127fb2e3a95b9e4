"""Pairwise judges: verdict parsing (good, malformed, repaired), both-order combination, the values
comparisons give responses, and a batch where the judge endpoint fails on some calls."""

import asyncio
import json

import polars as pl
import pytest

from prefsynth.backends.client import Endpoint
from prefsynth.schemas.records import Comparison, Failure, Judgment, Message
from prefsynth.tasks.compare import pairwise_values, prompt_pairs
from prefsynth.tasks.score import score_items
from prefsynth.tasks.scorers import PairItem, build_scorer
from prefsynth.tasks.scorers.pairwise_judge import (
    PairwiseJudgeSpec,
    combine,
    parse_verdict_json,
    parse_verdict_tag,
    preferred,
)
from prefsynth.warehouse.store import frame
from tests.fake_server import FakeOpenAI, chat_reply


@pytest.mark.parametrize(
    ("text", "verdict", "rationale"),
    [
        ('{"rationale": "A is correct.", "verdict": "A"}', "A", "A is correct."),
        ('```json\n{"verdict": "b", "rationale": "B cites it."}\n```', "B", "B cites it."),
        ('Here: {"rationale": "same", "verdict": "Tie"} done', "tie", "same"),
        ('{"verdict": "Response A"}', "A", None),
    ],
)
def test_json_verdicts_parse(text, verdict, rationale):
    assert parse_verdict_json(text) == (verdict, rationale)


@pytest.mark.parametrize(
    ("text", "verdict", "rationale"),
    [
        ("A misses the point; B answers it.\n<answer>B</answer>", "B", "A misses the point; B answers it."),
        ("<answer>A</answer> hmm, or <answer> tie </answer>", "tie", "<answer>A</answer> hmm, or"),
        ("<ANSWER>a</ANSWER>", "A", None),
    ],
)
def test_answer_tags_parse_and_the_last_tag_counts(text, verdict, rationale):
    assert parse_verdict_tag(text) == (verdict, rationale)


@pytest.mark.parametrize(
    ("parse", "text", "problem"),
    [
        (parse_verdict_json, "A is better.", "no JSON object"),
        (parse_verdict_json, '{"rationale": "x"}', 'no "verdict"'),
        (parse_verdict_json, '{"verdict": "C"}', "must be A, B or tie"),
        (parse_verdict_json, '{"verdict": 1}', "must be a string"),
        (parse_verdict_json, '{"verdict": "tie', "invalid JSON"),
        (parse_verdict_tag, "I prefer A.", "no <answer>"),
        (parse_verdict_tag, "<answer>both</answer>", "must be A, B or tie"),
    ],
)
def test_malformed_verdicts_say_what_is_wrong(parse, text, problem):
    with pytest.raises(ValueError, match=problem):
        parse(text)


def test_ties_can_be_forbidden():
    with pytest.raises(ValueError, match="tie is not allowed"):
        parse_verdict_json('{"verdict": "tie"}', allow_tie=False)
    with pytest.raises(ValueError, match="must be A or B, got"):
        parse_verdict_tag("<answer>C</answer>", allow_tie=False)


def test_verdicts_map_from_positions_to_responses():
    assert [preferred(v, "ab") for v in ("A", "B", "tie")] == ["a", "b", "tie"]
    assert [preferred(v, "ba") for v in ("A", "B", "tie")] == ["b", "a", "tie"]


def _j(order: str, pref: str, sample: int = 0) -> Judgment:
    verdict = {"tie": "tie", "a": "A" if order == "ab" else "B", "b": "B" if order == "ab" else "A"}[pref]
    return Judgment(judgment_id=f"{order}{sample}", comparison_id="c", scorer_id="s", order=order, sample=sample,
                    verdict=verdict, preferred=pref, rationale=None, raw="", repaired=False, call_ids=[],
                    prompt_tokens=None, completion_tokens=None)  # fmt: skip


BOTH = ("ab", "ba")


@pytest.mark.parametrize(
    ("prefs", "orders", "on_flip", "expected"),
    [
        # (winner, score_a, consistent, flipped, judgments used)
        ([("ab", "a"), ("ba", "a")], BOTH, "tie", ("a", 1.0, True, False, 2)),
        ([("ab", "a"), ("ba", "b")], BOTH, "tie", ("tie", 0.5, False, True, 2)),  # a flip is a tie
        ([("ab", "a"), ("ba", "b")], BOTH, "drop", (None, 0.5, False, True, 2)),
        ([("ab", "a"), ("ba", "tie")], BOTH, "tie", ("a", 0.75, False, False, 2)),  # (1 + 0.5) / 2
        ([("ab", "b"), ("ba", "tie")], BOTH, "drop", ("b", 0.25, False, False, 2)),
        # one order decides; the other (diagnostic) only sets `consistent`
        ([("ab", "a"), ("ba", "b")], ("ab",), "tie", ("a", 1.0, False, True, 1)),
        ([("ab", "b")], ("ab",), "tie", ("b", 0.0, None, False, 1)),
    ],
)
def test_both_order_combination(prefs, orders, on_flip, expected):
    assert combine([_j(o, p) for o, p in prefs], orders, on_flip) == expected


def test_multiple_evidence_is_averaged_per_order_then_across_orders():
    # ab: a, a, b -> 2/3; ba: b, b, b -> 0; majorities a vs b: a flip.
    js = [_j("ab", "a", 0), _j("ab", "a", 1), _j("ab", "b", 2), _j("ba", "b", 0), _j("ba", "b", 1), _j("ba", "b", 2)]
    assert combine(js, BOTH, "mean") == ("b", pytest.approx(1 / 3), False, True, 6)  # (2/3 + 0) / 2
    assert combine(js, BOTH, "tie")[:2] == ("tie", 0.5)


def _endpoint(url: str) -> Endpoint:
    return Endpoint(label="fake", identity="fake#m", base_url=url, model="m", api_key="k", concurrency=4,
                    timeout_s=10, max_retries=0, is_local=False)  # fmt: skip


def _first_shown(body: dict) -> str:
    user = body["messages"][1]["content"]
    return user.split("[Response A]\n", 1)[1].split("\n", 1)[0]


def test_a_judge_failing_on_some_calls_still_finishes_and_records_each_outcome():
    """Replies depend on what is shown first: a position-biased judge that always says A, except for texts
    that make the server fail (HTTP 500), answer garbage (repair works) or answer garbage twice."""

    def respond(body):
        first = _first_shown(body)
        repair = "could not be used" in body["messages"][-1]["content"]
        if "down" in first:
            return 500, {"error": {"message": "judge overloaded"}}
        if "garbled" in first and not repair:
            return chat_reply("A, definitely")
        if "hopeless" in first:
            return chat_reply("no idea")
        return chat_reply('{"rationale": "The first one.", "verdict": "A"}')

    spec = PairwiseJudgeSpec(model={"base_url": "http://x/v1", "model": "m"})
    convo = [Message(role="user", content="q")]
    texts = ["fine 0", "fine 1", "garbled 2", "down 3", "hopeless 4", "fine 5", "fine 6", "down 7", "fine 8", "fine 9"]
    with FakeOpenAI(respond) as fake:
        judge = build_scorer(spec, lambda model: _endpoint(fake.base_url))
        items = [PairItem(f"c{i}", "p", convo, (f"r{i}", t), (f"z{i}", "other")) for i, t in enumerate(texts)]
        result = asyncio.run(score_items(judge, items))
    failed = {f.item_id: f for f in result.of(Failure)}
    assert set(failed) == {"c3", "c4", "c7"}  # 30% of the batch fails; the rest is scored
    assert "HTTP 500" in failed["c3"].error and "order ab" in failed["c3"].error
    assert "unparsable judgment after repair" in failed["c4"].error and "no idea" in failed["c4"].raw
    comps = {c.comparison_id: c for c in result.of(Comparison)}
    assert len(comps) == 7
    # always "A": a wins in order ab, b wins in order ba -> a flip -> tie under BPC
    assert all(c.winner == "tie" and c.flipped and c.consistent is False for c in comps.values())
    repaired = [j for j in result.of(Judgment) if j.repaired]
    assert [(j.comparison_id, j.order) for j in repaired] == [("c2", "ab")]
    assert repaired[0].raw.startswith("{") and len(repaired[0].call_ids) == 2
    assert {(j.order, j.verdict) for j in result.of(Judgment)} == {("ab", "A"), ("ba", "A")}


def test_comparisons_become_values_only_when_a_prompt_is_complete():
    responses = pl.DataFrame({"response_id": ["r1", "r2", "r3", "s1", "s2"], "prompt_id": ["p", "p", "p", "q", "q"]})
    pairs = [i for pid, rids in (("p", ["r1", "r2", "r3"]), ("q", ["s1", "s2"]))
             for i in prompt_pairs("S", pid, [], [(r, "") for r in rids])]  # fmt: skip
    assert [(i.prompt_id, i.a[0], i.b[0]) for i in pairs] == [
        ("p", "r1", "r2"), ("p", "r1", "r3"), ("p", "r2", "r3"), ("q", "s1", "s2")]
    rows = [  # p: r1 beats r2, ties r3; r3 beats r2. q's comparison is missing.
        {"comparison_id": pairs[0].comparison_id, "winner": "a", "score_a": 1.0},
        {"comparison_id": pairs[1].comparison_id, "winner": "tie", "score_a": 0.5},
        {"comparison_id": pairs[2].comparison_id, "winner": "b", "score_a": 0.25},
    ]

    def comparisons(rows: list[dict], items=pairs) -> pl.DataFrame:
        by_id = {i.comparison_id: i for i in items}
        return pl.DataFrame([{**r, "prompt_id": by_id[r["comparison_id"]].prompt_id,
                              "response_a_id": by_id[r["comparison_id"]].a[0],
                              "response_b_id": by_id[r["comparison_id"]].b[0]} for r in rows],
                            schema_overrides={"winner": pl.String})  # fmt: skip

    def values(frame: pl.DataFrame) -> dict[str, dict]:
        return {r["response_id"]: r for r in frame.iter_rows(named=True)}

    scores = values(pairwise_values(responses, comparisons(rows), "S", "pw"))
    assert set(scores) == {"r1", "r2", "r3"}
    assert scores["r1"]["value"] == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert scores["r2"]["value"] == pytest.approx(0.125)  # (0 + 0.25) / 2
    assert scores["r3"]["value"] == pytest.approx(0.625)  # (0.5 + 0.75) / 2
    assert json.loads(scores["r1"]["details"]) == {"dropped": 0, "losses": 0, "ties": 1, "wins": 1}
    assert frame("scores", []).columns == pairwise_values(responses, comparisons(rows), "S", "pw").columns[:-1]
    dropped = [{**rows[0], "winner": None}, *rows[1:]]
    again = values(pairwise_values(responses, comparisons(dropped), "S", "pw"))
    assert again["r1"]["value"] == pytest.approx(0.5)  # only its tie with r3 counts
    assert again["r2"]["value"] == pytest.approx(0.25)  # only its comparison with r3 counts
    # the same response against other opponents gets another score id (no stale value is reused)
    fewer = responses.filter(pl.col("response_id") != "r3")
    only = values(pairwise_values(fewer, comparisons(rows[:1]), "S", "pw"))
    assert {r: v["value"] for r, v in only.items()} == {"r1": 1.0, "r2": 0.0}
    assert only["r1"]["score_id"] != scores["r1"]["score_id"]


def test_judgments_and_comparisons_fit_their_tables():
    assert frame("judgments", []).is_empty() and "order" in frame("judgments", []).columns
    assert frame("comparisons", [])["consistent"].dtype == pl.Boolean


def test_answer_tag_style_sends_no_schema_and_keeps_the_reasoning_as_rationale():
    def respond(body):
        assert "response_format" not in body and "<answer>A</answer>" in body["messages"][1]["content"]
        first = _first_shown(body)
        return chat_reply(f"{first} is shorter but correct.\n<answer>{'A' if first == 'right' else 'B'}</answer>")

    spec = PairwiseJudgeSpec(model={"base_url": "http://x/v1", "model": "m"}, style="answer_tag")
    item = PairItem("c", "p", [Message(role="user", content="q")], ("r1", "wrong"), ("r2", "right"))
    with FakeOpenAI(respond) as fake:
        judge = build_scorer(spec, lambda model: _endpoint(fake.base_url))
        result = asyncio.run(score_items(judge, [item]))
    (comp,) = result.of(Comparison)
    assert (comp.winner, comp.score_a, comp.consistent, comp.flipped) == ("b", 0.0, True, False)
    by_order = {j.order: j for j in result.of(Judgment)}
    assert by_order["ab"].verdict == "B" and by_order["ba"].verdict == "A"  # "right" shown second, then first
    assert by_order["ab"].rationale == "wrong is shorter but correct." and len(fake.requests) == 2


def _shown(body: dict) -> tuple[str, str]:
    user = body["messages"][1]["content"]
    first = user.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
    second = user.split("[Response B]\n", 1)[1].split("\n\n", 1)[0]
    return first, second


def test_eval_maps_verdicts_to_the_labelled_better_reply_in_either_file_order(tmp_path, prefect_harness):
    import json

    from prefsynth.flows.evaluate import evaluate
    from prefsynth.schemas.config import parse_config

    records = [  # the better reply is output_1 in two records and output_2 in three
        {"input": f"q{i}", "output_1": f"GOOD {i}" if label == 1 else f"bad {i}",
         "output_2": f"bad {i}" if label == 1 else f"GOOD {i}", "label": label}
        for i, label in enumerate([1, 2, 2, 1, 2])
    ]  # fmt: skip
    data = tmp_path / "mini.json"
    data.write_text(json.dumps(records))

    def fair(body):  # prefers the GOOD reply wherever it is shown
        first, _ = _shown(body)
        return chat_reply(json.dumps({"rationale": "r", "verdict": "A" if first.startswith("GOOD") else "B"}))

    def first_always(body):  # always the reply shown first
        return chat_reply('{"rationale": "r", "verdict": "A"}')

    def run(respond, **judge):
        with FakeOpenAI(respond) as fake:
            model = {"base_url": fake.base_url, "model": "m", "max_retries": 0}
            config = parse_config({"prompts": {"builtin": "quickstart"}, "generation": {"models": [model]},
                                   "scorers": [{"kind": "pairwise_judge", "model": model, **judge}],
                                   "warehouse": str(tmp_path / f"{respond.__name__}.duckdb")})  # fmt: skip
            return evaluate(config=config, data=str(data), fmt="llmbar")["scorers"]["pairwise"]

    good = run(fair)
    assert (good["accuracy"], good["ties"], good["position_consistency"]) == (1.0, 0, 1.0)
    biased = run(first_always, balanced_position=False)
    assert biased["accuracy"] == 0.4  # right exactly where the better reply is output_1 (2 of 5)
    assert (biased["position_consistency"], biased["first_position_rate"]) == (0.0, 1.0)
    calibrated = run(first_always)
    assert (calibrated["accuracy"], calibrated["ties"], calibrated["accuracy_ties_half"]) == (0.0, 5, 0.5)
