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


def simulate_study(rng: np.random.Generator, n_scenarios: int, n_reports: int, n_trials: int, target_r: float,
                   report_noise: float = 60.0, choice_noise: float = 10.0, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(mean reports, learned weights) of one simulated study, each (n_scenarios, k)."""
    w = np.round(rescale(rng.uniform(-100, 100, (n_scenarios, k))))
    X = rng.uniform(0, 1, (n_scenarios, n_trials, k)) - rng.uniform(0, 1, (n_scenarios, n_trials, k))
    p = 1 / (1 + np.exp(-np.einsum("snk,sk->sn", X, w) / choice_noise))
    y = (rng.uniform(size=p.shape) < p).astype(float)
    fit = regression.fit_preferences(X, y)
    learned = np.where(np.isnan(fit.weights), 0.0, fit.weights)
    s_u = _SD_W * np.sqrt(1 / target_r**2 - 1) if target_r > 0 else 1e6
    u = rng.normal(scale=s_u, size=w.shape)
    e = rng.normal(scale=report_noise, size=(n_reports,) + w.shape).mean(axis=0)
    return np.sign(target_r) * w + u + e, learned


def power_table(target_r: float, baseline_r: float, scenarios: list[int], reports: list[int], n_trials: int,
                n_sim: int = 200, seed: int = 0, n_boot: int = 500) -> list[dict]:
    rows = []
    for n_s in scenarios:
        for n_r in reports:
            rng = np.random.default_rng([seed, n_s, n_r])
            rs, widths, hits = [], [], 0
            for i in range(n_sim):
                rep, learned = simulate_study(rng, n_s, n_r, n_trials, target_r)
                c = stats.correlate(rep, learned, n_boot=n_boot, seed=i)
                rs.append(c.r)
                widths.append(c.ci[1] - c.ci[0])
                hits += not (c.ci[0] <= baseline_r <= c.ci[1])
            rows.append({"n_scenarios": n_s, "n_reports": n_r, "mean_r": float(np.mean(rs)),
                         "ci_width": float(np.mean(widths)), "power": hits / n_sim})
    return rows
