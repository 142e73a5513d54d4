"""Figures of an analysis (PNG): what people would rather see than read.

- ``accuracy_<model>.png``: r with its 95% CI per condition (bar chart, the paper's table);
- ``scatter_<model>.png``: mean reported weight vs the weight it should match, one panel per
  condition (pooled halves are shown z-scored, as they are correlated);
- a run's ``training_loss.png`` (loss per step, held-out accuracy at evaluations) and
  ``report_curves.png`` (report accuracy over training), drawn from its models' manifests.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .analysis import CONDITIONS, Analysis

LABELS = {c.name: c.label for c in CONDITIONS}
PANEL = 3.2  # inches per panel of the scatter grid


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def accuracy_chart(a: Analysis, model: str, path: Path) -> Path:
    """Write ``model``'s bar chart of r with its 95% CI per condition to ``path``; the path."""
    plt = _pyplot()
    conds = a.models[model].conditions
    names = [c.name for c in CONDITIONS if c.name in conds]
    r = np.array([conds[n].r for n in names])
    lo = r - np.array([conds[n].ci[0] for n in names])
    hi = np.array([conds[n].ci[1] for n in names]) - r
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    colors = ["#7f7f7f" if n == "instillation" else "#d62728" if n == "base_reports" else "#1f77b4" for n in names]
    y = np.arange(len(names))[::-1]
    ax.barh(y, r, xerr=[lo, hi], color=colors, capsize=3)
    for yi, ri, top in zip(y, r, r + hi):  # the value just past the CI's upper end
        ax.text(top + 0.02, yi, f"{ri:.2f}", va="center", ha="left", fontsize=8)
    ax.set_yticks(y, [LABELS[n] for n in names], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(min(-0.1, float(np.min(r - lo)) - 0.1), 1.08)
    ax.set_xlabel("Pearson r (95% CI, bootstrap over scenarios)")
    ax.set_title(f"{model}: accuracy of self-reports", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi=120)


def scatter_grid(a: Analysis, model: str, path: Path) -> Path:
    """Write ``model``'s scatter plots (per condition: values against its weights) to ``path``; the path."""
    plt = _pyplot()
    conds = a.models[model].conditions
    names = [c.name for c in CONDITIONS if c.name in conds and conds[c.name].x is not None]
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL * cols, PANEL * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        c = conds[name]
        ax.scatter(c.y.ravel(), c.x.ravel(), s=6, alpha=0.4, color="#1f77b4")
        ax.set_title(f"{LABELS[name]}\nr = {c.r:.2f}", fontsize=8)
        if name == "instillation":
            ax.set_xlabel("instilled weight", fontsize=8)
            ax.set_ylabel("learned weight", fontsize=8)
        else:
            pooled = name == "itrained_heldout"
            ax.set_xlabel("learned weight" + (" (z)" if pooled else ""), fontsize=8)
            ax.set_ylabel("mean reported weight" + (" (z)" if pooled else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle(model, fontsize=10)
    _fixed_margins(fig, rows, cols)
    return _save(fig, path, dpi=110)


def _fixed_margins(fig, rows: int, cols: int, panel: float = PANEL) -> None:
    """Margins in inches for a grid of equal panels: what tight_layout would find, without measuring
    every text first (the labels here have fixed sizes; bench_analysis.py times the figures)."""
    left, right, bottom, top, wgap, hgap = 0.65, 0.3, 0.55, 0.75, 0.75, 1.0
    W, H = panel * cols, panel * rows
    w = (W - left - right - (cols - 1) * wgap) / cols
    h = (H - bottom - top - (rows - 1) * hgap) / rows
    fig.subplots_adjust(left=left / W, right=1 - right / W, bottom=bottom / H, top=1 - top / H,
                        wspace=wgap / w, hspace=hgap / h)


def write_all(a: Analysis, out: Path) -> list[Path]:
    """Write the accuracy chart and scatter grid of every model with results into ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for model in a.models:
        if not a.models[model].conditions:
            continue
        paths.append(accuracy_chart(a, model, out / f"accuracy_{_safe(model)}.png"))
        paths.append(scatter_grid(a, model, out / f"scatter_{_safe(model)}.png"))
    return paths


def forest(table, series: str = "model", title: str = "", ax=None):
    """r with its 95% CI per condition, one marker per series (a model, or a run): the figure of
    ``Results.plot()`` and ``selfinterp compare``. ``table`` has columns condition, r, ci_low,
    ci_high and ``series``. Drawn on ``ax`` when given, else on a new Figure that belongs to no
    pyplot window (nothing is switched: it shows in a notebook, or is saved)."""
    from matplotlib.figure import Figure

    names = [c.name for c in CONDITIONS if c.name in set(table["condition"])]
    groups = list(dict.fromkeys(table[series]))
    if ax is None:
        fig = Figure(figsize=(8.5, 0.45 * len(names) * (1 + 0.25 * (len(groups) - 1)) + 1.8 + 0.2 * len(groups)))
        ax = fig.add_subplot()
    fig = ax.figure
    step = 0.7 / max(len(groups), 1)
    y0 = np.arange(len(names))[::-1].astype(float)
    for i, g in enumerate(groups):
        rows = table[table[series] == g].set_index("condition")
        have = [n for n in names if n in rows.index]
        y = np.array([y0[names.index(n)] for n in have]) + 0.35 - step * (i + 0.5)
        r = rows.loc[have, "r"].to_numpy(dtype=float)
        err = np.vstack([r - rows.loc[have, "ci_low"].to_numpy(dtype=float),
                         rows.loc[have, "ci_high"].to_numpy(dtype=float) - r])
        ax.errorbar(r, y, xerr=err, fmt="o", ms=4, capsize=2.5, lw=1.2, label=str(g))
    ax.set_yticks(y0, [LABELS[n] for n in names], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    lo = float(np.nanmin(table["ci_low"])) if len(table) else 0.0
    ax.set_xlim(min(-0.1, lo - 0.05), 1.02)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel("Pearson r (95% CI, bootstrap over scenarios)")
    ax.grid(axis="x", color="#dddddd", lw=0.6)
    if len(groups) > 1:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(2, len(groups)), frameon=False)
    if title:
        ax.set_title(title, fontsize=10, loc="right")
    fig.tight_layout()
    return fig


def _save(fig, path: Path, dpi: int = 100) -> Path:
    plt = _pyplot()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def training_curves(curves: dict[str, list[float]], evals: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Write the training loss per step (answer tokens: ln 2 is chance for A/B) per model and, beside
    it, the held-out answer accuracy at each evaluation, to ``path``; the path."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 7, 3), squeeze=False)
    ax = axes[0][0]
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, lw=0.8)
    ax.axhline(0.6931, color="grey", ls=":", lw=1, label="ln 2 (chance, A/B)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (answer tokens)")
    ax.legend(fontsize=8)
    if evals:
        ax = axes[0][1]
        for name, pts in evals.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out answer accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def report_curves(series: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Write r of expected-value reports at each evaluation (one line per model and scenario set;
    dashed: the set a model was trained on) to ``path``; the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1,
                ls="--" if name.endswith(("trained", "instilled")) else "-", label=name)
    ax.axhline(0.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("r (expected-value reports)")
    ax.set_ylim(-1, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
