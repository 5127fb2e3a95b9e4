"""Agreement statistics checked against hand-computed values (the computation is in each test's comment)."""

from __future__ import annotations

import pytest

from prefsynth.tasks.agreement import copeland, kendall_tau, krippendorff_alpha, normalize

# ---------------------------------------------------------------------------------------------------------------
# Kendall's tau-b: (C - D) / sqrt((n0 - n1) * (n0 - n2)), n0 = n(n-1)/2, n1/n2 = pairs tied in x/in y.
# ---------------------------------------------------------------------------------------------------------------


def test_kendall_perfect_agreement() -> None:
    # n=4, n0=6, all 6 pairs concordant, no ties: (6 - 0) / sqrt(6 * 6) = 1
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)


def test_kendall_perfect_reversal() -> None:
    # n=4, n0=6, all 6 pairs discordant, no ties: (0 - 6) / sqrt(6 * 6) = -1
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_kendall_with_ties_hand_computed() -> None:
    # x = 1 2 2 3 4, y = 2 1 3 3 4 (items 0..4), n0 = 10 pairs:
    #   (0,1) x<  y>  D        (1,2) x=  y<  tie in x    (2,3) x<  y=  tie in y
    #   (0,2) x<  y<  C        (1,3) x<  y<  C           (2,4) C
    #   (0,3) x<  y<  C        (1,4) C                   (3,4) C
    #   (0,4) C
    # C = 7, D = 1, n1 = 1, n2 = 1: tau_b = (7 - 1) / sqrt((10 - 1) * (10 - 1)) = 6 / 9 = 2/3
    assert kendall_tau([1, 2, 2, 3, 4], [2, 1, 3, 3, 4]) == pytest.approx(2 / 3)


def test_kendall_pair_tied_in_both() -> None:
    # x = y = 1 1 2, n0 = 3: (0,1) tied in x AND in y (n1 = n2 = 1), (0,2) C, (1,2) C
    # tau_b = (2 - 0) / sqrt((3 - 1) * (3 - 1)) = 2 / 2 = 1   (tau-a would give 2/3)
    assert kendall_tau([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)


def test_kendall_ties_in_x_only() -> None:
    # x = 1 1 2, y = 1 2 3, n0 = 3: (0,1) tied in x, (0,2) C, (1,2) C -> n1 = 1, n2 = 0
    # tau_b = 2 / sqrt((3 - 1) * (3 - 0)) = 2 / sqrt(6) = 0.8164965...
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 6**0.5)


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([], []),  # no items
        ([3.0], [1.0]),  # one item: no pairs
        ([2, 2, 2], [1, 2, 3]),  # all tied in x: n0 - n1 = 0
        ([1, 2, 3], [5, 5, 5]),  # all tied in y: n0 - n2 = 0
    ],
)
def test_kendall_undefined(x: list[float], y: list[float]) -> None:
    assert kendall_tau(x, y) is None


def test_kendall_length_mismatch() -> None:
    with pytest.raises(ValueError):
        kendall_tau([1, 2, 3], [1, 2])


def test_kendall_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    x = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    y = [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]
    assert kendall_tau(x, y) == pytest.approx(float(stats.kendalltau(x, y).statistic))


# ---------------------------------------------------------------------------------------------------------------
# Krippendorff's alpha = 1 - (n - 1) * sum_u [sum_{i!=j in u} delta / (m_u - 1)] / sum_{i!=j, all pairable} delta
# ---------------------------------------------------------------------------------------------------------------

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", worked example with missing values:
# 4 coders (A, B, C, D) x 12 units, None = missing. Published: alpha_nominal = 0.743, alpha_interval = 0.849.
_N = None
_CODERS = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, _N, _N, _N],  # A
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, _N, 3],  # B
    [_N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, _N],  # C
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, _N],  # D
]
_UNITS = [list(unit) for unit in zip(*_CODERS, strict=True)]


def test_krippendorff_2011_example_nominal() -> None:
    # Unit 12 has one value (B=3) and is not pairable; n = 40 pairable values.
    assert krippendorff_alpha(_UNITS, level="nominal") == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_2011_example_interval() -> None:
    assert krippendorff_alpha(_UNITS, level="interval") == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_default_level_is_interval() -> None:
    assert krippendorff_alpha(_UNITS) == krippendorff_alpha(_UNITS, level="interval")


def test_krippendorff_two_coders_interval_hand_computed() -> None:
    # Units (coder 1, coder 2): (1,1), (2,3), (3,3); each m_u = 2 so weight 1/(m_u-1) = 1.
    # Observed: only unit 2 disagrees, ordered pairs (2,3),(3,2): 1 + 1 = 2.
    # Pooled pairable values 1,1,2,3,3,3 (n = 6); unordered pairs' squared differences:
    #   1-1: 1 pair x 0 = 0; 1-2: 2 x 1 = 2; 1-3: 6 x 4 = 24; 2-3: 3 x 1 = 3; 3-3: 0 -> 29, ordered: 58.
    # alpha = 1 - (6 - 1) * 2 / 58 = 1 - 10/58 = 24/29 = 0.827586...
    units = [[1, 1], [2, 3], [3, 3]]
    assert krippendorff_alpha(units, level="interval") == pytest.approx(24 / 29)
    # A unit with a single non-missing value is not pairable and changes nothing.
    assert krippendorff_alpha([*units, [4, None], [None, None]], level="interval") == pytest.approx(24 / 29)


def test_krippendorff_two_coders_nominal_hand_computed() -> None:
    # Units (1,1), (1,2), (2,2): observed = unit 2's ordered mismatches = 2.
    # Pooled 1,1,1,2,2,2 (n = 6): ordered mismatching pairs = 6^2 - (3^2 + 3^2) = 18.
    # alpha = 1 - 5 * 2 / 18 = 4/9
    assert krippendorff_alpha([[1, 1], [1, 2], [2, 2]], level="nominal") == pytest.approx(4 / 9)


def test_krippendorff_perfect_agreement() -> None:
    # D_o = 0, D_e > 0 -> alpha = 1 (missing value in a unit with two other values is fine)
    units = [[1, 1, None], [2, 2, 2], [5, None, 5]]
    assert krippendorff_alpha(units, level="interval") == pytest.approx(1.0)
    assert krippendorff_alpha(units, level="nominal") == pytest.approx(1.0)


@pytest.mark.parametrize(
    "units",
    [
        [],  # nothing at all
        [[1, None], [None, 2]],  # no unit with >= 2 values: 0 pairable values
        [[3, 3], [3, 3, None]],  # all pairable values identical: D_e = 0
    ],
)
@pytest.mark.parametrize("level", ["interval", "nominal"])
def test_krippendorff_undefined(units: list[list[float | None]], level: str) -> None:
    assert krippendorff_alpha(units, level=level) is None  # type: ignore[arg-type]


def test_krippendorff_unknown_level() -> None:
    with pytest.raises(ValueError):
        krippendorff_alpha([[1, 2]], level="ordinal")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# normalize: population z-score over the non-missing values
# ---------------------------------------------------------------------------------------------------------------


def test_normalize_hand_computed_with_missing() -> None:
    # Present: 2 4 4 4 5 5 7 9 -> mean 40/8 = 5; squared deviations 9+1+1+1+0+0+4+16 = 32, var 32/8 = 4, std 2
    # z = (v - 5) / 2 -> -1.5 -0.5 -0.5 -0.5 0 0 1 2
    got = normalize([2, 4, None, 4, 4, 5, 5, 7, None, 9])
    assert got == pytest.approx([-1.5, -0.5, None, -0.5, -0.5, 0.0, 0.0, 1.0, None, 2.0])
    assert got[2] is None and got[8] is None


def test_normalize_two_values() -> None:
    # 1, 3: mean 2, std sqrt((1 + 1)/2) = 1 -> -1, 1
    assert normalize([1, None, 3]) == pytest.approx([-1.0, None, 1.0])


def test_normalize_degenerate() -> None:
    assert normalize([]) == []
    assert normalize([None, None]) == [None, None]
    assert normalize([None, 7.0]) == [None, 0.0]  # fewer than 2 values
    assert normalize([3, None, 3, 3]) == [0.0, None, 0.0, 0.0]  # std == 0


# ---------------------------------------------------------------------------------------------------------------
# copeland: wins + 0.5 * draws over pairwise majority verdicts
# ---------------------------------------------------------------------------------------------------------------


def test_copeland_majority_beats_dissenter() -> None:
    # Scorers: 1 2 3 / 1 2 3 / 3 2 1. Each pair is won 2-1 by the higher-indexed item:
    # (0,1) -> 1, (0,2) -> 2, (1,2) -> 2. Scores: item0 0, item1 1, item2 2.
    assert copeland([[1, 2, 3], [1, 2, 3], [3, 2, 1]]) == pytest.approx([0.0, 1.0, 2.0])


def test_copeland_missing_and_ties_hand_computed() -> None:
    # votes = s0: 3 1 2 / s1: 2 2 None / s2: 1 3 3
    # (0,1): s0 -> 0, s1 equal (no vote), s2 -> 1: 1-1 draw
    # (0,2): s0 -> 0, s1 missing item 2, s2 -> 2: 1-1 draw
    # (1,2): s0 -> 2, s1 missing, s2 equal: 0-1, item 2 wins
    # item0: 0 + 0.5*2 = 1.0; item1: 0 + 0.5*1 = 0.5; item2: 1 + 0.5*1 = 1.5 (sum 3 = C(3,2) pairs)
    assert copeland([[3, 1, 2], [2, 2, None], [1, 3, 3]]) == pytest.approx([1.0, 0.5, 1.5])


def test_copeland_zero_votes_is_a_draw() -> None:
    # No scorer scored both items (and one scorer gave equal scores): 0-0 votes on every pair -> all draws.
    assert copeland([[1, None, None], [None, 2, None], [4, None, 4]]) == pytest.approx([1.0, 1.0, 1.0])


def test_copeland_degenerate() -> None:
    assert copeland([]) == []
    assert copeland([[5.0]]) == [0.0]  # one item: no pairs
    with pytest.raises(ValueError):
        copeland([[1, 2], [1, 2, 3]])
