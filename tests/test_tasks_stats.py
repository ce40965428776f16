"""The task statistics against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest

from qexplorer.core.tasks import stats

# z = Φ⁻¹(0.975) = 1.959964, z² = 3.841459


def test_wilson_81_of_164():
    # p = 81/164 = 0.493902; z²/n = 0.023424, so the denominator is 1.023424
    # centre = (0.493902 + 3.841459/328) / 1.023424 = 0.505614 / 1.023424 = 0.494042
    # half = 1.959964/1.023424 · √(0.493902·0.506098/164 + 3.841459/(4·164²))
    #      = 1.915104 · √(0.00152416 + 0.00003571) = 1.915104 · 0.0394951 = 0.075637
    proportion = stats.wilson(81, 164)
    assert (proportion.k, proportion.n) == (81, 164)
    assert proportion.fraction == pytest.approx(0.493902, abs=1e-6)
    assert proportion.low == pytest.approx(0.494042 - 0.075637, abs=2e-6)
    assert proportion.high == pytest.approx(0.494042 + 0.075637, abs=2e-6)


def test_wilson_at_the_edges():
    # 0/10: centre = (z²/20)/(1 + z²/10) = 0.192073/1.384146 = 0.138766, half-width the same:
    # z/(1.384146) · √(z²/400) = z²/20/1.384146; the upper bound 0.277533 is the textbook value
    none_right = stats.wilson(0, 10)
    assert none_right.low == 0.0
    assert none_right.high == pytest.approx(0.277533, abs=1e-6)
    all_right = stats.wilson(10, 10)  # the mirror image
    assert all_right.high == 1.0
    assert all_right.low == pytest.approx(1 - 0.277533, abs=1e-6)
    nothing = stats.wilson(0, 0)
    assert (nothing.low, nothing.high, nothing.fraction) == (0.0, 1.0, None)
    with pytest.raises(ValueError):
        stats.wilson(5, 4)


def test_exact_mcnemar():
    # b = 10, c = 2: 2 · (C(12,0) + C(12,1) + C(12,2)) / 2¹² = 2 · (1 + 12 + 66) / 4096 = 158/4096 = 0.038574
    assert stats.mcnemar_exact(10, 2) == pytest.approx(158 / 4096, rel=1e-12)
    assert stats.mcnemar_exact(2, 10) == stats.mcnemar_exact(10, 2)
    assert stats.mcnemar_exact(0, 0) == 1.0  # no discordant item: no evidence at all
    assert stats.mcnemar_exact(5, 5) == 1.0  # 2 · P(X ≤ 5 | n = 10) > 1 is capped
    # b = 6, c = 0: 2 · 1/64 = 0.03125
    assert stats.mcnemar_exact(6, 0) == pytest.approx(0.03125, rel=1e-12)


def test_paired_test_counts_the_discordant_items():
    reference = [True, True, True, False, False, True]
    candidate = [True, False, False, True, False, True]
    test = stats.paired_test(reference, candidate)
    assert (test.b, test.c, test.n) == (2, 1, 6)
    assert test.difference == pytest.approx(-1 / 6)
    assert test.discordance_rate == pytest.approx(3 / 6)
    assert test.p_value == stats.mcnemar_exact(2, 1) == 1.0  # 2 · (1 + 3)/8 = 1
    with pytest.raises(ValueError):
        stats.paired_test([True], [True, False])


def test_recovery():
    assert stats.recovery(stats.wilson(40, 164), stats.wilson(80, 164)) == pytest.approx(0.5)
    assert stats.recovery(stats.wilson(3, 10), stats.wilson(0, 10)) is None


def test_detectable_difference_solves_connors_formula():
    # n = 164, ψ = 0.5: √164 · δ = 1.959964·√0.5 + 0.841621·√(0.5 − δ²); iterating from δ = 0.1547:
    # δ = (1.385904 + 0.841621 · 0.690230) / 12.806248 = 0.153584
    delta = stats.detectable_difference(164)
    assert delta == pytest.approx(0.153584, abs=1e-5)
    z_alpha, z_beta = 1.959964, 0.841621
    psi = 0.2
    smaller = stats.detectable_difference(164, psi)
    needed = (z_alpha * math.sqrt(psi) + z_beta * math.sqrt(psi - smaller**2)) ** 2 / smaller**2
    assert needed == pytest.approx(164, rel=1e-4)
    assert smaller < delta  # models that agree more let smaller differences show
    assert stats.detectable_difference(5, 0.1) is None  # even δ = ψ needs more than 5 items
    assert stats.detectable_difference(0) is None
    assert stats.detectable_difference(100, 0.0) is None


def test_paired_mean_difference():
    # d = [1, 0, 2, 3]: mean 1.5; sd = √((0.25 + 2.25 + 0.25 + 2.25)/3) = √(5/3) = 1.290994; SE = sd/√4 = 0.645497
    result = stats.paired_mean_difference([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 1.0, 1.0])
    assert result.mean == pytest.approx(1.5)
    assert result.standard_error == pytest.approx(0.645497, abs=1e-6)
    assert result.n == 4
    assert stats.paired_mean_difference([1.0], [0.5]).standard_error is None
    with pytest.raises(ValueError):
        stats.paired_mean_difference([1.0], [1.0, 2.0])
