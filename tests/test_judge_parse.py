import pytest

from prefsynth.tasks.scorers.pointwise_judge import parse_judgment


@pytest.mark.parametrize(
    ("text", "score", "rationale"),
    [
        ('{"rationale": "Clear and correct.", "score": 8}', 8.0, "Clear and correct."),
        ('```json\n{"score": 3, "rationale": "Wrong."}\n```', 3.0, "Wrong."),
        ('Sure! Here it is: {"rationale": "ok", "score": "7"} hope it helps', 7.0, "ok"),
        ('{"score": 10}', 10.0, None),
        ('{"score": 6.5, "rationale": 3}', 6.5, None),
    ],
)
def test_good_judgments_parse(text, score, rationale):
    assert parse_judgment(text, 1, 10) == (score, rationale)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("I think it is a 7.", "no JSON object"),
        ('{"rationale": "cut off', "invalid JSON"),
        ('{"rationale": "no score"}', 'no "score"'),
        ('{"score": 0}', "outside 1..10"),
        ('{"score": 11}', "outside 1..10"),
        ('{"score": "high"}', "not a number"),
        ('{"score": true}', "not a number"),
        ("[8]", "no JSON object"),
        ('{"score": 5} {"score": 6}', None),
    ],
)
def test_bad_judgments_say_what_is_wrong(text, problem):
    if problem is None:  # the first object wins; trailing text is ignored
        assert parse_judgment(text, 1, 10)[0] == 5.0
        return
    with pytest.raises(ValueError, match=problem):
        parse_judgment(text, 1, 10)
