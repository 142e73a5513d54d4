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
    <model>_control_itrained_{first,last}_*_weight_reports.csv, <model>_control_itrained_all_*_latent_weight_reports.csv
        the cross-model control (this tool's, not the paper's): the base model given the same
        introspection training, reporting on the same held-out (or native) scenarios

plus ``scenarios.csv`` (or this tool's ``scenarios.json``) and ``instilled_weights.csv``.
Runs written by this tool use the same layout, so one analysis serves both.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .journal import atomic_write
from .scenarios import DEFAULT_K

#: File kinds, most specific pattern first (several suffixes end the same way).
KINDS: list[tuple[str, re.Pattern]] = [
    (kind, re.compile(rf"^(?P<model>.+?)_{pattern}\.csv$"))
    for kind, pattern in [
        ("native_selections", r"instilled_latent_selections"),
        ("selections", r"instilled_selections"),
        ("native_regression", r"latent_regression_results"),
        ("regression", r"regression_results"),
        ("control_native_reports", r"control_itrained_all_.+_latent_weight_reports"),
        ("control_first_reports", r"control_itrained_first_.+_weight_reports"),
        ("control_last_reports", r"control_itrained_last_.+_weight_reports"),
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


class EmptyFile(LayoutError):
    """A results file with no rows (empty, or a header only): its conditions are skipped, with a note."""


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
        """The models that have files in the directory, sorted."""
        return sorted(self.files)

    @property
    def k(self) -> int:
        """How many attributes each scenario has: from the scenarios file, else from the first
        results file's columns, else the paper's 5 (every scenario of a directory has the same k)."""
        return attribute_count(self)


_NUMBERED = re.compile(r"^(?:attr|A_attribute_|report_attr|b_attr)(\d+)$")


def attribute_count(d: "Directory") -> int:
    """The number of attributes per scenario in a results directory (see :attr:`Directory.k`)."""
    if d.scenarios is not None and d.scenarios.suffix == ".json":
        from .scenarios import ScenarioError, load

        try:
            ks = sorted({len(s.attributes) for s in load(d.scenarios, k=None)})
        except ScenarioError as e:
            raise LayoutError(str(e)) from None
        if len(ks) > 1:
            raise LayoutError(f"{d.scenarios}: scenarios with {' and '.join(map(str, ks))} attributes; the "
                              "paper's layout holds one number of attributes per directory")
        return ks[0] if ks else DEFAULT_K
    for path in ([d.scenarios] if d.scenarios is not None else []) + [p for f in d.files.values() for p in f.values()]:
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        numbers = [int(m.group(1)) for c in header if (m := _NUMBERED.match(c.strip()))]
        if numbers:
            return max(numbers)
    return DEFAULT_K


def scan(root: str | Path) -> Directory:
    """What the results directory ``root`` holds, by model and kind of file."""
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


# --------------------------------------------------------------------------------------------
# One rule set for every cell of every file:
#
# - an error naming file, line and column: a cell that is not a finite number where a number
#   belongs (text, NaN, inf, empty), a row with fewer or more cells than the header, a selection
#   other than A/B, a scenario (or weight row) defined twice with different values;
# - kept, counted and printed (an error with ``strict``): report values outside [-100, 100] (the
#   authors' own files hold a few, and their analysis used them) and rows that repeat an earlier
#   row exactly;
# - a file with no rows: :class:`EmptyFile`, and the analysis skips what needs it, with a note.

#: The scale of weights and reports; values outside it are kept but counted.
SCALE = 100.0


@dataclass
class Findings:
    """What reading kept but counted. Every entry is one line for the console; ``strict``
    turns each into an error instead."""

    strict: bool = False
    kept: list[str] = field(default_factory=list)

    def keep(self, message: str) -> None:
        """Note ``message`` as kept but counted; with ``strict``, raise it as a LayoutError instead."""
        if self.strict:
            raise LayoutError(f"{message} (refused: --strict)")
        self.kept.append(message)


@dataclass(frozen=True)
class Table:
    """A CSV file as text cells, with the physical line of each row (for messages)."""

    path: Path
    columns: list[str]
    rows: list[list[str]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    def require(self, columns: list[str]) -> None:
        """Raise a LayoutError naming any of ``columns`` the file lacks."""
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise LayoutError(f"{self.path}: missing column(s) {', '.join(missing)} (has: {', '.join(self.columns)})")

    def text(self, column: str) -> np.ndarray:
        """One column's cells as text, one per row."""
        j = self.columns.index(column)
        return np.array([r[j] for r in self.rows], dtype=object)

    def numeric(self, columns: list[str]) -> np.ndarray:
        """The columns as floats; a cell that is not a finite number is an error naming its line and column."""
        out = np.empty((len(self.rows), len(columns)))
        for j, c in enumerate(columns):
            cells = self.text(c)
            try:  # the common case: float() reads every cell (surrounding blanks included; "1_0" is not a number)
                texts = cells.tolist()
                if "_" in "".join(texts):
                    raise ValueError
                values = np.array(texts, dtype=float)
            except ValueError:  # find which cell does not read, for the message
                values = pd.to_numeric(pd.Series([c.strip() for c in cells]), errors="coerce").to_numpy(dtype=float)
            bad = np.flatnonzero(~np.isfinite(values))
            if len(bad):
                i = int(bad[0])
                cell = cells[i]
                what = ("is empty" if not cell.strip() else
                        f"{cell!r} is not a finite number" if cell.strip().lower().lstrip("+-") in ("nan", "inf", "infinity")
                        else f"{cell!r} is not a number")
                more = f" ({len(bad)} such cells in this column)" if len(bad) > 1 else ""
                raise LayoutError(f"{self.path}: line {self.lines[i]}, column {c}: {what}{more}")
            out[:, j] = values
        return out

    def count_duplicates(self, findings: Findings) -> None:
        """Rows that repeat an earlier row exactly: kept, counted."""
        first: dict[tuple, int] = {}
        dups = []
        for row, line in zip(self.rows, self.lines):
            key = tuple(map(str.strip, row))
            if key in first:
                dups.append((line, first[key]))
            else:
                first[key] = line
        if dups:
            findings.keep(f"{self.path}: {len(dups)} row(s) repeat an earlier row exactly (line {dups[0][0]} "
                          f"repeats line {dups[0][1]}); kept, each counted as a row of its own")

    def unique_by(self, key: str, columns: list[str]) -> list[int]:
        """Indices of each ``key``'s first row; a key whose rows differ in ``columns`` is an error."""
        jk = self.columns.index(key)
        js = [self.columns.index(c) for c in columns]
        first: dict[str, int] = {}
        for i, row in enumerate(self.rows):
            k = row[jk]
            if k not in first:
                first[k] = i
                continue
            other = self.rows[first[k]]
            for c, j in zip(columns, js):
                if not _same_cell(row[j], other[j]):
                    raise LayoutError(
                        f"{self.path}: line {self.lines[i]}, column {c}: {key} {k!r} is defined again with "
                        f"{row[j]!r} (line {self.lines[first[k]]} has {other[j]!r}); keep one definition")
        return list(first.values())


def _same_cell(a: str, b: str) -> bool:
    a, b = a.strip(), b.strip()
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def read_table(path: Path) -> Table:
    """Read a CSV file into text cells: every row must have the header's cells. No rows: EmptyFile."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header: list[str] | None = None
            rows, lines = [], []
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if header is None:
                    header = [c.strip() for c in row]
                    dup = sorted({c for c in header if header.count(c) > 1})
                    if dup:
                        raise LayoutError(f"{path}: line {reader.line_num}: column(s) {', '.join(dup)} appear more "
                                          "than once in the header")
                    continue
                if len(row) != len(header):
                    what = (f"truncated row: {len(row)} of {len(header)} cells (no {', '.join(header[len(row):][:3])}"
                            f"{', ...' if len(header) - len(row) > 3 else ''})" if len(row) < len(header)
                            else f"{len(row)} cells, but the header names {len(header)}")
                    raise LayoutError(f"{path}: line {reader.line_num}: {what}")
                rows.append(row)
                lines.append(reader.line_num)
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
        from .journal import unreadable

        raise LayoutError(f"{path}: {unreadable(e, 'CSV', 'CSV')}") from None
    except csv.Error as e:
        raise LayoutError(f"{path}: not a readable CSV file ({e})") from None
    if header is None:
        raise EmptyFile(f"{path}: empty file")
    if not rows:
        raise EmptyFile(f"{path}: no rows (a header only)")
    return Table(path, header, rows, lines)


# --------------------------------------------------------------------------------------------
# Scenarios: only the attribute names and ranges matter for the analysis.


@dataclass(frozen=True)
class Ranges:
    """Per scenario: the attribute names and each attribute's minimum and maximum."""

    names: dict[str, list[str]]   # scenario -> attribute names
    lo: dict[str, np.ndarray]     # scenario -> (k,) minima
    hi: dict[str, np.ndarray]     # scenario -> (k,) maxima

    def normalise(self, scenario: str, values: np.ndarray) -> np.ndarray:
        """A scenario's attribute values min-max normalised to its ranges (0 at the minimum, 1 at the maximum)."""
        return (values - self.lo[scenario]) / (self.hi[scenario] - self.lo[scenario])


def read_ranges(path: Path, k: int, findings: Findings | None = None) -> Ranges:
    """Every scenario's attribute names and ranges, from a scenarios.csv or a scenarios.json file."""
    findings = findings or Findings()
    if path.suffix == ".json":
        from .scenarios import ScenarioError, load

        try:
            ss = load(path, k=k)
        except ScenarioError as e:
            raise LayoutError(str(e)) from None
        return Ranges({s.id: s.attribute_names for s in ss},
                      {s.id: np.array([a.min for a in s.attributes]) for s in ss},
                      {s.id: np.array([a.max for a in s.attributes]) for s in ss})
    t = read_table(path)
    cols = [f"attr{j}" for j in range(1, k + 1)]
    lo_cols = [f"{c}_min" for c in cols]
    hi_cols = [f"{c}_max" for c in cols]
    t.require(["scenario"] + cols + lo_cols + hi_cols)
    lo, hi = t.numeric(lo_cols), t.numeric(hi_cols)
    bad = np.flatnonzero(~(lo < hi).all(axis=1))
    if len(bad):
        raise LayoutError(f"{path}: line {t.lines[bad[0]]}: every attribute's min must be less than its max")
    t.count_duplicates(findings)
    keep = t.unique_by("scenario", [c for c in t.columns if c != "scenario"])
    ids = t.text("scenario")
    names = np.array([t.text(c) for c in cols]).T
    return Ranges({ids[i]: [str(n) for n in names[i]] for i in keep},
                  {ids[i]: lo[i] for i in keep}, {ids[i]: hi[i] for i in keep})


# --------------------------------------------------------------------------------------------
# Choices, reports, weights


@dataclass(frozen=True)
class Choices:
    """Choice trials: the scenario, both options' values and the choice (or P(A)) of each."""

    scenario: np.ndarray  # (n,) scenario ids
    a: np.ndarray         # (n, k) option A's values
    b: np.ndarray         # (n, k) option B's values
    target: np.ndarray    # (n,) 1 = chose A, 0 = chose B, or P(A) when the file has a p_a column


def read_choices(path: Path, k: int, findings: Findings | None = None) -> Choices:
    """The choices of a selections file: A/B selections, or P(A) when it has a p_a column."""
    findings = findings or Findings()
    t = read_table(path)
    a_cols = [f"A_attribute_{j}" for j in range(1, k + 1)]
    b_cols = [f"B_attribute_{j}" for j in range(1, k + 1)]
    soft = "p_a" in t.columns
    t.require(["scenario"] + ([] if soft else ["selection"]) + a_cols + b_cols)
    if soft:
        target = t.numeric(["p_a"])[:, 0]
        bad = np.flatnonzero(~((target >= 0) & (target <= 1)))
        if len(bad):
            raise LayoutError(f"{path}: line {t.lines[bad[0]]}, column p_a: {target[bad[0]]:g} is not a "
                              "probability in [0, 1]")
    else:
        raw = t.text("selection")
        sel = np.array([s.strip().upper() for s in raw])
        bad = np.flatnonzero(~np.isin(sel, ["A", "B"]))
        if len(bad):
            i = bad[0]
            raise LayoutError(f"{path}: line {t.lines[i]}, column selection: {raw[i]!r} is not A or B "
                              f"({len(bad)} such row(s))")
        target = (sel == "A").astype(float)
    a, b = t.numeric(a_cols), t.numeric(b_cols)
    t.count_duplicates(findings)
    return Choices(t.text("scenario").astype(str), a, b, target)


@dataclass(frozen=True)
class Reports:
    """Self-reports: each one's scenario and weights, and how many rows hold values outside the scale."""

    scenario: np.ndarray  # (n,) scenario ids
    weights: np.ndarray   # (n, k) reported weights
    n_outside: int = 0    # rows with a value outside [-100, 100]: kept, counted


def read_reports(path: Path, k: int, findings: Findings | None = None) -> Reports:
    """The self-reports of a weight-reports file; values outside [-100, 100] are kept but counted."""
    findings = findings or Findings()
    t = read_table(path)
    cols = [f"report_attr{j}" for j in range(1, k + 1)]
    t.require(["scenario"] + cols)
    w = t.numeric(cols)
    t.numeric([c for c in t.columns if c.startswith(("A_attribute_", "B_attribute_"))])  # the pair shown: numbers too
    outside = np.abs(w) > SCALE
    n_rows = int(outside.any(axis=1).sum())
    if n_rows:
        i, j = np.argwhere(outside)[0]
        findings.keep(f"{path}: {int(outside.sum())} report value(s) in {n_rows} row(s) outside "
                      f"[-{SCALE:g}, {SCALE:g}] (line {t.lines[i]}, column {cols[j]}: {w[i, j]:g}); kept as given")
    t.count_duplicates(findings)
    return Reports(t.text("scenario").astype(str), w, n_rows)


def read_weights(path: Path, k: int, findings: Findings | None = None) -> dict[str, np.ndarray]:
    """``scenario, attr1..k`` (instilled) or ``scenario, b_attr1..k`` (regression results)."""
    findings = findings or Findings()
    t = read_table(path)
    cols = [f"attr{j}" for j in range(1, k + 1)]
    if cols[0] not in t.columns:
        cols = [f"b_attr{j}" for j in range(1, k + 1)]
        if cols[0] not in t.columns:
            raise LayoutError(f"{path}: expected columns attr1..attr{k} or b_attr1..b_attr{k}")
    t.require(["scenario"] + cols)
    w = t.numeric(cols)
    t.count_duplicates(findings)
    keep = t.unique_by("scenario", cols)
    ids = t.text("scenario")
    return {str(ids[i]): w[i] for i in keep}


def write_weights(path: Path, weights: dict[str, np.ndarray], prefix: str = "b_attr") -> None:
    """Write weights per scenario as a CSV (``scenario, <prefix>1..k``), rounded to integers."""
    k = len(next(iter(weights.values())))
    df = pd.DataFrame([[s, *np.round(w).astype(int)] for s, w in weights.items()],
                      columns=["scenario"] + [f"{prefix}{j}" for j in range(1, k + 1)])
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
