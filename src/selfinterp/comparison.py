"""Comparing runs: every condition's r with its CI across runs, and the settings that differ.

Each source (a run directory, or any directory in the paper's layout) is analysed afresh with
one bootstrap setting, so the CIs are comparable. A source with several models (the paper's
data: GPT-4o and GPT-4o-mini) gives one series per model. Settings come from each run's
``config.json``, flattened to dotted keys (``instill.lr``); a directory without one (the
paper's) has none, and only keys whose values differ between the runs that have them are listed.

``selfinterp compare RUN... --out DIR`` writes ``comparison.md`` (both tables), ``comparison.csv``
(one row per run, model and condition or effect), ``settings.csv`` and ``comparison.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .results import Results, analyze
from .journal import atomic_write
from .layout import LayoutError


@dataclass(frozen=True)
class Source:
    """One compared directory: its label, its analysed results and its flattened settings."""

    label: str
    results: Results
    settings: dict[str, Any] | None  # flattened config.json; None when the directory has none

    def series(self, model: str) -> str:
        """The series name of ``model``: the source's label, with the model's name when it has several."""
        return self.label if len(self.results.models) == 1 else f"{self.label}: {model}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level with dotted keys (``instill.lr``); lists as JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def read_settings(root: Path) -> dict[str, Any] | None:
    """The directory's ``config.json`` flattened to dotted keys; None when it has none."""
    p = root / "config.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"{p}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise LayoutError(f"{p}: expected a JSON object of settings")
    return flatten(data)


def labels(paths: list[Path]) -> list[str]:
    """Each directory's name; the paths as given where names repeat."""
    from .paperdata import cache_dir

    paper = cache_dir().resolve()
    names = ["paper" if p.resolve() == paper else p.resolve().name for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


@dataclass(frozen=True)
class Comparison:
    """Analysed sources side by side: tables, settings that differ, a figure and files."""

    sources: tuple[Source, ...]

    def table(self) -> pd.DataFrame:
        """Long form: run, model, series, kind (condition / effect), name, r, CI, counts."""
        frames = []
        for s in self.sources:
            t = s.results.table().rename(columns={"condition": "name"})
            t.insert(0, "kind", "condition")
            e = s.results.effects().rename(columns={"effect": "name", "diff": "r"})
            e.insert(0, "kind", "effect")
            both = pd.concat([t, e.drop(columns=["baseline", "trained"])], ignore_index=True)
            both.insert(0, "series", [s.series(m) for m in both["model"]])
            both.insert(0, "run", s.label)
            frames.append(both)
        cols = ["run", "model", "series", "kind", "name", "label", "r", "ci_low", "ci_high", "n_scenarios", "n_reports"]
        out = pd.concat(frames, ignore_index=True)
        return out[cols + [c for c in out.columns if c not in cols]]

    def wide(self) -> pd.DataFrame:
        """One row per condition and effect, one column per series: "r [low, high]"."""
        t = self.table()
        cells = t.assign(cell=[_cell(r, lo, hi, k == "effect") for r, lo, hi, k in
                               zip(t["r"], t["ci_low"], t["ci_high"], t["kind"])])
        order = list(dict.fromkeys(t["name"]))
        w = cells.pivot_table(index="name", columns="series", values="cell", aggfunc="first", sort=False)
        return w.reindex(index=order, columns=list(dict.fromkeys(t["series"]))).fillna("")

    def settings(self) -> pd.DataFrame:
        """Settings whose values differ between the runs that have a config.json (rows), per run."""
        have = [s for s in self.sources if s.settings is not None]
        keys = list(dict.fromkeys(k for s in have for k in s.settings))
        differ = [k for k in keys if len({json.dumps(s.settings.get(k, "(unset)"), sort_keys=True) for s in have}) > 1]
        data = {s.label: [(_show(s.settings.get(k, "(unset)")) if s.settings is not None else "(no config.json)")
                          for k in differ] for s in self.sources}
        return pd.DataFrame(data, index=pd.Index(differ, name="setting"))

    def plot(self):
        """r with its 95% CI per condition, one series per source and model (a matplotlib Figure)."""
        from .figures import forest

        t = self.table()
        return forest(t[t["kind"] == "condition"].rename(columns={"name": "condition"}), "series",
                      title=f"{len(self.sources)} sources")

    def markdown(self) -> str:
        """The comparison as Markdown: the sources, the table of r and the settings that differ."""
        lines = [f"# Comparison of {len(self.sources)} sources", ""]
        for s in self.sources:
            cfg = "settings from config.json" if s.settings is not None else "no config.json"
            lines.append(f"- **{s.label}**: `{s.results.source}` ({', '.join(s.results.models)}; {cfg})")
        lines += ["", "## r with 95% CI (bootstrap over scenarios); effects: trained minus untrained r", ""]
        lines += _md_table(self.wide(), "condition")
        st = self.settings()
        lines += ["", "## Settings that differ", ""]
        if len(st):
            lines += _md_table(st, "setting")
        else:
            n = sum(s.settings is not None for s in self.sources)
            lines.append("None." if n >= 2 else f"Not comparable: {n} of the sources has a config.json.")
        return "\n".join(lines) + "\n"

    def write(self, out: str | Path) -> list[Path]:
        """Write comparison.md, comparison.csv, settings.csv and comparison.png into ``out``; their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "comparison.md", out / "comparison.csv", out / "settings.csv", out / "comparison.png"]
        atomic_write(paths[0], lambda p: p.write_text(self.markdown(), encoding="utf-8"))
        atomic_write(paths[1], lambda p: self.table().to_csv(p, index=False))
        atomic_write(paths[2], lambda p: self.settings().to_csv(p))
        fig = self.plot()
        atomic_write(paths[3], lambda p: fig.savefig(p, dpi=120, format="png"))
        return paths


def compare(paths: list[str | Path], paper: bool = False, n_boot: int = 2000, seed: int = 0) -> Comparison:
    """A comparison of the given directories (and, with ``paper``, the paper's data), analysed alike."""
    roots = [Path(p) for p in paths]
    if paper:
        from .paperdata import location

        roots.append(location())
    if not roots:
        raise ValueError("give at least one run or results directory (or paper=True)")
    sources = tuple(Source(label, analyze(root, n_boot=n_boot, seed=seed), read_settings(root))
                    for label, root in zip(labels(roots), roots))
    return Comparison(sources)


# --------------------------------------------------------------------------------------------


def _cell(r: float, lo: float, hi: float, signed: bool) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    g = "{:+.2f}" if signed else "{:.2f}"
    return f"{f.format(r)} [{g.format(lo)}, {g.format(hi)}]"


def _show(v: Any) -> str:
    return "null" if v is None else str(v)


def _md_table(df: pd.DataFrame, first: str) -> list[str]:
    def esc(x: Any) -> str:
        return str(x).replace("|", "\\|")

    head = [first] + [esc(c) for c in df.columns]
    rows = [f"| {' | '.join(head)} |", f"| {' | '.join('---' for _ in head)} |"]
    rows += [f"| {' | '.join([esc(i)] + [esc(v) for v in row])} |" for i, row in zip(df.index, df.itertuples(index=False))]
    return rows
