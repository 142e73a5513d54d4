"""The analysis of one directory as a notebook object: :class:`Results` (the ``results.json``
schema, with tables as DataFrames and a figure) and :func:`analyze`, which makes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: Columns of :meth:`Results.table` before any extra statistic a results file carries (p-values).
TABLE_COLUMNS = ["model", "condition", "label", "r", "ci_low", "ci_high", "n_scenarios", "n_reports",
                 "n_choices", "sign_agreement", "reliability", "noise_ceiling"]
EFFECT_COLUMNS = ["model", "effect", "baseline", "trained", "diff", "ci_low", "ci_high", "n_scenarios"]


@dataclass(frozen=True)
class Results:
    """The analysis of one directory: the ``results.json`` schema, with tables and a figure."""

    source: Path
    results: dict = field(repr=False)
    analysis: Any = field(default=None, repr=False, compare=False)  # analysis.Analysis when computed here

    @property
    def models(self) -> list[str]:
        """The models in the results, in their order there."""
        return list(self.results["models"])

    def _pick(self, model: str | None) -> list[str]:
        if model is None:
            return self.models
        if model not in self.results["models"]:
            raise KeyError(f"no model {model!r} in {self.source}; it has: {', '.join(self.models)}")
        return [model]

    def table(self, model: str | None = None) -> pd.DataFrame:
        """One row per model and condition: r, its 95% CI, scenarios, reports, and what else the
        results hold for it (p-values, when the analysis gives them)."""
        labels = self.results.get("labels", {})
        rows = []
        for m in self._pick(model):
            for name, c in self.results["models"][m].items():
                row = {"model": m, "condition": name, "label": labels.get(name, name),
                       "ci_low": c["ci"][0], "ci_high": c["ci"][1]}
                row.update({k: v for k, v in c.items() if k != "ci" and not isinstance(v, (dict, list))})
                rows.append(row)
        return _frame(rows, TABLE_COLUMNS)

    def effects(self, model: str | None = None) -> pd.DataFrame:
        """One row per model and training effect: trained minus untrained r on the same scenarios."""
        from .analysis import EFFECTS

        pairs = {name: (base, trained) for name, base, trained in EFFECTS}
        rows = []
        for m in self._pick(model):
            for name, e in self.results["effects"].get(m, {}).items():
                base, trained = pairs.get(name, ("", ""))
                row = {"model": m, "effect": name, "baseline": base, "trained": trained,
                       "ci_low": e["ci"][0], "ci_high": e["ci"][1]}
                row.update({k: v for k, v in e.items() if k != "ci" and not isinstance(v, (dict, list))})
                rows.append(row)
        return _frame(rows, EFFECT_COLUMNS)

    def plot(self, model: str | None = None, ax=None):
        """r with its 95% CI per condition, one series per model (a matplotlib Figure)."""
        from .figures import forest

        t = self.table(model)
        if t.empty:
            raise ValueError(f"{self.source}: no condition could be computed, nothing to plot")
        return forest(t, "model", title=str(self.source), ax=ax)

    @property
    def notes(self) -> list[str]:
        """What the analysis kept but counted, skipped or substituted (also printed by the CLI)."""
        return list(self.results.get("notes", []))

    def to_json(self) -> dict:
        """The results as the ``results.json`` dict."""
        return self.results

    def __repr__(self) -> str:
        n = sum(len(c) for c in self.results["models"].values())
        return f"Results({str(self.source)!r}: {', '.join(self.models)}; {n} conditions)"

    def _repr_html_(self) -> str:  # notebooks show the table
        cols = ["model", "condition", "r", "ci_low", "ci_high", "n_scenarios", "n_reports"]
        return self.table()[cols].to_html(index=False, float_format=lambda x: f"{x:.3f}")


def _frame(rows: list[dict], first: list[str]) -> pd.DataFrame:
    extra = sorted({k for r in rows for k in r} - set(first))
    return pd.DataFrame(rows, columns=first + extra)


# --------------------------------------------------------------------------------------------


def paper_data() -> Path:
    """The cached paper data (``selfinterp data paper`` fills the cache)."""
    from .paperdata import location

    return location()


def analyze(path: str | Path | None = None, *, paper: bool = False, n_boot: int = 2000, seed: int = 0,
            strict: bool = False) -> Results:
    """Analyse a run directory or a directory in the paper's layout (``paper=True``: the cached
    paper data). The bootstrap is seeded: the same call gives the same numbers. What was kept but
    counted or skipped is in ``.notes``; ``strict=True`` refuses it instead (as ``--strict``)."""
    from . import analysis

    if paper == (path is not None):
        raise ValueError("give a directory, or paper=True for the paper's data (not both)")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    root = paper_data() if paper else Path(path)
    a = analysis.analyze(root, n_boot=n_boot, seed=seed, strict=strict)
    return Results(root, analysis.to_json(a), a)
