"""Paired statistics (services/stats/paired.py): exact one-sided tests, the e-process, the interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from services.stats.paired import (
    paired_test,
    sign_log_e,
    sign_log_e_many,
    sign_test_p,
    tango_interval,
    wilcoxon_p,
)


def test_sign_test_is_exact_and_one_sided() -> None:
    assert sign_test_p(9, 1) == pytest.approx(binomtest(9, 10, 0.5, alternative="greater").pvalue)
    assert sign_test_p(9, 1) < 0.05 < sign_test_p(1, 9)
    assert sign_test_p(0, 0) == 1.0


def test_sign_test_is_uniform_enough_under_the_null() -> None:
    """P(p <= level) <= level for a fair coin at every level (exact, discrete: conservative)."""
    rng = np.random.default_rng(0)
    n = rng.integers(5, 200, size=20000)
    k = rng.binomial(n, 0.5)
    p = np.array([sign_test_p(int(a), int(b - a)) for a, b in zip(k, n, strict=True)])
    for level in (0.01, 0.05, 0.2):
        assert (p <= level).mean() <= level + 0.005


def test_wilcoxon_is_one_sided() -> None:
    rng = np.random.default_rng(1)
    shifted = rng.normal(0.5, 1.0, size=60)
    assert wilcoxon_p(shifted) < 0.01
    assert wilcoxon_p(-shifted) > 0.9
    assert wilcoxon_p(np.zeros(10)) == 1.0


def _crossing_share(p_win: float, threshold: float, n_seq: int = 2000, length: int = 300) -> float:
    """Share of win/loss sequences whose e-process ever reaches ``threshold``."""
    rng = np.random.default_rng(2)
    wins = rng.random((n_seq, length)) < p_win
    k = np.cumsum(wins, axis=1)
    m = np.cumsum(~wins, axis=1)
    return float((sign_log_e_many(k, m) >= math.log(threshold)).any(axis=1).mean())


@pytest.mark.parametrize("p_win", [0.5, 0.4])
def test_e_process_is_anytime_valid_for_the_one_sided_null(p_win: float) -> None:
    # Ville: P(sup_n E_n >= 1/alpha) <= alpha, for a fair coin and for one favouring the other side
    # (a two-sided mixture would grow under p_win = 0.4 and fail here)
    assert _crossing_share(p_win, 1 / 0.05) <= 0.05


def test_e_process_grows_when_the_claimed_side_wins() -> None:
    assert _crossing_share(0.7, 1 / 0.05) > 0.95
    assert sign_log_e(60, 10) > math.log(1e6) > sign_log_e(10, 60)
    assert sign_log_e(0, 0) == pytest.approx(0.0)


@pytest.mark.parametrize(("n", "p_hi", "p_lo"), [(40, 0.3, 0.1), (150, 0.05, 0.01), (60, 0.6, 0.2), (200, 0.2, 0.2)])
def test_tango_interval_covers(n: int, p_hi: float, p_lo: float) -> None:
    rng = np.random.default_rng(3)
    counts = rng.multinomial(n, [p_hi, p_lo, 1 - p_hi - p_lo], size=1500)
    hits = [lo <= p_hi - p_lo <= hi for lo, hi in (tango_interval(int(b), int(c), n) for b, c, _ in counts)]
    assert 0.925 <= np.mean(hits) <= 0.975


def test_tango_interval_edges_and_width() -> None:
    lo, hi = tango_interval(50, 0, 50)
    assert hi == 1.0 and 0.8 < lo < 1.0
    lo, hi = tango_interval(0, 0, 50)
    assert lo < 0 < hi and lo == pytest.approx(-hi)
    narrow, wide = tango_interval(300, 100, 1000), tango_interval(30, 10, 100)
    assert narrow[0] <= 0.2 <= narrow[1] and wide[1] - wide[0] > narrow[1] - narrow[0]


def test_paired_effect_rates_and_symmetry() -> None:
    claimed = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 0], dtype=float)
    other = np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 0], dtype=float)
    r = paired_test(claimed, other)
    assert (r.n_higher, r.n_lower, r.n_tied) == (3, 1, 6)
    assert r.effect == pytest.approx(0.5 + (3 - 1) / 20)
    assert (r.rate_claimed, r.rate_other) == (0.4, 0.2)
    assert r.ci_low <= r.effect <= r.ci_high
    flipped = paired_test(other, claimed)
    assert flipped.effect == pytest.approx(1 - r.effect)
    assert flipped.p_value > r.p_value


def test_paired_test_picks_the_deciding_p_value() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.4, 1, 80), rng.normal(0, 1, 80)
    sign, wil, ep = (paired_test(a, b, test=t) for t in ("sign", "wilcoxon", "e-process"))
    assert sign.p_value == sign.sign_p and wil.p_value == wil.wilcoxon_p
    assert ep.p_value == pytest.approx(min(1.0, math.exp(-ep.log_e)))
    with pytest.raises(ValueError):
        paired_test(a, b, test="t-test")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        paired_test(a, b[:-1])
