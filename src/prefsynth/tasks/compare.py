"""Pairwise scoring in the pipeline: which pairs of responses to judge, and per-response values from verdicts.

Every two responses to a prompt are compared once (n responses: n(n-1)/2 comparisons), a being the one with
the smaller id. A response's value is its mean share over its comparisons (win 1, tie 0.5, loss 0;
comparisons dropped for flipping are left out), written only once every comparison of its prompt is done,
under an id that names its opponents: adding a policy model gives new values, never stale ones.
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations

import polars as pl

from prefsynth.schemas.records import Message, Score
from prefsynth.tasks.scorers.base import PairItem
from prefsynth.warehouse.ids import content_id


def comparison_id(scorer_id: str, a: str, b: str) -> str:
    return content_id("comparison", scorer_id, a, b)


def prompt_pairs(scorer_id: str, prompt_id: str, messages: list[Message], responses: list[tuple[str, str]]) -> list[
        PairItem]:  # fmt: skip
    """Every two of a prompt's responses ((response_id, text)), a being the one with the smaller id."""
    return [PairItem(comparison_id(scorer_id, a[0], b[0]), prompt_id, messages, a, b)
            for a, b in combinations(sorted(responses), 2)]  # fmt: skip


def plan_comparisons(responses: pl.DataFrame, scorer_id: str) -> list[PairItem]:
    """responses: response_id, prompt_id, messages (JSON), text -> every pair per prompt, sorted by id."""
    by_prompt: dict[str, list[tuple[str, str]]] = defaultdict(list)
    messages: dict[str, str] = {}
    for rid, pid, msgs, text in responses.select("response_id", "prompt_id", "messages", "text").iter_rows():
        by_prompt[pid].append((rid, text))
        messages[pid] = msgs
    return [item for pid in sorted(by_prompt)
            for item in prompt_pairs(scorer_id, pid, [Message(**m) for m in json.loads(messages[pid])], by_prompt[pid])]


def comparison_scores(items: list[PairItem], comparisons: pl.DataFrame, scorer_id: str, scorer: str) -> list[Score]:
    """Scores of the responses whose prompt has every planned comparison done."""
    done = {row["comparison_id"]: row for row in comparisons.iter_rows(named=True)}
    planned: dict[str, list[PairItem]] = defaultdict(list)
    for item in items:
        planned[item.prompt_id].append(item)
    scores = []
    for pid in sorted(planned):
        group = planned[pid]
        if not all(i.comparison_id in done for i in group):
            continue
        opponents = sorted(i.comparison_id for i in group)
        tally: dict[str, dict[str, float]] = defaultdict(lambda: {"wins": 0, "ties": 0, "losses": 0, "dropped": 0,
                                                                  "share": 0.0})  # fmt: skip
        for item in group:
            row = done[item.comparison_id]
            for rid, share, me in ((item.a[0], row["score_a"], "a"), (item.b[0], 1 - row["score_a"], "b")):
                t = tally[rid]
                winner = row["winner"]
                if winner is None:
                    t["dropped"] += 1
                    continue
                t["share"] += share
                t["wins" if winner == me else "ties" if winner == "tie" else "losses"] += 1
        for rid in sorted(tally):
            t = tally[rid]
            counted = t["wins"] + t["ties"] + t["losses"]
            if not counted:
                continue
            details = {k: int(v) for k, v in t.items() if k != "share"}
            scores.append(Score(
                score_id=content_id("score", rid, scorer_id, opponents), response_id=rid, scorer_id=scorer_id,
                scorer=scorer, value=t["share"] / counted, rationale=None, raw="", call_ids=[],
                details=json.dumps(details, sort_keys=True),
            ))  # fmt: skip
    return scores
