"""Stage 6 of the protocol, the statistics: how well self-reports track the weights.

Accuracy is the Pearson r over all scenario x attribute cells between the per-scenario mean
report and the learned (or instilled) weights. Uncertainty comes from a bootstrap over
*scenarios* (cells of one scenario are not independent), stratified by group when halves are
pooled, and paired when two conditions are compared on the same scenarios.

Inputs are (S, k) arrays: one row per scenario, one column per attribute. Pure numpy; every
function runs in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BOOT = 2000


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r over all cells of two equally shaped arrays (NaN if either is constant)."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    return float(_pearson_rows(x[None], y[None])[0])


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row of x with the same row of y ((B, n) each, or y one (1, n) row for all)."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    yc = np.broadcast_to(yc, xc.shape)
    denom = np.sqrt(np.einsum("ij,ij->i", xc, xc) * np.einsum("ij,ij->i", yc, yc))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.einsum("ij,ij->i", xc, yc) / denom, np.nan)


def zscore(x: np.ndarray, axis=None) -> np.ndarray:
    """Standardise to mean 0, sd 1 (population sd) over ``axis`` (all cells by default)."""
    x = np.asarray(x, dtype=float)
    sd = x.std(axis=axis, keepdims=True)
    return (x - x.mean(axis=axis, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def pooled_zscored(xs: list[np.ndarray]) -> np.ndarray:
    """Z-score each part over its own cells, then stack the parts (scenarios pooled)."""
    return np.concatenate([zscore(x) for x in xs], axis=0)


def sign_agreement(x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of cells where the two agree in sign (zero counts as its own sign)."""
    return float(np.mean(np.sign(x) == np.sign(y)))


def _resample(strata: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, S) row indices: scenarios drawn with replacement within each stratum."""
    idx = np.empty((n_boot, len(strata)), dtype=int)
    for g in np.unique(strata):
        members = np.flatnonzero(strata == g)
        idx[:, members] = rng.choice(members, size=(n_boot, len(members)), replace=True)
    return idx


def _r_of_rows(x: np.ndarray, y: np.ndarray, idx: np.ndarray, strata: np.ndarray, z: bool) -> np.ndarray:
    """r of every bootstrap sample; with ``z``, each stratum is z-scored within the sample first."""
    xb, yb = x[idx], y[idx]  # (B, S, k)
    if z:
        for g in np.unique(strata):
            cols = strata == g
            for arr in (xb, yb):
                part = arr[:, cols]
                mu = part.mean(axis=(1, 2), keepdims=True)
                sd = part.std(axis=(1, 2), keepdims=True)
                arr[:, cols] = (part - mu) / np.where(sd > 0, sd, 1.0)
    B = idx.shape[0]
    return _pearson_rows(xb.reshape(B, -1), yb.reshape(B, -1))


@dataclass(frozen=True)
class Correlation:
    """r between mean reports and weights, its bootstrap CI, the number of scenarios, the sign agreement."""

    r: float
    ci: tuple[float, float]
    n_scenarios: int
    sign_agreement: float


def correlate(reports: np.ndarray, weights: np.ndarray, strata: np.ndarray | None = None, *,
              n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> Correlation:
    """r between mean reports and weights, with a percentile bootstrap CI over scenarios.

    With ``strata`` (one label per scenario, e.g. which fold a held-out half came from), each
    stratum is z-scored separately before pooling, and resampled within itself.
    """
    x, y = _check_pair(reports, weights)
    z = strata is not None
    strata = np.zeros(len(x), dtype=int) if strata is None else np.asarray(strata)
    xs = [x[strata == g] for g in np.unique(strata)] if z else [x]
    ys = [y[strata == g] for g in np.unique(strata)] if z else [y]
    point_x, point_y = (pooled_zscored(xs), pooled_zscored(ys)) if z else (x, y)
    r = pearson(point_x, point_y)
    rng = np.random.default_rng(seed)
    boots = _r_of_rows(x, y, _resample(strata, n_boot, rng), strata, z)
    lo, hi = _interval(boots, level)
    return Correlation(r=r, ci=(float(lo), float(hi)), n_scenarios=len(x),
                       sign_agreement=sign_agreement(point_x, point_y))


@dataclass(frozen=True)
class Difference:
    """A difference in r between two conditions, its paired bootstrap CI and the number of scenarios."""

    diff: float
    ci: tuple[float, float]
    n_scenarios: int


def compare(reports_a: np.ndarray, reports_b: np.ndarray, weights: np.ndarray,
            strata_a: np.ndarray | None = None, strata_b: np.ndarray | None = None, *,
            n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> Difference:
    """r(reports_b, weights) - r(reports_a, weights) on the same scenarios, paired bootstrap CI.

    Used for the introspection-training effect: a = the instilled model's reports, b = the
    trained model's reports on the same (held-out) scenarios.
    """
    xa, y = _check_pair(reports_a, weights)
    xb, _ = _check_pair(reports_b, weights)
    sa = np.zeros(len(y), dtype=int) if strata_a is None else np.asarray(strata_a)
    sb = np.zeros(len(y), dtype=int) if strata_b is None else np.asarray(strata_b)
    # Both conditions are resampled with the same scenario indices (paired); strata of b, if any.
    strata = sb if strata_b is not None else sa
    rng = np.random.default_rng(seed)
    idx = _resample(strata, n_boot, rng)
    ra = _r_of_rows(xa, y, idx, sa, strata_a is not None)
    rb = _r_of_rows(xb, y, idx, sb, strata_b is not None)
    point_a = correlate(xa, y, strata_a, n_boot=1).r
    point_b = correlate(xb, y, strata_b, n_boot=1).r
    lo, hi = _interval(rb - ra, level)
    return Difference(diff=point_b - point_a, ci=(float(lo), float(hi)), n_scenarios=len(y))


@dataclass(frozen=True)
class Permutation:
    """A permutation test of r: the observed r, its one-sided p, the null's quantiles, the permutations run."""

    r: float                         # the observed r (as :func:`correlate` gives it)
    p: float                         # one-sided: P(null r >= observed), with the observed counted in
    null_quantiles: tuple[float, float, float]  # 2.5%, 50%, 97.5% of the null distribution
    n_perm: int


def permutation_test(reports: np.ndarray, weights: np.ndarray, strata: np.ndarray | None = None, *,
                     n_perm: int = N_BOOT, seed: int = 0) -> Permutation:
    """Does r exceed what reports that know nothing of their own scenario would reach?

    The null keeps every report row intact (each attribute position keeps its values, so a model's
    habits such as "the first attribute is positive" survive) and pairs the rows with the weights
    of other scenarios, at random, within each stratum. ``p`` is (1 + #null >= r) / (1 + n_perm).
    """
    x, y = _check_pair(reports, weights)
    z = strata is not None
    strata = np.zeros(len(x), dtype=int) if strata is None else np.asarray(strata)
    if z:  # each stratum z-scored once; a permutation within strata leaves that unchanged
        x = np.concatenate([zscore(x[strata == g]) for g in np.unique(strata)])
        y = np.concatenate([zscore(y[strata == g]) for g in np.unique(strata)])
        strata = np.concatenate([strata[strata == g] for g in np.unique(strata)])
    r = pearson(x, y)
    rng = np.random.default_rng(seed)
    idx = np.empty((n_perm, len(x)), dtype=int)
    for g in np.unique(strata):
        members = np.flatnonzero(strata == g)
        idx[:, members] = members[rng.permuted(np.tile(np.arange(len(members)), (n_perm, 1)), axis=1)]
    null = _pearson_rows(x[idx].reshape(n_perm, -1), y.reshape(1, -1))
    null = null[~np.isnan(null)]
    if np.isnan(r) or not len(null):
        return Permutation(r=r, p=float("nan"), null_quantiles=(float("nan"),) * 3, n_perm=n_perm)
    p = (1 + int(np.sum(null >= r - 1e-12))) / (1 + len(null))
    q = np.quantile(null, [0.025, 0.5, 0.975])
    return Permutation(r=r, p=float(p), null_quantiles=(float(q[0]), float(q[1]), float(q[2])), n_perm=n_perm)


def split_half_reliability(reports: list[np.ndarray], n_splits: int = 100, seed: int = 0) -> float:
    """Spearman-Brown corrected split-half reliability of per-scenario mean reports.

    ``reports[s]`` is an (n_s, k) array of scenario s's individual reports. Each split divides
    every scenario's reports at random into two halves; r between the two halves' means over
    all cells is corrected to full length (2r / (1 + r)) and averaged over splits. Its square
    root bounds the r any weights can reach with these reports (a noise ceiling). Scenarios
    with fewer than 2 reports are left out; NaN if none remain.
    """
    usable = [np.asarray(r, dtype=float) for r in reports if len(r) >= 2]
    if not usable:
        return float("nan")
    rng = np.random.default_rng(seed)
    h1, h2 = [], []  # per group of scenarios with the same number of reports: (n_splits, S_n, k)
    for n in sorted({len(r) for r in usable}):
        group = np.stack([r for r in usable if len(r) == n])  # (S_n, n, k)
        half = n // 2
        order = rng.random((n_splits, len(group), n)).argsort(axis=2)  # a random split per scenario
        first = np.zeros(order.shape)
        np.put_along_axis(first, order[:, :, :half], 1.0, axis=2)  # 1 where a report is in the first half
        sum1 = np.einsum("psn,snk->psk", first, group)
        h1.append(sum1 / half)
        h2.append((group.sum(axis=1) - sum1) / (n - half))
    a, b = np.concatenate(h1, axis=1), np.concatenate(h2, axis=1)
    rs = _pearson_rows(a.reshape(n_splits, -1), b.reshape(n_splits, -1))
    if np.isnan(rs).all():  # e.g. every report identical: no reliability to speak of
        return float("nan")
    r = float(np.nanmean(rs))
    return 2 * r / (1 + r) if r > -1 else float("nan")


def _interval(boots: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates, ignoring undefined ones (NaN when all are)."""
    if np.isnan(boots).all():  # e.g. constant reports: r is undefined in every resample
        return float("nan"), float("nan")
    lo, hi = np.nanquantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _check_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"expected two (scenarios, attributes) arrays of one shape, got {x.shape} and {y.shape}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("NaN in inputs: drop scenarios without reports or without identified weights first")
    return x, y
