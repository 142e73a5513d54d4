"""Speed of the numeric core on the paper's data, measured side by side in one run.

1. The vectorised fit of every scenario's preferences (selfinterp.regression) against a loop
   of one solver call per scenario: scikit-learn's LogisticRegression (C=1: the same N(0, 1)
   prior on the slopes, flat intercept) and statsmodels' penalised Logit.
2. The whole analysis of shared/paper-data (both models, every condition, bootstrap CIs), without
   and with its figures, in this process and as a fresh ``selfinterp analyze`` (imports
   included). Target: < 2 s wall with figures.

scikit-learn and statsmodels are optional here (the comparison lines are skipped without them).

Run: python benchmarks/bench_analysis.py [PAPER_DATA_DIR]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from selfinterp import analysis, layout, regression
from selfinterp.stats import pearson

DATA = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "paper-data"


def best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    d = layout.scan(DATA)
    ranges = layout.read_ranges(d.scenarios, 5)
    model = d.models[0]
    choices = layout.read_choices(d.files[model]["native_selections"], 5)
    ids = list(dict.fromkeys(choices.scenario))
    groups = []
    for s in ids:
        rows = choices.scenario == s
        groups.append((ranges.normalise(s, choices.a[rows]) - ranges.normalise(s, choices.b[rows]), choices.target[rows]))
    X, y, m = regression.pad(groups)
    print(f"data: {model} native selections, {len(ids)} scenarios x {X.shape[1]} choices")

    t_vec, fit = best_of(lambda: regression.fit_preferences(X, y, m, intercept_sd=None))

    print(f"{'method':<44}{'time':>10}{'ratio':>9}   agreement with vectorised (r of slopes)")
    print(f"{'selfinterp vectorised Newton (all at once)':<44}{t_vec * 1e3:>8.1f}ms{1.0:>8.1f}x")
    try:
        from sklearn.linear_model import LogisticRegression

        def sklearn_loop():
            return np.array([LogisticRegression(C=1.0, tol=1e-8, max_iter=1000).fit(x, yy).coef_[0] for x, yy in groups])

        t_sk, sk = best_of(sklearn_loop, repeat=3)
        print(f"{'scikit-learn, one fit per scenario':<44}{t_sk * 1e3:>8.1f}ms{t_sk / t_vec:>8.1f}x   {pearson(sk, fit.slopes):.6f}")
    except ImportError:
        print("scikit-learn, one fit per scenario: skipped (pip install scikit-learn)")
    try:
        import statsmodels.api as sm

        def statsmodels_loop():
            out = []
            for x, yy in groups:
                Z = sm.add_constant(x)
                alpha = np.r_[0.0, np.ones(5)] / len(yy)  # statsmodels scales the penalty by 1/n
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = sm.GLM(yy, Z, family=sm.families.Binomial()).fit_regularized(alpha=alpha, L1_wt=0.0)
                out.append(res.params[1:])
            return np.array(out)

        t_sm, smw = best_of(statsmodels_loop, repeat=3)
        print(f"{'statsmodels GLM (L2), one fit per scenario':<44}{t_sm * 1e3:>8.1f}ms{t_sm / t_vec:>8.1f}x   {pearson(smw, fit.slopes):.6f}")
    except ImportError:
        print("statsmodels GLM (L2), one fit per scenario: skipped (pip install statsmodels)")

    from selfinterp.figures import write_all

    t_all, a = best_of(lambda: analysis.analyze(DATA), repeat=3)
    n_cond = sum(len(r.conditions) for r in a.models.values())
    with tempfile.TemporaryDirectory() as tmp:
        write_all(a, Path(tmp))  # matplotlib imported and warm
        t_fig, _ = best_of(lambda: write_all(analysis.analyze(DATA), Path(tmp)), repeat=3)
        cmd = [str(Path(sys.executable).parent / "selfinterp"), "analyze", str(DATA), "--out", tmp]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        t_cold, _ = best_of(lambda: subprocess.run(cmd, check=True, capture_output=True, env=env), repeat=3)
    print(f"whole analysis of {DATA.name}: {len(a.models)} models, {n_cond} conditions, 2000 bootstrap resamples "
          f"each: {t_all:.2f} s; with its {2 * len(a.models)} figures: {t_fig:.2f} s; "
          f"`selfinterp analyze` from a fresh process (imports, results.json, figures): {t_cold:.2f} s "
          f"(target < 2 s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
