"""The report's plots: matplotlib (Agg) figures written as inline SVG, so the page has no script at all.

Each function takes frames the summary or the warehouse made and returns an `<svg>` element as text, or None when
there is nothing to draw (the page then says so). Histograms are counted by polars; scatter plots draw at most
POINTS points per panel (a fixed draw: the first by content-addressed id), so the page stays small at any scale.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

POINTS = 600  # most points per scatter panel
BINS = 20
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")
STYLE = {"svg.fonttype": "none", "svg.hashsalt": "prefsynth", "font.size": 9, "axes.spines.top": False,
         "axes.spines.right": False, "axes.titlesize": 9, "figure.dpi": 72,
         "text.parse_math": False}  # names from the warehouse are plain text, `$` included (no mathtext)  # fmt: skip


def _svg(fig: Any) -> str:
    """The figure as an inline `<svg>` (no XML prolog, no date: the same data gives the same bytes)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _grid(n: int, draw: Callable[[Axes, int], None], width: float = 3.4, height: float = 2.6) -> str:
    """n panels, at most 3 a row, each drawn by draw(ax, i)."""
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i < n:
                draw(ax, i)
            else:
                ax.set_visible(False)
        fig.tight_layout()
        return _svg(fig)


def _hist(finite: pl.Series, bins: int = BINS) -> tuple[list[float], list[int]]:
    """Bin edges and counts of finite values (polars counts them); one bin around a single value."""
    lo, hi = float(finite.min()), float(finite.max())  # type: ignore[arg-type]
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    counts = finite.hist(bins=edges, include_category=False)["count"].to_list()
    return edges, counts


def _histograms(groups: list[pl.DataFrame], column: str, name: Callable[[pl.DataFrame], str], xlabel: str,
                ylabel: str, color: int = 0) -> str | None:  # fmt: skip
    """One histogram panel per group of its finite `column` values, titled `name: N ylabel`; a group with no
    finite value (all null, NaN or infinite) gets a panel that says so instead."""
    if not groups:
        return None

    def draw(ax: Axes, i: int) -> None:
        g = groups[i]
        finite = g[column].drop_nulls().filter(g[column].drop_nulls().is_finite())
        if finite.is_empty():
            ax.set_axis_off()
            ax.set_title(f"{name(g)}: no finite value to draw ({len(g)} {ylabel})")
            return
        edges, counts = _hist(finite)
        ax.stairs(counts, edges, fill=True, color=COLORS[(i + color) % len(COLORS)], alpha=0.8)
        ax.set_title(f"{name(g)}: {len(g)} {ylabel}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)

    return _grid(len(groups), draw)


def score_distributions(scores: pl.DataFrame) -> str | None:
    """One histogram per scorer of its values over the run's responses."""
    return _histograms(scores.partition_by("label", maintain_order=True), "value",
                       lambda g: f"{g['label'][0]} ({g['kind'][0]})", "score", "responses")  # fmt: skip


def margin_histograms(pairs: pl.DataFrame) -> str | None:
    """One histogram per pair source and scorer of the curated pairs' margins (score_chosen - score_rejected)."""
    groups = pairs.sort("source", "scorer").partition_by("source", "scorer", maintain_order=True)
    return _histograms(groups, "margin", lambda g: f"{g['source'][0]} by {g['scorer'][0]}", "margin (scorer units)",
                       "pairs")  # fmt: skip


def length_against_score(scores: pl.DataFrame) -> str | None:
    """Per scorer: reply length (completion tokens) against its score, with the Spearman correlation."""
    known = scores.drop_nulls(["tokens", "value"])
    groups = known.partition_by("label", maintain_order=True)
    if not groups:
        return None

    def draw(ax: Axes, i: int) -> None:
        g = groups[i]
        shown = g.sort("response_id").head(POINTS)
        rho = g.select(pl.corr("value", "tokens", method="spearman")).item()
        ax.scatter(shown["tokens"].to_list(), shown["value"].to_list(), s=10, alpha=0.6, color=COLORS[i % len(COLORS)],
                   linewidths=0)  # fmt: skip
        corr = "n/a" if rho is None or rho != rho else f"{rho:.2f}"
        ax.set_title(f"{g['label'][0]}: Spearman {corr}" + (f" ({POINTS} of {len(g)})" if len(g) > POINTS else ""))
        ax.set_xlabel("reply length (tokens)")
        ax.set_ylabel("score")

    return _grid(len(groups), draw)


def length_control(lengths: dict[str, Any], pairs: pl.DataFrame) -> str | None:
    """Left: histograms of log2(chosen / rejected length) before and after length control. Right: chosen against
    rejected length of the kept sampled pairs, with the line of equal length."""
    after = lengths["after"]
    if not after or not after["with_lengths"]:
        return None
    sampled = pairs.filter(pl.col("source") == "sampled").drop_nulls(["chosen_tokens", "rejected_tokens"])
    shown = sampled.sort("pair_id").head(POINTS)
    series = [("before length control", lengths["before"], "#999999")] if lengths["length_control"] and \
        lengths["before"] else []  # fmt: skip
    series.append(("kept pairs", after, COLORS[0]))

    def draw(ax: Axes, i: int) -> None:
        if i == 0:
            for name, prof, color in series:
                edges = [prof["log2_ratio_bins"][0] - 0.5, *prof["log2_ratio_bins"][1:-1],
                         prof["log2_ratio_bins"][-1] + 0.5]  # the outer bins hold the rest  # fmt: skip
                ax.stairs(prof["log2_ratio_counts"], edges, label=f"{name} ({prof['with_lengths']})", color=color,
                          linewidth=2, fill=name != "kept pairs", alpha=0.5 if name != "kept pairs" else 1)
            ax.axvline(0, color="black", linewidth=0.8, linestyle=":")
            ax.set_xlabel("log2(chosen / rejected length)")
            ax.set_ylabel("pairs")
            ax.set_title("chosen against rejected length")
            ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.3))
        else:
            ax.scatter(shown["rejected_tokens"].to_list(), shown["chosen_tokens"].to_list(), s=12, alpha=0.6,
                       color=COLORS[0], linewidths=0)  # fmt: skip
            top = max(float(shown["chosen_tokens"].max()), float(shown["rejected_tokens"].max()), 1.0)  # type: ignore[arg-type]
            ax.plot([0, top], [0, top], color="black", linewidth=0.8, linestyle=":")
            ax.set_xlabel("rejected length (tokens)")
            ax.set_ylabel("chosen length (tokens)")
            ax.set_title(f"kept pairs: {len(sampled)}" + (f" ({POINTS} shown)" if len(sampled) > POINTS else ""))

    return _grid(2 if len(shown) else 1, draw)


def bars(labels: Sequence[str], series: dict[str, Sequence[float | None]], title: str, xlabel: str,
         limit: tuple[float, float] | None = None) -> str | None:  # fmt: skip
    """Horizontal grouped bars: one group per label, one bar per series (None: not drawn)."""
    if not labels or all(v is None for values in series.values() for v in values):
        return None
    n = len(series)
    height = 0.8 / n
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7, max(1.6, 0.6 + 0.3 * len(labels) * n)))
        for j, (name, values) in enumerate(series.items()):
            ys = [i + j * height for i in range(len(labels))]
            xs = [float("nan") if v is None else v for v in values]
            ax.barh(ys, xs, height=height, label=name, color=COLORS[j % len(COLORS)])
            for y, x in zip(ys, xs, strict=True):
                if x == x:
                    ax.annotate(f"{x:.3g}", (x, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks([i + height * (n - 1) / 2 for i in range(len(labels))], list(labels))
        ax.invert_yaxis()
        if limit:
            ax.set_xlim(*limit)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        if n > 1:
            ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        return _svg(fig)


def alpha_histograms(alphas: pl.DataFrame) -> str | None:
    """Per panel: the histogram of its prompts' Krippendorff alpha."""
    return _histograms(alphas.partition_by("panel", maintain_order=True), "alpha",
                       lambda g: f"panel {g['panel'][0]}, alpha per prompt", "Krippendorff alpha", "prompts", color=2)


def funnel(funnel_frame: pl.DataFrame, steps_frame: pl.DataFrame) -> str | None:
    """Left: the rule's candidate pairs and what is left (blue) and removed (orange) after each pair filter.
    Right: prompts and replies removed by the filters before pairing."""
    early = steps_frame.filter(pl.col("unit") != "pairs")
    if funnel_frame.is_empty() and early.is_empty():
        return None
    panels = [p for p in ("pairs", "early") if (p == "pairs" and not funnel_frame.is_empty())
              or (p == "early" and not early.is_empty())]  # fmt: skip

    def draw(ax: Axes, i: int) -> None:
        if panels[i] == "pairs":
            labels = funnel_frame["step"].to_list()
            ys = list(range(len(labels)))
            ax.barh(ys, funnel_frame["left"].to_list(), color=COLORS[0])
            ax.barh(ys, funnel_frame["removed"].to_list(), left=funnel_frame["left"].to_list(), color=COLORS[1])
            for y, (left, removed) in enumerate(funnel_frame.select("left", "removed").iter_rows()):
                ax.annotate(f"{left} left" + (f", {removed} removed" if removed else ""), (left + removed, y),
                            xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)  # fmt: skip
            ax.set_yticks(ys, labels)
            ax.invert_yaxis()
            ax.set_xlim(0, max(1, int(funnel_frame["left"][0])) * 1.6)  # room for the labels
            ax.set_xlabel("pairs")
            ax.set_title("pairs left (blue) and removed (orange) by each filter")
        else:
            labels = [f"{s} ({u})" for s, u in early.select("step", "unit").iter_rows()]
            ys = list(range(len(labels)))
            ax.barh(ys, early["removed"].to_list(), color=COLORS[3])
            for y, n in enumerate(early["removed"].to_list()):
                ax.annotate(str(n), (n, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
            ax.set_yticks(ys, labels)
            ax.invert_yaxis()
            ax.set_xlim(0, max(1, *early["removed"].to_list()) * 1.15)
            ax.set_xlabel("removed")
            ax.set_title("prompts and replies removed before pairing")

    return _grid(len(panels), draw, width=4.6, height=0.8 + 0.35 * max(len(funnel_frame), len(early), 2))
