"""Stage 4 of the protocol: the weights a model actually uses, recovered from its choices.

Per scenario, a logistic regression of choice(A) on the range-normalised attribute differences
(A - B), with an intercept (position bias) and k slopes under a N(0, 1) prior; the slopes are
rescaled so the largest |b| is 100 (signs kept), which puts them on the scale of the instilled
weights and the self-reports.

All scenarios are fitted at once: Newton's method on the MAP objective, vectorised over
scenarios with numpy (one k+1 by k+1 solve per scenario per iteration, batched). This is
written here rather than taken from statsmodels or scikit-learn because those fit one
scenario per call (100-1,100 solver calls for a study) and neither takes a Gaussian prior with
a different scale on the intercept; `benchmarks/bench_analysis.py` compares them side by side.

Targets may be hard choices (1 = A, 0 = B) or soft ones (P(A) measured from logits): the
likelihood is the same cross-entropy either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .design import rescale

#: Why a scenario's fit cannot be trusted ("" when it can).
NOT_ENOUGH_TRIALS = "not_enough_trials"
CONSTANT_CHOICES = "constant_choices"
NO_VARIATION = "no_variation"  # an attribute never differs between A and B: its slope is the prior's
NOT_CONVERGED = "not_converged"


@dataclass(frozen=True)
class PreferenceFit:
    """Fitted preferences of S scenarios with k attributes."""

    weights: np.ndarray    # (S, k) slopes rescaled to max |b| = 100; NaN where not identified
    slopes: np.ndarray     # (S, k) raw MAP slopes (log-odds per full range of the attribute)
    intercept: np.ndarray  # (S,) log-odds of answering A when the options are equal
    n_trials: np.ndarray   # (S,) trials used
    flags: np.ndarray      # (S,) "" or the reason the fit is not identified

    @property
    def identified(self) -> np.ndarray:
        """(S,) whether each scenario's fit is identified (has no flag)."""
        return self.flags == ""


def fit_preferences(X: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None, *,
                    prior_sd: float = 1.0, intercept_sd: float | None = 10.0,
                    max_iter: int = 100, tol: float = 1e-10) -> PreferenceFit:
    """Fit every scenario's logistic regression at once.

    X: (S, n, k) range-normalised differences A - B; y: (S, n) targets in [0, 1] (1 = chose A);
    mask: (S, n) which trials exist (scenarios may have different numbers of trials; pad the
    rest). ``prior_sd`` is the slopes' N(0, sd^2) prior; ``intercept_sd`` a weak prior on the
    intercept (None: flat). Weights of scenarios that are not identified are NaN, with a flag.
    """
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    if X.ndim != 3:
        raise ValueError(f"X must have shape (scenarios, trials, attributes), got {X.shape}")
    S, n, k = X.shape
    if y.shape != (S, n):
        raise ValueError(f"y must have shape {(S, n)} to match X, got {y.shape}")
    m = np.ones((S, n)) if mask is None else np.asarray(mask, dtype=float)
    if m.shape != (S, n):
        raise ValueError(f"mask must have shape {(S, n)}, got {m.shape}")
    if np.any(((y < 0) | (y > 1) | np.isnan(y)) & (m > 0)):
        raise ValueError("targets must be probabilities in [0, 1] (1 = chose A)")
    # No value is made up: a NaN or infinite difference in a trial that exists is the caller's
    # error (the readers in layout.py name its file, line and column); padding is zeroed.
    if not np.isfinite(X[m > 0]).all():
        s, t = np.argwhere((m > 0) & ~np.isfinite(X).all(axis=2))[0]
        raise ValueError(f"X must be finite in every trial that exists: scenario {s}, trial {t} is {X[s, t].tolist()}")
    X = np.where(m[..., None] > 0, X, 0.0)
    y = np.where(m > 0, y, 0.0)

    Z = np.concatenate([np.ones((S, n, 1)), X], axis=2) * m[..., None]  # intercept column first
    precision = np.full(k + 1, 1.0 / prior_sd**2)
    precision[0] = 0.0 if intercept_sd is None else 1.0 / intercept_sd**2
    P = np.diag(precision)

    beta = np.zeros((S, k + 1))
    converged = np.zeros(S, dtype=bool)
    for _ in range(max_iter):
        eta = np.einsum("snj,sj->sn", Z, beta)
        p = 1.0 / (1.0 + np.exp(-eta))
        grad = np.einsum("snj,sn->sj", Z, m * (y - p)) - beta * precision
        w = m * p * (1.0 - p)
        H = np.einsum("snj,sn,snl->sjl", Z, w, Z) + P
        step = np.linalg.solve(H, grad[..., None])[..., 0]
        beta = beta + step
        converged = np.max(np.abs(step), axis=1) < tol
        if converged.all():
            break

    n_trials = m.sum(axis=1).astype(int)
    choices_a = (y * m).sum(axis=1)
    varies = (np.abs(X) * m[..., None]).max(axis=1) > 0  # (S, k)
    flags = np.full(S, "", dtype=object)
    flags[~converged] = NOT_CONVERGED
    flags[~varies.all(axis=1)] = NO_VARIATION
    flags[(choices_a <= 0) | (choices_a >= n_trials)] = CONSTANT_CHOICES
    flags[n_trials < 2] = NOT_ENOUGH_TRIALS

    slopes = beta[:, 1:]
    weights = rescale(slopes)
    weights[flags != ""] = np.nan
    return PreferenceFit(weights=weights, slopes=slopes, intercept=beta[:, 0], n_trials=n_trials,
                         flags=flags.astype(str))


def pad(groups: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack per-scenario (X_s (n_s, k), y_s (n_s,)) into padded (X, y, mask) for :func:`fit_preferences`."""
    if not groups:
        raise ValueError("no scenarios to fit")
    k = groups[0][0].shape[1]
    n = max(len(y) for _, y in groups)
    X = np.zeros((len(groups), n, k))
    Y = np.zeros((len(groups), n))
    M = np.zeros((len(groups), n), dtype=bool)
    for i, (x, yy) in enumerate(groups):
        X[i, : len(yy)] = x
        Y[i, : len(yy)] = yy
        M[i, : len(yy)] = True
    return X, Y, M
