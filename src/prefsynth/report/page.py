"""The report page: one self-contained HTML file. Styles are inline, plots are inline SVG, there is no script,
and a Content-Security-Policy forbids the page any request (no network is needed to view it, none is tried).
Every text from the warehouse goes through html.escape.
"""

from __future__ import annotations

import html
import json

import polars as pl

from prefsynth.report import plots
from prefsynth.report import summary as sm
from prefsynth.warehouse.report import ReportData

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1150px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 3px 6px; }
th { background: #f5f5f5; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure.plot { margin: 0.5em 0; } figure.plot svg { max-width: 100%; height: auto; }
p.empty { color: #777; font-style: italic; }
table.pairs td { vertical-align: top; max-width: 320px; }
table.pairs div.text { max-height: 12em; overflow: auto; white-space: pre-wrap; font-size: 12px; }
"""


def esc(value: object) -> str:
    """Any value as HTML text (numbers rounded)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if value != value else f"{value:.4g}"
    return html.escape(str(value), quote=True)


def _td(value: object, number: bool) -> str:
    return f'<td class="n">{esc(value)}</td>' if number else f"<td>{esc(value)}</td>"


def table(frame: pl.DataFrame, cls: str = "") -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(_td(v, isinstance(v, int | float)) for v in row) + "</tr>"
                   for row in frame.iter_rows())  # fmt: skip
    return f'<table class="{cls}"><tr>{head}</tr>{rows}</table>'


def figure(name: str, svg: str | None, empty: str) -> str:
    """A plot, or a sentence saying why there is none."""
    if svg is None:
        return f'<p class="empty" id="empty-{name}">{esc(empty)}</p>'
    return f'<figure class="plot" id="plot-{name}">{svg}</figure>'


def _pairs_table(frame: pl.DataFrame) -> str:
    cols = ("source", "scorer", "confidence", "margin", "score_chosen", "score_rejected")
    head = "".join(f"<th>{c}</th>" for c in (*cols, "prompt", "chosen", "rejected"))
    rows = []
    for row in frame.iter_rows(named=True):  # at most 2 * EXTREMES rows
        nums = "".join(_td(row[c], c not in ("source", "scorer")) for c in cols)
        texts = "".join(f'<td><div class="text">{esc(row[c])}</div></td>'
                        for c in ("prompt", "chosen_text", "rejected_text"))  # fmt: skip
        rows.append(f"<tr>{nums}{texts}</tr>")
    return f'<table class="pairs"><tr>{head}</tr>{"".join(rows)}</table>'


def render(data: ReportData) -> str:
    """The whole page."""
    run, scores = data.run, sm.labelled(data.scores)
    lengths = sm.lengths(data)
    judges, taus, alphas = sm.judge_table(data), sm.panel_taus(data), sm.prompt_alphas(data)
    steps, funnel = sm.steps(data), sm.pair_funnel(data)
    parts = [f"<h1>prefsynth report: run {esc(run['run_id'])}</h1>",
             f"<p>{esc(run['name'])} · {esc(run['status'])} · started {esc(run['started_at'])} · finished "
             f"{esc(run['finished_at'])} · {esc(run['prompts'])} prompts · {len(data.pairs)} pairs</p>"]  # fmt: skip

    parts += ["<h2>Score distribution per scorer</h2>",
              figure("scores", plots.score_distributions(scores), "No scores in this run."),
              table(sm.scorer_table(data)) if not scores.is_empty() else ""]  # fmt: skip

    parts += ["<h2>Margins of the curated pairs</h2>",
              figure("margins", plots.margin_histograms(data.pairs), "No curated pairs in this run.")]

    parts += ["<h2>Reply length against score</h2>",
              figure("length-score", plots.length_against_score(scores), "No scored replies with a known length.")]

    parts.append("<h2>Length of chosen against rejected, before and after length control</h2>")
    if not lengths["length_control"]:
        parts.append('<p class="empty" id="no-length-control">This run\'s curation has no length control '
                     "(max_length_ratio, length_matched): the kept pairs are shown.</p>")  # fmt: skip
    elif not lengths["before"]:
        parts.append('<p class="empty">This run recorded no lengths before length control.</p>')
    parts.append(figure("lengths", plots.length_control(lengths, data.pairs), "No sampled pairs with known lengths."))
    parts.append(table(sm.length_rows(lengths)))

    parts.append("<h2>Judges: position consistency</h2>")
    parts.append(figure("judges", plots.bars(
        judges["scorer"].to_list(), {c: judges[c].to_list() for c in ("position_consistency", "first_position_rate",
                                                                      "flipped", "ties")},
        "pairwise judges (share of comparisons)", "share", (0, 1.15)), "No pairwise judge in this run."))  # fmt: skip
    if not judges.is_empty():
        parts.append(table(judges))

    parts.append("<h2>Panel agreement</h2>")
    if data.panels.is_empty():
        parts.append('<p class="empty" id="empty-panel">No panel in this run.</p>')
    else:
        parts.append(table(data.panels.with_columns(pl.col("members").list.join(", "))))
        labels = [f"{p}: {a} / {b}" for p, a, b in taus.select("panel", "scorer_a", "scorer_b").iter_rows()]
        parts.append(figure("panel-tau", plots.bars(labels, {"mean Kendall tau": taus["mean_tau"].to_list()},
                                                    "members' agreement (mean Kendall tau over prompts)", "tau",
                                                    (-1.1, 1.25)), "No member pair with a defined tau."))  # fmt: skip
        parts.append(figure("panel-alpha", plots.alpha_histograms(alphas), "No prompt with a defined alpha."))

    parts.append("<h2>Pairs kept and dropped by each filter</h2>")
    parts.append(figure("filters", plots.funnel(funnel, steps),
                        "The run has not finished: no curation counts yet." if not data.summary else
                        "The run's curation recorded no counts."))  # fmt: skip
    if not steps.is_empty():
        parts.append(table(steps))

    parts.append("<h2>Most and least confident pairs</h2>")
    parts.append("<p>Confidence: the margin over the largest margin of the same source and scorer.</p>")
    for end in ("most", "least"):
        rows_of = data.extremes.filter(pl.col("side") == end)
        parts.append(f"<h3>{end} confident</h3>")
        parts.append(_pairs_table(rows_of) if not rows_of.is_empty() else '<p class="empty">No pairs.</p>')

    parts.append(f"<h2>Run summary</h2><details><summary>JSON</summary><pre>"
                 f"{esc(json.dumps(data.summary, indent=1, sort_keys=True))}</pre></details>")  # fmt: skip
    return _page(f"prefsynth report {run['run_id'][:12]}", "\n".join(parts))


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")  # fmt: skip


