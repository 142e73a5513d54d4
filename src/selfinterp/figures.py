"""Figures of an analysis (PNG): what people would rather see than read.

- ``accuracy_<model>.png``: r with its 95% CI per condition (bar chart, the paper's table);
- ``scatter_<model>.png``: mean reported weight vs the weight it should match, one panel per
  condition (pooled halves are shown z-scored, as they are correlated).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .analysis import CONDITIONS, Analysis

LABELS = {c.name: c.label for c in CONDITIONS}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def accuracy_chart(a: Analysis, model: str, path: Path) -> Path:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scatter_grid(a: Analysis, model: str, path: Path) -> Path:
    plt = _pyplot()
    conds = a.models[model].conditions
    names = [c.name for c in CONDITIONS if c.name in conds and conds[c.name].x is not None]
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(a: Analysis, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for model in a.models:
        if not a.models[model].conditions:
            continue
        paths.append(accuracy_chart(a, model, out / f"accuracy_{_safe(model)}.png"))
        paths.append(scatter_grid(a, model, out / f"scatter_{_safe(model)}.png"))
    return paths
