import numpy as np
import pytest
from scipy.optimize import minimize

from selfinterp import regression as rg
from selfinterp.stats import pearson


def simulate(S=40, n=100, k=5, noise=10.0, seed=0):
    """Choices of decision-makers with known weights: P(A) = sigmoid(dU / noise)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(-100, 100, (S, k))
    w = w / np.abs(w).max(axis=1, keepdims=True) * 100
    X = rng.uniform(0, 1, (S, n, k)) - rng.uniform(0, 1, (S, n, k))
    p = 1 / (1 + np.exp(-np.einsum("snk,sk->sn", X, w) / noise))
    return w, X, (rng.uniform(size=(S, n)) < p).astype(float), p


def test_recovers_known_weights_from_100_trials():
    w, X, y, _ = simulate()
    fit = rg.fit_preferences(X, y)
    assert fit.identified.all()
    assert pearson(fit.weights, w) > 0.95
    assert np.allclose(np.abs(fit.weights).max(axis=1), 100)


def test_soft_targets():
    w, X, _, p = simulate(seed=1)
    fit = rg.fit_preferences(X, p)
    assert pearson(fit.weights, w) > 0.97


def test_matches_a_per_scenario_optimiser():
    """The batched Newton fit equals a scipy optimisation of the same posterior, scenario by scenario."""
    _, X, y, _ = simulate(S=5, n=50, seed=2)
    fit = rg.fit_preferences(X, y, intercept_sd=10.0)
    for s in range(5):
        Z = np.column_stack([np.ones(50), X[s]])
        prec = np.array([1 / 100] + [1.0] * 5)

        def neg_log_post(b):
            eta = Z @ b
            return np.sum(np.logaddexp(0, eta) - y[s] * eta) + 0.5 * np.sum(prec * b**2)

        b = minimize(neg_log_post, np.zeros(6), method="BFGS", options={"gtol": 1e-9}).x
        np.testing.assert_allclose(fit.slopes[s], b[1:], atol=1e-4)
        assert fit.intercept[s] == pytest.approx(b[0], abs=1e-4)


def test_position_bias_goes_to_the_intercept():
    w, X, _, _ = simulate(S=20, n=400, seed=3)
    eta = np.einsum("snk,sk->sn", X, w) / 10 + 1.5  # strong bias towards "A"
    y = (np.random.default_rng(0).uniform(size=eta.shape) < 1 / (1 + np.exp(-eta))).astype(float)
    fit = rg.fit_preferences(X, y)
    # The N(0, 1) prior shrinks the (large) slopes, so the intercept recovers only part of
    # the bias; but it is clearly positive in every scenario, and the weights are unharmed.
    assert (fit.intercept > 0.4).all()
    unbiased = rg.fit_preferences(X, (np.random.default_rng(0).uniform(size=eta.shape)
                                      < 1 / (1 + np.exp(-(eta - 1.5)))).astype(float))
    assert abs(np.mean(unbiased.intercept)) < 0.2
    assert pearson(fit.weights, w) > 0.95


def test_unidentified_scenarios_are_flagged_not_silent():
    w, X, y, _ = simulate(S=4, n=30)
    y[0] = 1.0                     # always "A"
    mask = np.ones_like(y, dtype=bool)
    mask[1, 1:] = False            # a single trial
    X[2, :, 3] = 0.0               # attribute 4 never differs
    fit = rg.fit_preferences(X, y, mask)
    assert list(fit.flags) == [rg.CONSTANT_CHOICES, rg.NOT_ENOUGH_TRIALS, rg.NO_VARIATION, ""]
    assert np.isnan(fit.weights[:3]).all() and not np.isnan(fit.weights[3]).any()


def test_padding_gives_the_same_fit_as_separate_fits():
    _, X, y, _ = simulate(S=3, n=60, seed=4)
    groups = [(X[0, :60], y[0, :60]), (X[1, :25], y[1, :25]), (X[2, :40], y[2, :40])]
    together = rg.fit_preferences(*rg.pad(groups))
    for i, (x, yy) in enumerate(groups):
        alone = rg.fit_preferences(x[None], yy[None])
        np.testing.assert_allclose(together.slopes[i], alone.slopes[0], atol=1e-8)
    assert list(together.n_trials) == [60, 25, 40]


@pytest.mark.parametrize("bad, match", [
    (dict(X=np.zeros((2, 3))), "shape \\(scenarios, trials, attributes\\)"),
    (dict(y=np.zeros((2, 4))), "y must have shape"),
    (dict(y=np.full((2, 3), 1.5)), "probabilities in \\[0, 1\\]"),
    (dict(mask=np.ones((1, 3))), "mask must have shape"),
])
def test_input_validation(bad, match):
    args = dict(X=np.zeros((2, 3, 5)), y=np.zeros((2, 3)), mask=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        rg.fit_preferences(args["X"], args["y"], args["mask"])
