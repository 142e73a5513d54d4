"""The paper's file layout: reading choices, reports and weights from CSV, with clear errors.

A results directory holds, per model (the base model's name starts each file name):

    <model>_instilled_selections.csv          choices on the instilled scenarios
    <model>_instilled_latent_selections.csv   choices on native (never instilled) scenarios
    <model>_regression_results.csv            learned weights (the authors'), optional
    <model>_latent_regression_results.csv     same for native scenarios, optional
    <model>_weight_reports.csv                base model's reports
    <model>_instilled_weight_reports.csv      instilled model's reports
    <model>_itrained_first_*_weight_reports.csv   trained on the first half, reporting on the second
    <model>_itrained_last_*_weight_reports.csv    trained on the second half, reporting on the first
    <model>_instilled_latent_weight_reports.csv   instilled model's reports on native scenarios
    <model>_itrained_all_*_latent_weight_reports.csv  trained on all, reporting on native scenarios

plus ``scenarios.csv`` (or this tool's ``scenarios.json``) and ``instilled_weights.csv``.
Runs written by this tool use the same layout, so one analysis serves both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

#: File kinds, most specific pattern first (several suffixes end the same way).
KINDS: list[tuple[str, re.Pattern]] = [
    (kind, re.compile(rf"^(?P<model>.+?)_{pattern}\.csv$"))
    for kind, pattern in [
        ("native_selections", r"instilled_latent_selections"),
        ("selections", r"instilled_selections"),
        ("native_regression", r"latent_regression_results"),
        ("regression", r"regression_results"),
        ("native_instilled_reports", r"instilled_latent_weight_reports"),
        ("native_itrained_reports", r"itrained_all_.+_latent_weight_reports"),
        ("itrained_first_reports", r"itrained_first_.+_weight_reports"),
        ("itrained_last_reports", r"itrained_last_.+_weight_reports"),
        ("instilled_reports", r"instilled_weight_reports"),
        ("base_reports", r"weight_reports"),
    ]
]


class LayoutError(ValueError):
    """A results file is missing, unreadable or lacks what the analysis needs."""


def classify(name: str) -> tuple[str, str] | None:
    """(kind, model) of a results file name, or None if it is not one."""
    for kind, pattern in KINDS:
        m = pattern.match(name)
        if m:
            return kind, m.group("model")
    return None


@dataclass
class Directory:
    """What a results directory holds: per model, the path of each kind of file."""

    root: Path
    files: dict[str, dict[str, Path]] = field(default_factory=dict)  # model -> kind -> path
    scenarios: Path | None = None
    instilled_weights: Path | None = None

    @property
    def models(self) -> list[str]:
        return sorted(self.files)


def scan(root: str | Path) -> Directory:
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: not a directory")
    d = Directory(root=root)
    for p in sorted(root.iterdir()):
        if p.name in ("scenarios.csv", "scenarios.json"):
            d.scenarios = d.scenarios or p
        elif p.name == "instilled_weights.csv":
            d.instilled_weights = p
        elif (hit := classify(p.name)) is not None:
            kind, model = hit
            d.files.setdefault(model, {})[kind] = p
    # scenarios.csv (the paper's) wins over scenarios.json when both are present.
    if (root / "scenarios.csv").exists():
        d.scenarios = root / "scenarios.csv"
    return d


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise LayoutError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise LayoutError(f"{path}: not a readable CSV file ({e})") from None


def _require(df: pd.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LayoutError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))})")


def _numeric(df: pd.DataFrame, path: Path, columns: list[str]) -> np.ndarray:
    """The columns as floats; a cell that is not a number is an error naming its line and column."""
    out = np.empty((len(df), len(columns)))
    for j, c in enumerate(columns):
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna() & df[c].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise LayoutError(f"{path}: line {i + 2}, column {c}: {df[c].iloc[i]!r} is not a number")
        out[:, j] = values.to_numpy(dtype=float)
    return out


# --------------------------------------------------------------------------------------------
# Scenarios: only the attribute names and ranges matter for the analysis.


@dataclass(frozen=True)
class Ranges:
    names: dict[str, list[str]]   # scenario -> attribute names
    lo: dict[str, np.ndarray]     # scenario -> (k,) minima
    hi: dict[str, np.ndarray]     # scenario -> (k,) maxima

    def normalise(self, scenario: str, values: np.ndarray) -> np.ndarray:
        return (values - self.lo[scenario]) / (self.hi[scenario] - self.lo[scenario])


def read_ranges(path: Path, k: int) -> Ranges:
    if path.suffix == ".json":
        from .scenarios import load

        ss = load(path, k=k)
        return Ranges({s.id: s.attribute_names for s in ss},
                      {s.id: np.array([a.min for a in s.attributes]) for s in ss},
                      {s.id: np.array([a.max for a in s.attributes]) for s in ss})
    df = _read_csv(path)
    cols = [f"attr{j}" for j in range(1, k + 1)]
    lo_cols = [f"{c}_min" for c in cols]
    hi_cols = [f"{c}_max" for c in cols]
    _require(df, path, ["scenario"] + cols + lo_cols + hi_cols)
    lo, hi = _numeric(df, path, lo_cols), _numeric(df, path, hi_cols)
    bad = np.flatnonzero(~(lo < hi).all(axis=1))
    if len(bad):
        raise LayoutError(f"{path}: line {bad[0] + 2}: every attribute's min must be less than its max")
    ids = df["scenario"].astype(str).tolist()
    return Ranges({s: df.loc[i, cols].astype(str).tolist() for i, s in enumerate(ids)},
                  dict(zip(ids, lo)), dict(zip(ids, hi)))


# --------------------------------------------------------------------------------------------
# Choices, reports, weights


@dataclass(frozen=True)
class Choices:
    scenario: np.ndarray  # (n,) scenario ids
    a: np.ndarray         # (n, k) option A's values
    b: np.ndarray         # (n, k) option B's values
    target: np.ndarray    # (n,) 1 = chose A, 0 = chose B, or P(A) when the file has a p_a column


def read_choices(path: Path, k: int) -> Choices:
    df = _read_csv(path)
    a_cols = [f"A_attribute_{j}" for j in range(1, k + 1)]
    b_cols = [f"B_attribute_{j}" for j in range(1, k + 1)]
    soft = "p_a" in df.columns
    _require(df, path, ["scenario"] + ([] if soft else ["selection"]) + a_cols + b_cols)
    if soft:
        target = _numeric(df, path, ["p_a"])[:, 0]
        bad = np.flatnonzero(~((target >= 0) & (target <= 1)))
        if len(bad):
            raise LayoutError(f"{path}: line {bad[0] + 2}, column p_a: must be a probability in [0, 1]")
    else:
        sel = df["selection"].astype(str).str.strip().str.upper()
        bad = np.flatnonzero(~sel.isin(["A", "B"]).to_numpy())
        if len(bad):
            i = bad[0]
            raise LayoutError(f"{path}: line {i + 2}, column selection: {df['selection'].iloc[i]!r} is not A or B "
                              f"({len(bad)} such row(s))")
        target = (sel == "A").to_numpy(dtype=float)
    return Choices(df["scenario"].astype(str).to_numpy(), _numeric(df, path, a_cols), _numeric(df, path, b_cols), target)


@dataclass(frozen=True)
class Reports:
    scenario: np.ndarray  # (n,) scenario ids
    weights: np.ndarray   # (n, k) reported weights (rows with a missing value are kept out, and counted)
    n_incomplete: int     # rows with a missing weight: counted, never silently dropped


def read_reports(path: Path, k: int) -> Reports:
    df = _read_csv(path)
    cols = [f"report_attr{j}" for j in range(1, k + 1)]
    _require(df, path, ["scenario"] + cols)
    w = _numeric(df, path, cols)
    complete = ~np.isnan(w).any(axis=1)
    return Reports(df["scenario"].astype(str).to_numpy()[complete], w[complete], int((~complete).sum()))


def read_weights(path: Path, k: int) -> dict[str, np.ndarray]:
    """``scenario, attr1..k`` (instilled) or ``scenario, b_attr1..k`` (regression results)."""
    df = _read_csv(path)
    cols = [f"attr{j}" for j in range(1, k + 1)]
    if cols[0] not in df.columns:
        cols = [f"b_attr{j}" for j in range(1, k + 1)]
        if cols[0] not in df.columns:
            raise LayoutError(f"{path}: expected columns attr1..attr{k} or b_attr1..b_attr{k}")
    _require(df, path, ["scenario"] + cols)
    w = _numeric(df, path, cols)
    ids = df["scenario"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise LayoutError(f"{path}: scenario {dup.iloc[0]!r} appears more than once")
    return dict(zip(ids, w))


def write_weights(path: Path, weights: dict[str, np.ndarray], prefix: str = "b_attr") -> None:
    k = len(next(iter(weights.values())))
    df = pd.DataFrame([[s, *np.round(w).astype(int)] for s, w in weights.items()],
                      columns=["scenario"] + [f"{prefix}{j}" for j in range(1, k + 1)])
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)
