"""The notebook API: the analysis and the whole run as Python calls, results as DataFrames.

    import selfinterp
    res = selfinterp.analyze("runs/smoke")        # a run, or any directory in the paper's layout
    res.table()                                    # conditions: r, CI, n, ... (pandas)
    res.effects()                                  # training effects: difference of r, CI
    res.plot()                                     # matplotlib Figure: r with CIs per condition

    res = selfinterp.run_experiment(preset="simulated", out="runs/sim", n_reports=5)

The top-level names (``selfinterp.analyze``, ``run_experiment``, ``compare``, ``paper_data``)
import this module on first use, so ``import selfinterp`` stays light. Errors are the package's
own exceptions (``LayoutError``, ``ConfigError``, ``PaperDataError``, ...), each a one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .results import EFFECT_COLUMNS, TABLE_COLUMNS, Results, analyze, paper_data

__all__ = ["EFFECT_COLUMNS", "TABLE_COLUMNS", "Results", "analyze", "compare", "paper_data", "run_experiment"]

def run_experiment(config: str | Path | None = None, *, preset: str | None = None, out: str | Path | None = None,
                   force: bool = False, progress: bool = True, **overrides: Any) -> Results:
    """What ``selfinterp run`` does: run (or resume) the whole protocol, return its results.

    ``config`` is a configuration file, ``preset`` a preset name; keyword arguments override
    fields (``n_reports=5``, ``instill={"lr": 1e-4}``) and are validated like the file's.
    ``out`` defaults to ``runs/<name>``.
    """
    from . import config as cfgmod
    from .pipeline import Run

    if config is None and preset is None:
        raise ValueError("give a configuration file or preset= (smoke, cpu, paper, simulated)")
    cfg = cfgmod.build(preset, config, overrides)
    root = Path(out) if out is not None else Path("runs") / cfg.name
    results = Run(cfg, root, force=force, progress=progress).execute()
    return Results(root, results)


def compare(*paths: str | Path, paper: bool = False, n_boot: int = 2000, seed: int = 0):
    """Every condition's r with CIs across runs and paper-layout directories (see
    :mod:`selfinterp.comparison`): ``.table()``, ``.settings()``, ``.plot()``, ``.write(out)``."""
    from .comparison import compare as _compare

    return _compare(list(paths), paper=paper, n_boot=n_boot, seed=seed)
