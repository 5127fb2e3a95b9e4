"""Decontamination of short evaluation items (issue 12): an item shorter than the n-gram size matches a
prompt that contains its whole normalized word sequence; common words alone do not; items below `ngram_min`
words match only a prompt equal to them. Hand-made data with known answers."""

from __future__ import annotations

import polars as pl

from prefsynth.schemas.config import CurationSpec
from prefsynth.tasks.screen import contaminated

QUESTION = "Which planet is closest to the Sun?"  # 7 words: shorter than a 13-gram
LONG = ("I am preparing a quiz night for my friends and need some help. Which planet is closest to the sun? "
        "Also suggest a fun follow-up question about the solar system.")  # fmt: skip


def _texts(rows: dict[str, str]) -> pl.DataFrame:
    return pl.DataFrame({"prompt_id": list(rows), "text": list(rows.values())})


def test_a_short_eval_question_inside_a_long_prompt_is_caught():
    items = pl.DataFrame({"benchmark": ["astro", "astro"], "item": [QUESTION, "Name the largest moon of Jupiter."]})
    texts = _texts({
        "inside": LONG,
        "common": "Which of these is closest to your heart: the planet, the sun or the sea? Tell me why it is.",
        "reordered": "The Sun: which planet is it closest to? I always forget this for my quiz night, so help.",
        "equal": "which planet is closest to the sun",
        "other": "Write a haiku about autumn leaves falling on a quiet pond in the early morning light.",
    })  # fmt: skip
    hits = contaminated(texts, items, 13, CurationSpec().ngram_min)
    assert hits.select("prompt_id", "benchmark", "item").rows() == [("equal", "astro", QUESTION),
                                                                    ("inside", "astro", QUESTION)]  # fmt: skip
    assert hits["gram"].to_list() == ["which planet is closest to the sun"] * 2  # the item's whole sequence
    # without containment (ngram_min above the item's length) only the equal prompt matches, as before
    assert contaminated(texts, items, 13, 8)["prompt_id"].to_list() == ["equal"]


def test_items_below_ngram_min_match_only_equal_prompts_and_long_items_still_by_ngrams():
    items = pl.DataFrame({"benchmark": ["tiny", "long"],
                          "item": ["the sun", f"Question: {LONG} Answer: Mercury."]})  # fmt: skip
    texts = _texts({"a": "Why is the sun yellow when we see it from the surface of the Earth at noon?",
                    "b": "The Sun!", "c": LONG})  # fmt: skip
    hits = contaminated(texts, items, 13, 5)
    assert hits.select("prompt_id", "benchmark").rows() == [("b", "tiny"), ("c", "long")]
    assert len(hits.filter(pl.col("prompt_id") == "c")["gram"][0].split()) == 13


def test_a_short_prompt_inside_a_long_eval_item_is_caught():
    """The reverse direction: a benchmark's question asked alone, its item holding context and answer."""
    items = pl.DataFrame({"benchmark": ["quiz"], "item": [f"Context: {LONG} Question: Which planet is closest to "
                                                          "the Sun? Answer: Mercury."]})  # fmt: skip
    texts = _texts({"alone": QUESTION, "common": "Which planet do you like the most?",
                    "tiny": "the sun"})  # fmt: skip
    hits = contaminated(texts, items, 13, 5)
    assert hits.select("prompt_id", "benchmark", "gram").rows() == [("alone", "quiz",
                                                                     "which planet is closest to the sun")]
    assert contaminated(texts, items, 13, 8).is_empty()  # the 7-word prompt is below ngram_min 8
