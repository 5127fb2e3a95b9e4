"""Agreement statistics for panels of scorers (pure Python, standard library only).

- `kendall_tau`: Kendall's tau-b between two scorers' scores of the same items.
- `krippendorff_alpha`: Krippendorff's alpha (interval or nominal) over units x coders with missing values.
- `normalize`: z-score of one scorer's values, keeping missing values missing.
- `copeland`: a "majority of pairwise verdicts" aggregate over several scorers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

__all__ = ["copeland", "kendall_tau", "krippendorff_alpha", "normalize"]


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two scorers' scores of the same items.

    tau_b = (C - D) / sqrt((n0 - n1) * (n0 - n2)), with n0 = n(n-1)/2 item pairs, C/D the concordant/discordant
    pairs, n1/n2 the pairs tied in x/in y. None when undefined (fewer than 2 items, or every pair tied in x or in y).
    Raises ValueError when the lengths differ.
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau: x and y differ in length ({len(x)} != {len(y)})")
    n = len(x)
    if n < 2:
        return None
    concordant = discordant = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            sx = _sign(x[i] - x[j])
            sy = _sign(y[i] - y[j])
            if sx == 0:
                tied_x += 1
            if sy == 0:
                tied_y += 1
            s = sx * sy
            if s > 0:
                concordant += 1
            elif s < 0:
                discordant += 1
    n0 = n * (n - 1) // 2
    denom = (n0 - tied_x) * (n0 - tied_y)
    if denom == 0:
        return None
    return (concordant - discordant) / math.sqrt(denom)


def _pair_disagreement(values: Sequence[float], level: str) -> float:
    """Sum of delta(a, b) over all ordered pairs (i != j) of `values`."""
    k = len(values)
    if k < 2:
        return 0.0
    if level == "interval":
        # sum_{i != j} (a_i - a_j)^2 = 2 * k * sum_i (a_i - mean)^2
        mean = math.fsum(values) / k
        return 2.0 * k * math.fsum((v - mean) ** 2 for v in values)
    # nominal: ordered pairs with different values = k^2 - sum_c n_c^2
    counts = Counter(values)
    return float(k * k - sum(c * c for c in counts.values()))


def krippendorff_alpha(
    units: Sequence[Sequence[float | None]], level: Literal["interval", "nominal"] = "interval"
) -> float | None:
    """Krippendorff's alpha for `units[u]` = the values the coders gave unit u (None = missing).

    Coincidence-matrix form: alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_u [sum_{i!=j in u} delta / (m_u - 1)]
    / sum_{i!=j over all pairable values} delta, where n is the number of pairable values and units with fewer
    than 2 values are ignored. delta = (a - b)^2 (interval) or a != b (nominal). None when undefined (fewer
    than 2 pairable values, or D_e == 0, i.e. all pairable values identical).
    """
    if level not in ("interval", "nominal"):
        raise ValueError(f"krippendorff_alpha: unknown level {level!r} (expected 'interval' or 'nominal')")
    pooled: list[float] = []
    observed = 0.0
    for unit in units:
        values = [v for v in unit if v is not None]
        m = len(values)
        if m < 2:
            continue
        pooled.extend(values)
        observed += _pair_disagreement(values, level) / (m - 1)
    n = len(pooled)
    if n < 2:
        return None
    expected = _pair_disagreement(pooled, level)
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def normalize(values: Sequence[float | None]) -> list[float | None]:
    """Z-score the non-missing values (population std), keeping None as None.

    With fewer than 2 non-missing values, or std == 0, every non-missing value becomes 0.0.
    """
    present = [v for v in values if v is not None]
    k = len(present)
    if k < 2:
        return [None if v is None else 0.0 for v in values]
    mean = math.fsum(present) / k
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / k)
    if std == 0:
        return [None if v is None else 0.0 for v in values]
    return [None if v is None else (v - mean) / std for v in values]


def copeland(votes: Sequence[Sequence[float | None]]) -> list[float]:
    """Copeland score of each item from `votes[s][i]` = scorer s's score of item i (None = missing).

    For each item pair (i, j) every scorer that scored both votes for the higher one (no vote when equal); i beats
    j with more votes than j. Returns wins + 0.5 * draws per item (a draw is equal votes, zero-zero included).
    Raises ValueError when scorers' rows differ in length.
    """
    if not votes:
        return []
    n_items = len(votes[0])
    for s, row in enumerate(votes):
        if len(row) != n_items:
            raise ValueError(f"copeland: scorer {s} scored {len(row)} items, scorer 0 scored {n_items}")
    scores = [0.0] * n_items
    for i in range(n_items):
        for j in range(i + 1, n_items):
            for_i = for_j = 0
            for row in votes:
                a, b = row[i], row[j]
                if a is None or b is None:
                    continue
                if a > b:
                    for_i += 1
                elif b > a:
                    for_j += 1
            if for_i > for_j:
                scores[i] += 1.0
            elif for_j > for_i:
                scores[j] += 1.0
            else:
                scores[i] += 0.5
                scores[j] += 0.5
    return scores
