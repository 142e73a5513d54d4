"""Power analysis: how many scenarios, reports and choice trials a study needs.

Each simulated study draws weights as the protocol does, simulates a decision-maker's choices
(logistic in the utility difference) and fits learned weights from them, then simulates self-
reports whose *systematic* accuracy is the target r:

    report = w + u + e,   u ~ N(0, s_u^2) per scenario and attribute (does not average out),
                          e ~ N(0, s_e^2) per report (averages out over reports),

with s_u set so that corr(w, w + u) = target r. The study's r and bootstrap CI are computed
exactly as the analysis does; power is the share of studies whose CI excludes the baseline.
Pure numpy, seconds per table.
"""

from __future__ import annotations

import numpy as np

from . import regression, stats
from .design import rescale


# The sd of weights drawn as the protocol draws them (U(-100, 100) rescaled to max |w| = 100),
# from a large sample once: it sets the systematic error that gives the target r.
_SD_W = float(np.round(rescale(np.random.default_rng(0).uniform(-100, 100, (100_000, 5)))).std())


def _true_and_learned(rng: np.random.Generator, n_scenarios: int, n_trials: int, choice_noise: float,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
    """(true weights, weights learned from simulated choices) of one simulated study's scenarios."""
    w = np.round(rescale(rng.uniform(-100, 100, (n_scenarios, k))))
    X = rng.uniform(0, 1, (n_scenarios, n_trials, k)) - rng.uniform(0, 1, (n_scenarios, n_trials, k))
    p = 1 / (1 + np.exp(-np.einsum("snk,sk->sn", X, w) / choice_noise))
    y = (rng.uniform(size=p.shape) < p).astype(float)
    fit = regression.fit_preferences(X, y)
    return w, np.where(np.isnan(fit.weights), 0.0, fit.weights)


def simulate_study(rng: np.random.Generator, n_scenarios: int, n_reports: int, n_trials: int, target_r: float,
                   report_noise: float = 60.0, choice_noise: float = 10.0, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(mean reports, learned weights) of one simulated study, each (n_scenarios, k)."""
    w, learned = _true_and_learned(rng, n_scenarios, n_trials, choice_noise, k)
    s_u = _SD_W * np.sqrt(1 / target_r**2 - 1) if target_r > 0 else 1e6
    u = rng.normal(scale=s_u, size=w.shape)
    e = rng.normal(scale=report_noise, size=(n_reports,) + w.shape).mean(axis=0)
    return np.sign(target_r) * w + u + e, learned


#: The fewest scenarios a study's r can be estimated from: with 1 or 2 the bootstrap resamples
#: (nearly) one value, and a study "detects" any r with a CI of width 0.
MIN_SCENARIOS = 3


class DesignError(ValueError):
    """A design too small to estimate anything from."""


def simulate_effect_study(rng: np.random.Generator, n_scenarios: int, n_reports: int, n_trials: int, r_before: float,
                          r_after: float, report_noise: float = 60.0, choice_noise: float = 10.0,
                          k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reports before, reports after introspection training, learned weights) of one simulated
    study: the same scenarios and learned weights, the two conditions' errors independent (a
    conservative assumption: correlated errors would narrow the paired CI)."""
    w, learned = _true_and_learned(rng, n_scenarios, n_trials, choice_noise, k)
    out = []
    for r in (r_before, r_after):
        s_u = _SD_W * np.sqrt(1 / r**2 - 1) if r != 0 else 1e6
        u = rng.normal(scale=s_u, size=w.shape)
        e = rng.normal(scale=report_noise, size=(n_reports,) + w.shape).mean(axis=0)
        out.append(np.sign(r) * w + u + e)
    return out[0], out[1], learned


def check_design(scenarios: list[int], reports: list[int], n_trials: int, n_sim: int) -> None:
    """Refuse designs whose power would be meaningless (rather than report power 1.00)."""
    small = [n for n in scenarios if n < MIN_SCENARIOS]
    if not scenarios or small:
        raise DesignError(f"scenarios: a study needs at least {MIN_SCENARIOS} scenarios to estimate r "
                          f"(got {', '.join(map(str, small)) or 'none'})")
    if not reports or min(reports) < 1:
        raise DesignError(f"reports: at least 1 report per scenario (got {', '.join(map(str, reports)) or 'none'})")
    if n_trials < 2:  # as a run's n_eval_trials
        raise DesignError(f"trials: at least 2 choices per scenario (got {n_trials})")
    if n_sim < 1:
        raise DesignError(f"n-sim: at least 1 simulated study per design (got {n_sim})")


def power_table(target_r: float, baseline_r: float, scenarios: list[int], reports: list[int], n_trials: int,
                n_sim: int = 200, seed: int = 0, n_boot: int = 500, effect_from: float | None = None) -> list[dict]:
    """Per design: the mean r, mean CI width and power to tell ``target_r`` from ``baseline_r``.
    With ``effect_from`` (the r before introspection training), also the training effect
    target_r - effect_from on the same scenarios (paired bootstrap, as the analysis computes it):
    its mean CI half-width and the power of its CI to exclude 0."""
    check_design(scenarios, reports, n_trials, n_sim)
    if effect_from is not None and not -1 < effect_from < 1:
        raise DesignError("effect-from: an r between -1 and 1")
    rows = []
    for n_s in scenarios:
        for n_r in reports:
            rng = np.random.default_rng([seed, n_s, n_r])
            rs, widths, hits = [], [], 0
            e_half, e_hits = [], 0
            for i in range(n_sim):
                if effect_from is None:
                    rep, learned = simulate_study(rng, n_s, n_r, n_trials, target_r)
                else:
                    before, rep, learned = simulate_effect_study(rng, n_s, n_r, n_trials, effect_from, target_r)
                    d = stats.compare(before, rep, learned, n_boot=n_boot, seed=i)
                    e_half.append((d.ci[1] - d.ci[0]) / 2)
                    e_hits += bool(np.all(np.isfinite(d.ci)) and (d.ci[0] > 0 or d.ci[1] < 0))
                c = stats.correlate(rep, learned, n_boot=n_boot, seed=i)
                rs.append(c.r)
                widths.append(c.ci[1] - c.ci[0])
                # a study whose r could not be estimated (NaN CI) detects nothing
                hits += bool(np.all(np.isfinite(c.ci)) and not (c.ci[0] <= baseline_r <= c.ci[1]))
            row = {"n_scenarios": n_s, "n_reports": n_r, "mean_r": float(np.mean(rs)),
                   "ci_width": float(np.mean(widths)), "power": hits / n_sim}
            if effect_from is not None:
                row.update({"effect_ci_half_width": float(np.nanmean(e_half)), "effect_power": e_hits / n_sim})
            rows.append(row)
    return rows
