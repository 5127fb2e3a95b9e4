"""`prefsynth report` on a hand-made warehouse with known answers: the numbers the page shows, escaping, the
sections without data, the CLI's errors, and what length control changed (tasks/curate.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from prefsynth.cli import app
from prefsynth.report import write_report
from prefsynth.report.summary import artifact_table, markdown, pair_funnel, scorer_table
from prefsynth.schemas.config import CurationSpec
from prefsynth.tasks.curate import sampled_pairs
from prefsynth.warehouse.report import report_data
from prefsynth.warehouse.store import Store

EVIL = '<script>alert("x")</script> & <b>bold</b>'
# prompt -> [(response id, completion tokens, judge score)]
RESPONSES = {"p1": [("r11", 10, 9.0), ("r12", 20, 3.0)], "p2": [("r21", 40, 8.0), ("r22", 10, 6.0)],
             "p3": [("r31", 5, 2.0), ("r32", 5, 2.0)]}  # fmt: skip
PAIRS = [("pa", "p1", "r11", "r12", 9.0, 3.0), ("pb", "p2", "r21", "r22", 8.0, 6.0)]
CURATION = {"prompts_scored": 3, "truncated_responses": 0, "prompts_without_two": 0, "candidates": 3,
            "below_margin": 1, "length_ratio": 0, "kept": 2, "left_out_prompts": 1, "same_text": 0}  # fmt: skip


def _made(path: Path) -> Path:
    """A warehouse with one completed pipeline run (a pointwise judge, two pairs) and one eval run."""
    with Store(path) as store:
        con = store.con
        con.execute("INSERT INTO runs (run_id, name, config, kind) VALUES ('run1', 'made', '{}', 'synthesize'), "
                    "('ev1', 'an eval', '{}', 'eval')")  # fmt: skip
        lengths = {"length_control": True, "before": {"pairs": 3, "with_lengths": 3, "chosen_median": 10.0,
                   "rejected_median": 10.0, "chosen_longer": 0.3333, "log2_ratio_bins": [-1.0, 0.0, 1.0],
                   "log2_ratio_counts": [1, 2]},
                   "after": {"pairs": 2, "with_lengths": 2, "chosen_median": 25.0, "rejected_median": 15.0,
                             "chosen_longer": 0.5, "log2_ratio_bins": [-1.0, 0.0, 1.0], "log2_ratio_counts": [1, 1]}}
        # fmt: skip
        summary = {"curation": CURATION, "lengths": lengths, "pairs": 2}
        con.execute("INSERT INTO run_ends (run_id, status, summary) VALUES ('run1', 'completed', ?)",
                    [json.dumps(summary)])
        con.execute("INSERT INTO scorers (scorer_id, name, kind, config) VALUES ('sj', 'judge', 'pointwise_judge', "
                    "'{}')")
        for prompt, responses in RESPONSES.items():
            messages = json.dumps([{"role": "user", "content": f"question {prompt} {EVIL}"}])
            con.execute("INSERT INTO prompts (prompt_id, messages, source, source_ref, run_id) VALUES (?, ?, 'f', "
                        "'1', 'run1')", [prompt, messages])  # fmt: skip
            con.execute("INSERT INTO run_prompts VALUES ('run1', ?)", [prompt])
            for rid, tokens, value in responses:
                con.execute("INSERT INTO responses (response_id, prompt_id, model, model_identity, sampling, "
                            "sample_index, seed, text, finish_reason, completion_tokens, latency_ms, call_id, run_id) "
                            "VALUES (?, ?, 'm', 'm', '{}', 0, 0, ?, 'stop', ?, 1, 'c', 'run1')",
                            [rid, prompt, f"reply {rid} {EVIL}", tokens])  # fmt: skip
                con.execute("INSERT INTO scores (score_id, response_id, scorer_id, scorer, value, raw, call_ids, "
                            "run_id) VALUES (?, ?, 'sj', 'judge', ?, '', [], 'run1')",
                            [f"s{rid}", rid, value])  # fmt: skip
        for pid, prompt, chosen, rejected, sc, sr in PAIRS:
            con.execute("INSERT INTO pairs (pair_id, prompt_id, chosen_id, rejected_id, scorer_id, rule, score_chosen, "
                        "score_rejected, margin, run_id) VALUES (?, ?, ?, ?, 'sj', '{}', ?, ?, ?, 'run1')",
                        [pid, prompt, chosen, rejected, sc, sr, sc - sr])  # fmt: skip
            con.execute("INSERT INTO run_pairs VALUES ('run1', ?)", [pid])
        con.execute("INSERT INTO scorer_diagnostics (run_id, scorer_id, scorer, items, failed, failure_rate) "
                    "VALUES ('run1', 'sj', 'judge', 6, 0, 0.0)")  # fmt: skip
        con.execute("CHECKPOINT")
    return path


@pytest.fixture
def made(tmp_path: Path) -> Path:
    return _made(tmp_path / "made.duckdb")


def test_the_numbers_the_report_shows(made: Path):
    with Store(made, read_only=True) as store:
        data = report_data(store)  # the newest completed pipeline run, not the eval run
    assert data.run["run_id"] == "run1" and data.run["prompts"] == 3
    judge = scorer_table(data).row(0, named=True)
    assert judge["label"] == "judge" and judge["responses"] == 6
    assert judge["mean"] == pytest.approx(30 / 6) and judge["median"] == pytest.approx(4.5)
    assert (judge["min"], judge["max"]) == (2.0, 9.0)
    assert sorted(data.pairs["margin"].to_list()) == [2.0, 6.0]
    # most confident: the largest margin over its source's largest (6/6), least: 2/6
    assert data.extremes["side"].to_list() == ["most", "most"]  # two pairs: both among the 5 most confident
    with Store(made, read_only=True) as store:
        one = report_data(store, extremes=1).extremes
    assert one.select("side", "pair_id").rows() == [("most", "pa"), ("least", "pb")]
    assert one["confidence"].to_list() == [1.0, pytest.approx(2 / 6)]
    assert one["prompt"][0] == f"question p1 {EVIL}"  # the last user message, as stored
    # the pair filters: 3 candidates, 1 below the margin, none over the length ratio, none the same text
    assert pair_funnel(data).to_dicts() == [{"step": "candidates", "left": 3, "removed": 0},
                                            {"step": "below_margin", "left": 2, "removed": 1},
                                            {"step": "length_ratio", "left": 2, "removed": 0},
                                            {"step": "same_text", "left": 2, "removed": 0}]  # fmt: skip
    table = artifact_table(data)
    assert table[0]["scorer"] == "judge" and table[0]["position_consistency"] is None
    text = markdown(data)
    assert "No pairwise judge in this run." in text and "No panel in this run." in text
    assert "| below_margin | pairs | below the margin | 1 |" in text


def test_lengths_before_and_after_length_control(made: Path):
    with Store(made, read_only=True) as store:
        data = report_data(store, "run1")
    from prefsynth.report.summary import lengths

    got = lengths(data)
    assert got["length_control"] and got["before"]["pairs"] == 3  # as curation recorded it
    after = got["after"]  # from the pairs: chosen 10 and 40 tokens against rejected 20 and 10
    assert (after["pairs"], after["chosen_median"], after["rejected_median"], after["chosen_longer"]) == (2, 25.0,
                                                                                                        15.0, 0.5)
    counts = dict(zip(after["log2_ratio_bins"][:-1], after["log2_ratio_counts"], strict=True))
    assert counts[-1.0] == 1 and counts[2.0] == 1 and sum(after["log2_ratio_counts"]) == 2  # log2 0.5 and log2 4


def test_curation_records_lengths_before_and_after_length_control():
    scores = pl.DataFrame({"prompt_id": ["p", "p", "p", "q", "q"], "response_id": ["a", "b", "c", "d", "e"],
                           "value": [9.0, 5.0, 1.0, 7.0, 2.0]})  # fmt: skip
    responses = pl.DataFrame({"response_id": ["a", "b", "c", "d", "e"], "tokens": [100, 40, 10, 30, 30],
                              "finish_reason": ["stop"] * 5}, schema_overrides={"tokens": pl.Int32})  # fmt: skip
    got = sampled_pairs(scores, responses, "s", CurationSpec(rule="best_vs_worst", max_length_ratio=3), 1.0)
    # best vs worst: a (100) vs c (10) is over the ratio, d (30) vs e (30) stays
    assert got.counts["length_ratio"] == 1 and got.pairs["chosen_id"].to_list() == ["d"]
    assert got.lengths["length_control"] is True
    assert got.lengths["before"]["pairs"] == 2 and got.lengths["before"]["chosen_longer"] == 0.5
    assert got.lengths["before"]["chosen_median"] == 65.0 and got.lengths["after"]["chosen_median"] == 30.0
    assert got.lengths["after"]["pairs"] == 1 and got.lengths["after"]["chosen_longer"] == 0.0
    # length_matched: of p's three pairs the most similar lengths (b 40 vs c 10 has ratio 4, a vs b 2.5)
    matched = sampled_pairs(scores, responses, "s", CurationSpec(rule="above_margin", length_matched=True), 1.0)
    assert matched.pairs.filter(pl.col("prompt_id") == "p")[["chosen_id", "rejected_id"]].rows() == [("a", "b")]
    assert matched.lengths["before"]["pairs"] == 4 and matched.lengths["after"]["pairs"] == 2
    plain = sampled_pairs(scores, responses, "s", CurationSpec(), 1.0)
    assert plain.lengths["length_control"] is False and plain.lengths["before"] == plain.lengths["after"]


def test_the_page_escapes_every_text_and_says_what_is_missing(made: Path, tmp_path: Path):
    _, out = write_report(made, tmp_path / "r" / "report.html")
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page.lower()  # neither the warehouse's texts nor the page's own
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;") >= 3
    assert "<b>bold" not in page
    for empty in ('id="empty-judges"', 'id="empty-panel"'):
        assert empty in page
    for plot in ("scores", "margins", "length-score", "lengths", "filters"):
        assert re.search(rf'<figure class="plot" id="plot-{plot}"><svg', page), plot
    # nothing to fetch: no external reference (SVG's xmlns and RDF namespaces are names, not requests)
    assert "Content-Security-Policy" in page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)""", page)
    assert not re.search(r"url\((?!#)", page) and "@import" not in page
    assert len(page) < 400_000


def test_cli_report_and_its_errors(made: Path, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "page.html"
    ok = runner.invoke(app, ["report", "--db", str(made), "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "report of run run1 (completed, 2 pairs)" in ok.output and out.exists()
    for args, message in ((["--run", "ev1"], "is a `prefsynth eval` run"), (["--run", "nope"], "has no run 'nope'")):
        bad = runner.invoke(app, ["report", "--db", str(made), "--out", str(out), *args])
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), bad.output
    with Store(tmp_path / "evals.duckdb") as store:
        store.con.execute("INSERT INTO runs (run_id, name, config, kind) VALUES ('e', 'eval', '{}', 'eval')")
    none = runner.invoke(app, ["report", "--db", str(tmp_path / "evals.duckdb"), "--out", str(out)])
    assert none.exit_code == 2 and "has no pipeline run (`prefsynth run` makes one)" in " ".join(none.output.split())
    gone = runner.invoke(app, ["report", "--db", str(tmp_path / "none.duckdb"), "--out", str(out)])
    assert gone.exit_code == 2 and "warehouse not found" in " ".join(gone.output.split())
    assert not (tmp_path / "none.duckdb").exists()


def test_stats_shows_what_length_control_changed(made: Path):
    result = CliRunner().invoke(app, ["stats", "--db", str(made), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["length_control"] == [{
        "run_id": "run1", "before_pairs": 3, "before_chosen_median": 10.0, "before_rejected_median": 10.0,
        "before_chosen_longer": 0.3333, "after_pairs": 2, "after_chosen_median": 25.0, "after_rejected_median": 15.0,
        "after_chosen_longer": 0.5}]
    text = CliRunner().invoke(app, ["stats", "--db", str(made)], env={"COLUMNS": "250"}).output
    assert "length control: chosen against rejected tokens" in text


def test_report_help_has_an_example():
    result = CliRunner().invoke(app, ["report", "--help"])
    assert result.exit_code == 0 and "Example: prefsynth report --db prefsynth.duckdb --out report.html" in " ".join(
        result.output.split())


def test_report_while_a_run_holds_the_warehouse(made: Path, tmp_path: Path):
    """Another process reads through the run that holds the file (warehouse/sharing.py)."""
    import subprocess
    import sys

    out = tmp_path / "held.html"
    with Store(made, wait_s=0) as holder:  # a run's store: holds the file and serves it
        done = subprocess.run([sys.executable, "-m", "prefsynth.cli", "report", "--db", str(made), "--out", str(out)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert holder.con.execute("SELECT count(*) FROM runs").fetchone() == (2,)  # it still holds the file
    assert done.returncode == 0, done.stdout + done.stderr
    assert "report of run run1 (completed, 2 pairs)" in done.stdout
    assert 'id="plot-margins"' in out.read_text(encoding="utf-8")


def test_plot_labels_from_the_warehouse_are_escaped_in_the_svg():
    from prefsynth.report import plots

    frame = pl.DataFrame({"label": [EVIL] * 3, "kind": ["k"] * 3, "value": [1.0, 2.0, 3.0], "tokens": [1, 2, 3],
                          "response_id": ["a", "b", "c"]})  # fmt: skip
    svg = plots.score_distributions(frame)
    assert svg is not None and "<script" not in svg and "&lt;script&gt;" in svg


def test_a_run_still_running_has_no_curation_counts_yet(made: Path, tmp_path: Path):
    with Store(made) as store:
        store.con.execute("INSERT INTO runs (run_id, name, config, kind) VALUES ('run2', 'busy', '{}', 'synthesize')")
        store.con.execute("INSERT INTO run_prompts VALUES ('run2', 'p1')")
    data, out = write_report(made, tmp_path / "busy.html", "run2")
    page = out.read_text(encoding="utf-8")
    assert data.run["status"] == "running or interrupted" and data.pairs.is_empty()
    assert "The run has not finished: no curation counts yet." in page and 'id="plot-scores"' in page


def test_a_run_from_before_lengths_were_recorded_still_shows_it_had_length_control(made: Path, tmp_path: Path):
    with Store(made) as store:
        store.con.execute("UPDATE pairs SET rule = '{\"max_length_ratio\": 2.0}'")
        store.con.execute("UPDATE run_ends SET summary = '{}'")
    _, out = write_report(made, tmp_path / "old.html")
    page = out.read_text(encoding="utf-8")
    assert "This run recorded no lengths before length control." in page and 'id="plot-lengths"' in page


MATH = r"a $\frac$ x"  # mathtext that matplotlib cannot parse: drawn as plain text


def test_a_scorer_with_no_finite_value_and_names_with_dollars_still_make_the_page(made: Path, tmp_path: Path):
    with Store(made) as store:
        con = store.con
        con.execute("UPDATE scorers SET name = ? WHERE scorer_id = 'sj'", [MATH])
        con.execute("UPDATE scores SET scorer = ? WHERE scorer_id = 'sj'", [MATH])
        con.execute("INSERT INTO scorers (scorer_id, name, kind, config) VALUES ('sn', 'broken', 'pointwise_judge', "
                    "'{}')")  # fmt: skip
        for i, (rid, value) in enumerate((("r11", "nan"), ("r12", "inf"), ("r21", "-inf"))):
            con.execute("INSERT INTO scores (score_id, response_id, scorer_id, scorer, value, raw, call_ids, run_id) "
                        "VALUES (?, ?, 'sn', 'broken', CAST(? AS DOUBLE), '', [], 'run1')", [f"n{i}", rid, value])
        con.execute("INSERT INTO scorer_diagnostics (run_id, scorer_id, scorer, items, failed, failure_rate) "
                    "VALUES ('run1', 'sn', 'broken', 3, 0, 0.0)")  # fmt: skip
        con.execute("CHECKPOINT")
    with Store(made, read_only=True) as store:
        scores = report_data(store).scores
    assert scores.filter(pl.col("scorer_id") == "sn")["value"].is_finite().sum() == 0  # precondition
    _, out = write_report(made, tmp_path / "odd.html")
    page = out.read_text(encoding="utf-8")
    assert re.search(r'<figure class="plot" id="plot-scores"><svg', page)
    assert "broken (pointwise_judge): no finite value to draw (3 responses)" in page
    assert "a $\\frac$ x" in page  # in the tables and, as plain text, in the plots
    result = CliRunner().invoke(app, ["report", "--db", str(made), "--out", str(tmp_path / "cli.html")])
    assert result.exit_code == 0, result.output


def test_every_plot_draws_text_with_dollars_as_plain_text_and_skips_groups_with_nothing_finite():
    from prefsynth.report import plots

    margins = pl.DataFrame({"source": [MATH, MATH, "s"], "scorer": [MATH, MATH, "t"],
                            "margin": [1.0, 2.0, float("inf")]})  # fmt: skip
    svg = plots.margin_histograms(margins)
    assert svg is not None and r"$\frac$" in svg and "s by t: no finite value to draw (1 pairs)" in svg
    assert plots.bars([MATH, "b"], {MATH: [0.5, 0.2], "other": [0.1, None]}, MATH, MATH) is not None  # legend, ticks
    alphas = pl.DataFrame({"panel": [MATH, MATH, "q"], "alpha": [0.1, 0.5, float("nan")]})
    svg = plots.alpha_histograms(alphas)
    assert svg is not None and "panel q, alpha per prompt: no finite value to draw (1 prompts)" in svg
    scores = pl.DataFrame({"label": [MATH] * 3, "kind": ["k"] * 3, "value": [1.0, 2.0, 3.0], "tokens": [1, 2, 3],
                           "response_id": ["a", "b", "c"]})  # fmt: skip
    assert plots.length_against_score(scores) is not None
