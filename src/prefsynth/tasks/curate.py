"""Curate: turn scores into chosen/rejected pairs by a rule. Pure polars; no model calls.

Rules (`curation.rule`, one or a list; every pair says its `source`). Over sampled responses (one of them,
source sampled), each prompt's usable responses (a value, not cut off at max_tokens unless allow_truncated):
- best_vs_worst: the highest against the lowest. Ties break by the smaller response id.
- best_vs_random: the highest against one lower response drawn with `seed` among those below it by the
  margin (the rule of `ultrafeedback_binarized`; the same seed draws the same pairs).
- above_margin: every pair whose gap reaches the margin.
- top_k_vs_bottom_k: each of the k highest against each of the k lowest (k at most half the responses).
Then: the margin (chosen - rejected >= the threshold, and > 0), the length ratio, agreement of other
scorers, and at most max_pairs_per_prompt per prompt (largest margins first, or the most similar lengths
first with length_matched). `Curated.counts` says what each step removed; `Curated.lengths` how length control
(max_length_ratio, length_matched) changed the lengths of chosen against rejected (`length_profile`).
With a teacher:
- refined_vs_original (teacher_refinement): each kept teacher refinement against its parent, margin s_w - s_l
  on the teacher's calibrated 1-10 scale (kept: texts differ and the margin > teacher.min_gap).
- anchor_vs_sampled (teacher_anchor): the teacher's own answer against each sampled response of its prompt
  that the curation scorer scores lower (by the margin, and > 0).

The margin threshold (`min_margin`): a number in the scorer's units; {z: x} standard deviations of its values
over the run; {quantile: q} of the run's positive gaps (each prompt's best - worst); auto: 1 point for a judge
with a scale, any positive gap for unitless scorers (CDR log-ratios, pairwise win shares, rewards, panels).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from prefsynth.schemas.config import CurationSpec, QuantileMargin, ZMargin
from prefsynth.schemas.records import Refinement, columns
from prefsynth.warehouse.ids import canonical_json, pair_id

VALID = pl.col("value").is_not_null() & pl.col("value").is_finite()
STEPS = ("truncated_responses", "prompts_without_two", "below_margin", "length_ratio", "disagreement",
         "over_cap")  # fmt: skip
# log2(chosen tokens / rejected tokens): the bin edges of Curated.lengths' histograms (the outer bins take the rest)
RATIO_BINS = tuple(x / 2 for x in range(-6, 7))


@dataclass
class Curated:
    """A sampled rule's pairs, and what each step removed (`counts`, in the order of STEPS)."""

    pairs: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, object] = field(default_factory=dict)  # {"length_control", "before", "after"}

    def empty_because(self) -> str | None:
        """The step that removed the most, when nothing is left of scored prompts."""
        removed = {k: v for k, v in self.counts.items() if k in STEPS and v}
        if len(self.pairs) or not self.counts.get("prompts_scored") or not removed:
            return None
        return max(removed, key=lambda k: removed[k])


def threshold(spec: CurationSpec, scores: pl.DataFrame, scaled: bool) -> float:
    """min_margin as a number in the scorer's units (`scaled`: the scorer has a fixed scale, e.g. 1-10)."""
    margin, valid = spec.min_margin, scores.filter(VALID)
    if margin == "auto":
        return 1.0 if scaled else 0.0
    if isinstance(margin, ZMargin):
        std = valid["value"].std() if len(valid) > 1 else None
        return margin.z * float(std or 0.0)
    if isinstance(margin, QuantileMargin):
        gaps = (valid.group_by("prompt_id").agg(gap=pl.col("value").max() - pl.col("value").min())
                .filter(pl.col("gap") > 0)["gap"])  # fmt: skip
        return float(gaps.quantile(margin.quantile, "linear")) if len(gaps) else 0.0
    return float(margin)


def rule_of(spec: CurationSpec, scorer_id: str, margin: float, agree_ids: list[str] | None = None) -> dict[str, object]:
    """What a sampled pair's id records of how it was chosen (keys only when used, so ids stay stable)."""
    name = spec.sampled_rule or "best_vs_worst"
    rule: dict[str, object] = {"rule": name, "min_margin": margin, "scorer_id": scorer_id}
    if not isinstance(spec.min_margin, float | int | str):  # z or quantile: the form too, not just its value
        rule["margin_spec"] = spec.min_margin.model_dump()
    extra = {"k": spec.k if name == "top_k_vs_bottom_k" else None,
             "seed": spec.seed if name == "best_vs_random" else None,
             "allow_truncated": spec.allow_truncated or None, "max_length_ratio": spec.max_length_ratio,
             "length_matched": spec.length_matched or None,
             "max_pairs_per_prompt": spec.max_pairs_per_prompt}  # fmt: skip
    rule.update({k: v for k, v in extra.items() if v is not None})
    if agree_ids:
        rule["require_agreement"] = sorted(agree_ids)
    return rule


def length_profile(pairs: pl.DataFrame) -> dict[str, object]:
    """Lengths of chosen against rejected over pairs with chosen_tokens and rejected_tokens: medians, the
    share where the chosen reply is longer, and the histogram of log2(chosen / rejected) over RATIO_BINS."""
    known = pairs.drop_nulls(["chosen_tokens", "rejected_tokens"])
    log2 = (known["chosen_tokens"].clip(1).cast(pl.Float64) / known["rejected_tokens"].clip(1)).log(2)
    inner = [int(((log2 >= lo) & (log2 < hi)).sum()) for lo, hi in zip(RATIO_BINS[:-1], RATIO_BINS[1:], strict=True)]
    inner[0] += int((log2 < RATIO_BINS[0]).sum())
    inner[-1] += int((log2 >= RATIO_BINS[-1]).sum())

    def median(col: str) -> float | None:
        return None if known.is_empty() else float(known[col].median())  # type: ignore[arg-type]

    return {"pairs": len(pairs), "with_lengths": len(known), "chosen_median": median("chosen_tokens"),
            "rejected_median": median("rejected_tokens"),
            "chosen_longer": None if known.is_empty() else
            round(float((known["chosen_tokens"] > known["rejected_tokens"]).mean()), 4),  # type: ignore[arg-type]
            "log2_ratio_bins": list(RATIO_BINS), "log2_ratio_counts": inner}  # fmt: skip


def _agreeing(pairs: pl.DataFrame, agree: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """The pairs whose chosen response each of these scorers scores strictly above the rejected one."""
    for other in agree.values():
        vals = other.select("response_id", "value")
        joined = pairs.join(vals.rename({"response_id": "chosen_id", "value": "_c"}), on="chosen_id", how="left")
        joined = joined.join(vals.rename({"response_id": "rejected_id", "value": "_r"}), on="rejected_id", how="left")
        agrees = (pl.col("_c") > pl.col("_r")) & pl.col("_c").is_finite() & pl.col("_r").is_finite()
        pairs = joined.filter(agrees).drop("_c", "_r")
    return pairs


def _capped(pairs: pl.DataFrame, cap: int | None, by_ratio: bool) -> pl.DataFrame:
    """At most `cap` pairs per prompt: the most similar lengths first (`by_ratio`), then the largest margins."""
    order = (["ratio"] if by_ratio else []) + ["margin", "chosen_id", "rejected_id"]
    descending = ([False] if by_ratio else []) + [True, False, False]
    pairs = pairs.sort(["prompt_id", *order], descending=[False, *descending], nulls_last=True)
    return pairs if cap is None else pairs.group_by("prompt_id", maintain_order=True).head(cap)


def _draw(seed: int, response_id: str) -> str:
    return hashlib.sha256(f"{seed}:{response_id}".encode()).hexdigest()


def _candidates(rule: str, usable: pl.DataFrame, margin: float, spec: CurationSpec) -> pl.DataFrame:
    """prompt_id, chosen_id, rejected_id, score_chosen, score_rejected of a rule, before the margin."""
    ranked = usable.with_columns(
        hi=pl.struct((-pl.col("value")).alias("v"), "response_id").rank("ordinal").over("prompt_id"),
        lo=pl.struct("value", "response_id").rank("ordinal").over("prompt_id"),
        n=pl.len().over("prompt_id"),
    ).filter(pl.col("n") >= 2)
    if rule == "top_k_vs_bottom_k":  # one order for both ends, so the top k and the bottom k never overlap
        ranked = ranked.with_columns(lo=pl.col("n") + 1 - pl.col("hi"))
    side = {"chosen": ranked.select("prompt_id", "hi", "lo", "n", chosen_id="response_id", score_chosen="value"),
            "rejected": ranked.select("prompt_id", "hi", "lo", rejected_id="response_id",
                                      score_rejected="value")}  # fmt: skip
    if rule == "best_vs_worst":
        return side["chosen"].filter(pl.col("hi") == 1).join(side["rejected"].filter(pl.col("lo") == 1), on="prompt_id")
    if rule == "top_k_vs_bottom_k":
        top = side["chosen"].filter(pl.col("hi") <= pl.min_horizontal(pl.lit(spec.k), pl.col("n") // 2))
        bottom = side["rejected"].join(ranked.select("prompt_id", "n").unique(), on="prompt_id")
        bottom = bottom.filter(pl.col("lo") <= pl.min_horizontal(pl.lit(spec.k), pl.col("n") // 2)).drop("n")
        return top.join(bottom, on="prompt_id")
    pairs = side["chosen"].join(side["rejected"], on="prompt_id").filter(pl.col("chosen_id") != pl.col("rejected_id"))
    if rule == "above_margin":
        return pairs
    # best_vs_random: the best against one drawn among those below it by the margin
    lower = pairs.filter((pl.col("hi") == 1) & (pl.col("score_chosen") - pl.col("score_rejected") >= margin)
                         & (pl.col("score_chosen") > pl.col("score_rejected")))  # fmt: skip
    draws = lower.with_columns(draw=pl.col("rejected_id").map_elements(lambda r: _draw(spec.seed, r),
                                                                       return_dtype=pl.String))  # fmt: skip
    return draws.sort("prompt_id", "draw").group_by("prompt_id", maintain_order=True).first().drop("draw")


def sampled_pairs(scores: pl.DataFrame, responses: pl.DataFrame, scorer_id: str, spec: CurationSpec, margin: float,
                  agree: dict[str, pl.DataFrame] | None = None) -> Curated:  # fmt: skip
    """The pairs of the config's sampled rule. scores: prompt_id, response_id, value (the curation scorer's);
    responses: response_id, tokens, finish_reason of the run's samples; agree: {scorer_id: response_id, value}
    of scorers that must agree on every pair."""
    agree = agree or {}
    rule_name = spec.sampled_rule or "best_vs_worst"
    rule = rule_of(spec, scorer_id, margin, list(agree))
    counts: dict[str, int] = {}
    valid = scores.filter(VALID).join(responses.select("response_id", "tokens", "finish_reason"), on="response_id",
                                      how="left")  # fmt: skip
    counts["prompts_scored"] = valid["prompt_id"].n_unique()
    cut = pl.col("finish_reason") == "length"
    usable = valid if spec.allow_truncated else valid.filter(cut.not_() | pl.col("finish_reason").is_null())
    counts["truncated_responses"] = len(valid) - len(usable)
    per_prompt = usable.group_by("prompt_id").len()
    counts["prompts_without_two"] = counts["prompts_scored"] - int((per_prompt["len"] >= 2).sum())
    pairs = _candidates(rule_name, usable.select("prompt_id", "response_id", "value"), margin, spec)
    pairs = pairs.with_columns(margin=pl.col("score_chosen") - pl.col("score_rejected"))
    counts["candidates"] = len(pairs)

    def step(name: str, frame: pl.DataFrame) -> pl.DataFrame:
        counts[name] = len(pairs) - len(frame)
        return frame

    pairs = step("below_margin", pairs.filter((pl.col("margin") > 0) & (pl.col("margin") >= margin)))
    tokens = usable.select("response_id", "tokens")
    pairs = pairs.join(tokens.rename({"response_id": "chosen_id", "tokens": "_tc"}), on="chosen_id", how="left")
    pairs = pairs.join(tokens.rename({"response_id": "rejected_id", "tokens": "_tr"}), on="rejected_id", how="left")
    known = pl.col("_tc").is_not_null() & pl.col("_tr").is_not_null()  # one unknown length: an unknown ratio
    pairs = pairs.with_columns(ratio=pl.when(known).then(
        pl.max_horizontal("_tc", "_tr") / pl.min_horizontal("_tc", "_tr").clip(1)))
    # the same steps without length control (no length_ratio, the margin order): what it changed
    length_control = spec.max_length_ratio is not None or spec.length_matched
    before = _capped(_agreeing(pairs, agree), spec.max_pairs_per_prompt, False) if length_control else None
    if spec.max_length_ratio is not None:
        fits = pl.col("ratio").is_null() | (pl.col("ratio") <= spec.max_length_ratio)  # unknown lengths stay
        pairs = step("length_ratio", pairs.filter(fits))
    if agree:
        pairs = step("disagreement", _agreeing(pairs, agree))
    cap = spec.max_pairs_per_prompt or (1 if spec.length_matched else None)
    capped = _capped(pairs, cap, spec.length_matched)
    pairs = step("over_cap", capped) if cap is not None else capped
    pairs = pairs.sort("prompt_id", "chosen_id", "rejected_id")
    counts["kept"] = len(pairs)
    lengths = {name: length_profile(frame.select(chosen_tokens="_tc", rejected_tokens="_tr"))
               for name, frame in (("before", before if before is not None else pairs), ("after", pairs))}
    ids = [pair_id(c, r, rule, (sc, sr)) for c, r, sc, sr in
           pairs.select("chosen_id", "rejected_id", "score_chosen", "score_rejected").iter_rows()]  # fmt: skip
    out = pairs.with_columns(pair_id=pl.Series(ids, dtype=pl.String), scorer_id=pl.lit(scorer_id),
                             rule=pl.lit(canonical_json(rule)), source=pl.lit("sampled"))  # fmt: skip
    return Curated(out.select(list(columns("pairs"))), counts, {"length_control": length_control, **lengths})


def best_vs_worst(scores: pl.DataFrame, scorer_id: str, spec: CurationSpec,
                  agree: dict[str, pl.DataFrame] | None = None,
                  margin: float | None = None) -> pl.DataFrame:  # fmt: skip
    """The best_vs_worst pairs of scored responses whose lengths and finish reasons are unknown."""
    responses = scores.select("response_id", tokens=pl.lit(None, pl.Int32), finish_reason=pl.lit(None, pl.String))
    numeric = margin if margin is not None else threshold(spec, scores, scaled=True)
    return sampled_pairs(scores, responses, scorer_id, spec.model_copy(update={"rule": "best_vs_worst"}), numeric,
                         agree).pairs  # fmt: skip


@task(name="curate", cache_policy=NO_CACHE)
def curate(scores: pl.DataFrame, responses: pl.DataFrame, scorer_id: str, spec: CurationSpec, margin: float,
           agree: dict[str, pl.DataFrame] | None = None) -> Curated:  # fmt: skip
    """Prefect task: the sampled rule's pairs of a run's scored responses."""
    return sampled_pairs(scores, responses, scorer_id, spec, margin, agree)


def refined_vs_original(refinements: list[Refinement], teacher_id: str, min_gap: float) -> pl.DataFrame:
    """Each kept refinement (chosen) against its parent (rejected); margin = the teacher's s_w - s_l."""
    rule = {"rule": "refined_vs_original", "min_gap": min_gap, "scorer_id": teacher_id}
    rows = [{"pair_id": pair_id(r.response_id, r.parent_id, rule, (r.score_refined, r.score_parent)),
             "prompt_id": r.prompt_id, "chosen_id": r.response_id, "rejected_id": r.parent_id,
             "scorer_id": teacher_id, "rule": canonical_json(rule), "score_chosen": r.score_refined,
             "score_rejected": r.score_parent, "margin": r.margin, "source": "teacher_refinement"}
            for r in refinements if r.kept and r.score_refined is not None and r.margin is not None]  # fmt: skip
    return pl.DataFrame(rows, schema=columns("pairs")).unique("pair_id", maintain_order=True).sort("prompt_id")


def anchor_vs_sampled(anchors: pl.DataFrame, scores: pl.DataFrame, scorer_id: str, margin: float) -> pl.DataFrame:
    """The teacher's anchor (chosen) against each sampled response of its prompt that the curation scorer
    scores lower, by at least `margin` (and > 0). anchors and scores: prompt_id, response_id, value."""
    rule = {"rule": "anchor_vs_sampled", "min_margin": margin, "scorer_id": scorer_id}
    valid = VALID
    joined = (
        anchors.filter(valid).rename({"response_id": "chosen_id", "value": "score_chosen"})
        .join(scores.filter(valid).rename({"response_id": "rejected_id", "value": "score_rejected"}), on="prompt_id")
        .with_columns(margin=pl.col("score_chosen") - pl.col("score_rejected"))
        .filter((pl.col("margin") > 0) & (pl.col("margin") >= margin))
        .sort("prompt_id", "rejected_id")
    )
    ids = [pair_id(c, r, rule, (sc, sr)) for c, r, sc, sr in
           joined.select("chosen_id", "rejected_id", "score_chosen", "score_rejected").iter_rows()]  # fmt: skip
    return joined.with_columns(
        pair_id=pl.Series(ids, dtype=pl.String), scorer_id=pl.lit(scorer_id), rule=pl.lit(canonical_json(rule)),
        source=pl.lit("teacher_anchor"),
    ).select(list(columns("pairs")))
