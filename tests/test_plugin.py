"""A scorer kind from an installed package (entry point `prefsynth.scorers`) runs in a pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

import prefsynth
from prefsynth.errors import ConfigError

PLUGIN = '''
from typing import Any, Literal

from prefsynth.schemas.config import ScorerSpec
from prefsynth.schemas.records import Score
from prefsynth.tasks.scorers import PointwiseScorer, ScoreItem, ScoreOutcome


class WordsSpec(ScorerSpec):
    kind: Literal["words"] = "words"
    name: str = "words"
    weight: float = 1.0


class Words(PointwiseScorer):
    """A response's word count times `weight` (a length signal, no model)."""

    Spec = WordsSpec

    def identity(self) -> dict[str, Any]:
        return {"weight": self.spec.weight}

    async def score(self, clients: Any, item: ScoreItem) -> ScoreOutcome:
        value = len(item.response.split()) * self.spec.weight
        return ScoreOutcome(score=Score(score_id=item.score_id, response_id=item.response_id, scorer_id=self.scorer_id,
                                        scorer=self.name, value=value, rationale=None, raw="", call_ids=[]))


class NotAScorer:
    pass
'''


def install(site: Path, entry_points: str) -> None:
    """What `pip install` leaves: the module and a dist-info folder with its entry points."""
    (site / "prefsynth_words.py").write_text(PLUGIN)
    info = site / "prefsynth_words-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: prefsynth-words\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[prefsynth.scorers]\n{entry_points}\n")


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install(site, "words = prefsynth_words:Words\nbroken = prefsynth_words:NotAScorer")
    monkeypatch.syspath_prepend(str(site))


@pytest.mark.model
def test_an_installed_scorer_kind_runs_in_a_pipeline(tmp_path: Path, plugin: None, prefect_harness) -> None:
    config = {"generation": {"models": [{"gguf": "smollm2-135m-instruct"}], "samples_per_prompt": 3,
                             "sampling": {"temperature": 1.0, "max_tokens": 16, "seed": 2}},
              "scorers": [{"kind": "words", "weight": 0.5}], "curation": {"min_margin": 0, "allow_truncated": True},
              "warehouse": str(tmp_path / "w.duckdb")}  # fmt: skip
    result = prefsynth.run(config, prompts=["Describe the sea.", "Describe a forest.", "Describe a city."])
    assert result.status == "completed" and result.counts["score[words]"].new == 9, "precondition: it scored"
    wh = prefsynth.Warehouse(result.warehouse)
    scores = wh.scores(run=result.run_id, scorer="words").join(
        wh.responses(run=result.run_id).select("response_id", "text"), on="response_id")
    assert len(scores) == 9
    assert scores["value"].to_list() == [len(t.split()) * 0.5 for t in scores["text"]]
    assert result.summary.pairs > 0
    assert (result.pairs["score_chosen"] > result.pairs["score_rejected"]).all()


def test_an_installed_scorer_kind_validates_and_scores_outside_a_pipeline(plugin: None) -> None:
    from prefsynth.tasks.scorers.registry import kinds

    assert {"words", "broken", "cdr"} <= set(kinds())
    out = prefsynth.score({"kind": "words", "weight": 2}, [("Say hi.", "hi there"), ("Count.", "one two three")])
    assert out["value"].to_list() == [4.0, 6.0] and out["error"].is_null().all()
    with pytest.raises(ConfigError, match="weight: Input should be a valid number"):
        prefsynth.score({"kind": "words", "weight": "heavy"}, [])
    with pytest.raises(ConfigError, match="broken = 'prefsynth_words:NotAScorer' .* is not a Scorer subclass"):
        prefsynth.score({"kind": "broken"}, [])


def test_without_the_package_the_kind_is_unknown() -> None:
    with pytest.raises(ConfigError, match="unknown kind 'words'"):
        prefsynth.score({"kind": "words"}, [])


def test_two_kinds_with_the_same_settings_have_different_scorer_ids() -> None:
    from typing import Any, Literal

    from prefsynth.schemas.config import ScorerSpec
    from prefsynth.tasks.scorers import PointwiseScorer

    class WordsSpec(ScorerSpec):
        kind: Literal["words"] = "words"
        name: str = "n"

    class CharsSpec(ScorerSpec):
        kind: Literal["chars"] = "chars"
        name: str = "n"

    class Words(PointwiseScorer):
        Spec = WordsSpec

        def identity(self) -> dict[str, Any]:
            return {}

        async def score(self, clients: Any, item: Any) -> Any: ...

    class Chars(Words):
        Spec = CharsSpec

    assert Words(WordsSpec(), {}).scorer_id != Chars(CharsSpec(), {}).scorer_id
