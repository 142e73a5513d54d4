import numpy as np
import pytest

from selfinterp import stats


def noisy_reports(S=100, k=5, r_target=0.5, seed=0):
    """Weights and reports whose population correlation is r_target."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(S, k))
    noise = rng.normal(size=(S, k))
    return w, r_target * w + np.sqrt(1 - r_target**2) * noise


def test_pearson_matches_numpy():
    x, y = noisy_reports()
    assert stats.pearson(x, y) == pytest.approx(np.corrcoef(x.ravel(), y.ravel())[0, 1])
    assert np.isnan(stats.pearson(np.ones(5), np.arange(5)))


def test_bootstrap_ci_covers_the_truth_most_of_the_time():
    hits = 0
    for seed in range(40):
        w, rep = noisy_reports(S=60, seed=seed)
        c = stats.correlate(rep, w, n_boot=500, seed=seed)
        assert c.ci[0] < c.r < c.ci[1]
        hits += c.ci[0] <= 0.5 <= c.ci[1]
    assert hits >= 32  # nominal 95%: 38 of 40 expected


def test_pooled_halves_are_zscored_separately():
    w, rep = noisy_reports(S=100, r_target=0.8)
    rep[50:] = rep[50:] * 10 + 40  # the second fold reports on another scale
    strata = np.repeat([0, 1], 50)
    pooled = stats.correlate(rep, w, strata, n_boot=200)
    raw = stats.correlate(rep, w, n_boot=200)
    assert pooled.r > 0.75 and pooled.r > raw.r + 0.05
    expected = stats.pearson(stats.pooled_zscored([rep[:50], rep[50:]]), stats.pooled_zscored([w[:50], w[50:]]))
    assert pooled.r == pytest.approx(expected)


def test_compare_is_paired():
    w, rep_a = noisy_reports(r_target=0.3, seed=1)
    rep_b = 0.8 * w + 0.6 * np.random.default_rng(2).normal(size=w.shape)
    d = stats.compare(rep_a, rep_b, w, n_boot=500)
    assert d.diff == pytest.approx(stats.pearson(rep_b, w) - stats.pearson(rep_a, w))
    assert d.ci[0] > 0.2


def test_split_half_reliability():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(80, 5))
    exact = [np.repeat(t[None], 10, axis=0) for t in truth]
    assert stats.split_half_reliability(exact) == pytest.approx(1.0)
    noisy = [t + rng.normal(scale=3.0, size=(10, 5)) for t in truth]
    rel = stats.split_half_reliability(noisy)
    # Mean of 10 reports with noise sd 3: reliability = 1 / (1 + 9/10) ~= 0.53
    assert 0.4 < rel < 0.65
    assert np.isnan(stats.split_half_reliability([t[None] for t in truth]))


def test_sign_agreement():
    assert stats.sign_agreement(np.array([[1, -1, 2]]), np.array([[3, -2, -1]])) == pytest.approx(2 / 3)


def test_rejects_nan_and_shape_mismatch():
    with pytest.raises(ValueError, match="NaN"):
        stats.correlate(np.array([[np.nan, 1.0]]), np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="one shape"):
        stats.correlate(np.zeros((3, 5)), np.zeros((3, 4)))


def test_permutation_test_finds_access_and_keeps_its_size():
    rng = np.random.default_rng(3)
    w = rng.uniform(-100, 100, (30, 5))
    informed = stats.permutation_test(w + rng.normal(scale=80, size=w.shape), w, n_perm=999, seed=1)
    assert informed.p < 0.01 and informed.null_quantiles[0] < 0 < informed.null_quantiles[2]
    # Reports that know nothing of their scenario: p below 0.05 about 5% of the time.
    ps = [stats.permutation_test(rng.uniform(-100, 100, (20, 5)), rng.uniform(-100, 100, (20, 5)),
                                 n_perm=199, seed=i).p for i in range(300)]
    assert 0.02 < np.mean(np.array(ps) < 0.05) < 0.09


def test_permutation_null_keeps_attribute_habits():
    """Reports that only know that the first attribute is always liked correlate with the weights,
    but no better than with another scenario's weights: the null keeps each column's values."""
    rng = np.random.default_rng(0)
    w = rng.uniform(-100, 100, (25, 5))
    w[:, 0] = 90 + rng.normal(scale=5, size=25)
    habit = rng.uniform(-100, 100, (25, 5))
    habit[:, 0] = 90
    res = stats.permutation_test(habit, w, n_perm=999)
    assert res.r > 0.15 and res.p > 0.05
    assert res.null_quantiles[0] > 0.1  # the null is centred on the habit's r, not on 0


def test_permutation_test_matches_correlate_and_stays_within_strata():
    rng = np.random.default_rng(5)
    w = rng.uniform(-100, 100, (20, 5))
    x = w + rng.normal(scale=60, size=w.shape)
    x[10:] = x[10:] * 5 + 300  # a second stratum on another scale: only z-scoring per stratum fixes it
    strata = np.repeat([0, 1], 10)
    res = stats.permutation_test(x, w, strata, n_perm=500)
    assert res.r == pytest.approx(stats.correlate(x, w, strata, n_boot=10).r)
    assert res.p < 0.01
    with pytest.raises(ValueError, match="shape"):
        stats.permutation_test(x[:5], w)
