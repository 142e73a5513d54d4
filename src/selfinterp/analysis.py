"""Stage 6 of the protocol: from choices and self-reports to the paper's table.

For each model found in a results directory (the paper's layout, see :mod:`selfinterp.layout`):

1. learned weights: refit from the model's choices (:mod:`selfinterp.regression`), on the
   instilled scenarios and on the native ones; the authors' ``regression_results`` are used
   only when the choices are absent, and compared with the refit when both are there;
2. per condition, r between the per-scenario mean report and the weights it should match,
   with a bootstrap CI over scenarios (:mod:`selfinterp.stats`);
3. the introspection-training effect: the trained model's held-out r minus the instilled
   model's r on the same scenarios (paired bootstrap).

The result is a plain dataclass tree; :func:`to_json` gives the stable ``results.json`` schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import layout, regression, stats
from .scenarios import DEFAULT_K


@dataclass(frozen=True)
class Condition:
    """One row of the paper's table: which reports are compared with which weights."""

    name: str
    label: str
    reports: tuple[str, ...]  # kinds of report file; two kinds = held-out halves pooled
    weights: str              # "learned", "native_learned" or "instilled"


CONDITIONS: list[Condition] = [
    Condition("instillation", "learned vs instilled weights", (), "instilled"),
    Condition("base_reports", "base model's reports (control)", ("base_reports",), "learned"),
    Condition("instilled_reports", "instilled model's reports", ("instilled_reports",), "learned"),
    Condition("itrained_heldout", "after introspection training, held-out halves pooled",
              ("itrained_first_reports", "itrained_last_reports"), "learned"),
    Condition("itrained_first_half_trained", "trained on first half, reporting on second",
              ("itrained_first_reports",), "learned"),
    Condition("itrained_second_half_trained", "trained on second half, reporting on first",
              ("itrained_last_reports",), "learned"),
    Condition("native_instilled_reports", "native preferences: instilled model's reports",
              ("native_instilled_reports",), "native_learned"),
    Condition("native_itrained_reports", "native preferences: after training on all",
              ("native_itrained_reports",), "native_learned"),
    # The cross-model control: the never-instilled base model, given the same introspection
    # training, reporting on the same scenarios, against the instilled model's learned weights.
    Condition("control_itrained_heldout", "control: base model after the same training, held-out halves pooled",
              ("control_first_reports", "control_last_reports"), "learned"),
    Condition("control_native_itrained", "control: base model after training on all, native scenarios",
              ("control_native_reports",), "native_learned"),
]

#: The training effects: (name, baseline condition, trained condition).
EFFECTS = [
    ("itrained_effect", "instilled_reports", "itrained_heldout"),
    ("native_itrained_effect", "native_instilled_reports", "native_itrained_reports"),
    # Positive: the trained model's reports track its own weights better than the same training
    # gives a model that never held them.
    ("itrained_over_control", "control_itrained_heldout", "itrained_heldout"),
    ("native_itrained_over_control", "control_native_itrained", "native_itrained_reports"),
]


@dataclass
class ConditionResult:
    """One condition's result for one model: r with its CI, counts, statistics and the arrays behind them."""

    r: float
    ci: tuple[float, float]
    n_scenarios: int
    n_reports: int
    sign_agreement: float
    reliability: float | None = None   # split-half reliability of the mean reports
    noise_ceiling: float | None = None  # sqrt(reliability): the r perfect weights could reach
    n_choices: int | None = None        # for "instillation": the choices behind the learned weights
    p_permutation: float | None = None  # one-sided p of r against reports paired with other scenarios
    null_quantiles: tuple[float, float, float] | None = None  # 2.5 / 50 / 97.5% of that null's r
    # Kept for figures, not written to results.json:
    x: np.ndarray | None = field(default=None, repr=False)  # (S, k) mean reports or learned weights
    y: np.ndarray | None = field(default=None, repr=False)  # (S, k) the weights compared with
    scenarios: list[str] | None = field(default=None, repr=False)


@dataclass
class ModelResult:
    """One model's results: its conditions' results, the training effects and diagnostics."""

    conditions: dict[str, ConditionResult] = field(default_factory=dict)
    effects: dict[str, stats.Difference] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)


@dataclass
class Analysis:
    """The paper's table for every model of a results directory, with the notes to print."""

    root: Path
    models: dict[str, ModelResult]
    n_boot: int
    seed: int
    notes: list[str] = field(default_factory=list)  # kept but counted, skipped, substituted: printed


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Learned:
    """Learned weights per identified scenario, the scenarios not identified and why, and their source."""

    weights: dict[str, np.ndarray]  # identified scenarios only
    flags: dict[str, str]           # scenarios whose fit was not identified -> why
    n_choices: int
    source: str


def learn(choices: layout.Choices, ranges: layout.Ranges) -> Learned:
    """Refit every scenario's weights from its choices, in one vectorised fit."""
    ids = list(dict.fromkeys(choices.scenario))  # first-seen order
    unknown = [s for s in ids if s not in ranges.lo]
    if unknown:
        raise layout.LayoutError(f"choices name {len(unknown)} scenario(s) not in the scenario file: "
                                 f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")
    groups = []
    for s in ids:
        rows = choices.scenario == s
        diff = ranges.normalise(s, choices.a[rows]) - ranges.normalise(s, choices.b[rows])
        groups.append((diff, choices.target[rows]))
    fit = regression.fit_preferences(*regression.pad(groups))
    weights = {s: fit.weights[i] for i, s in enumerate(ids) if fit.flags[i] == ""}
    flags = {s: str(fit.flags[i]) for i, s in enumerate(ids) if fit.flags[i] != ""}
    return Learned(weights, flags, len(choices.target), "refit from choices")


def _reports_by_scenario(reports: layout.Reports) -> dict[str, np.ndarray]:
    """scenario -> (n_reports, k) individual reports."""
    return {s: reports.weights[reports.scenario == s] for s in dict.fromkeys(reports.scenario)}


def _learned_weights(d: layout.Directory, model: str, ranges: layout.Ranges | None, scenarios_note: str,
                     choices_kind: str, regression_kind: str, read: "_Reader", diag: dict,
                     key: str) -> dict[str, np.ndarray] | None:
    files = d.files[model]
    authors = read(layout.read_weights, files.get(regression_kind))
    choices = read(layout.read_choices, files.get(choices_kind))
    if choices is not None and ranges is not None:
        try:
            learned = learn(choices, ranges)
        except layout.LayoutError as e:
            raise layout.LayoutError(f"{files[choices_kind]}: {e}") from None
        diag[key] = {"source": learned.source, "n_choices": learned.n_choices,
                     "n_scenarios": len(learned.weights), "not_identified": learned.flags}
        if authors is not None:
            common = [s for s in learned.weights if s in authors]
            if len(common) >= 2:
                diag[key]["r_with_authors_regression"] = stats.pearson(
                    np.array([learned.weights[s] for s in common]), np.array([authors[s] for s in common]))
        return learned.weights
    if authors is not None:
        why = scenarios_note if choices is not None else "no choices to refit from"
        diag[key] = {"source": f"{files[regression_kind].name} ({why})", "n_scenarios": len(authors)}
        read.note(f"{model}: {key.replace('_', ' ')} taken from the authors' {files[regression_kind].name} "
                  f"({why})")
        return authors
    if choices is not None:
        read.note(f"{model}: {files[choices_kind].name} not used ({scenarios_note}); the conditions that need "
                  f"{key.replace('_', ' ')} are left out")
    return None


class _Reader:
    """Reads a directory's files under one :class:`layout.Findings`; a file with no rows is noted
    and read as absent. ``notes`` are the lines the console prints: what was skipped, dropped or
    substituted, and what was kept but counted."""

    def __init__(self, strict: bool, k: int = DEFAULT_K):
        self.findings = layout.Findings(strict=strict)
        self.k = k  # attributes per scenario
        self.skipped: list[str] = []

    def __call__(self, read, path: Path | None, *args):
        if path is None:
            return None
        try:
            return read(path, self.k, self.findings, *args)
        except layout.EmptyFile as e:
            self.skipped.append(f"{e}: skipped, with what needs it")
            return None

    def note(self, message: str) -> None:
        self.skipped.append(message)

    @property
    def notes(self) -> list[str]:
        return self.findings.kept + self.skipped


def analyze_model(d: layout.Directory, model: str, n_boot: int = stats.N_BOOT, seed: int = 0,
                  read: _Reader | None = None) -> ModelResult:
    """One model's conditions and training effects, from the files of a scanned results directory."""
    read = read or _Reader(strict=False, k=d.k)
    files = d.files[model]
    result = ModelResult()
    diag = result.diagnostics
    ranges = read(layout.read_ranges, d.scenarios)
    scenarios_note = ("no scenarios.csv or scenarios.json to refit the choices with" if d.scenarios is None
                      else f"{d.scenarios.name} has no rows to refit the choices with")
    if ranges is None and ("selections" in files or "native_selections" in files):
        diag["warning"] = f"{d.root}: {scenarios_note}: choices cannot be refitted"
    weight_sets = {
        "learned": _learned_weights(d, model, ranges, scenarios_note, "selections", "regression", read, diag,
                                    "learned_weights"),
        "native_learned": _learned_weights(d, model, ranges, scenarios_note, "native_selections",
                                           "native_regression", read, diag, "native_learned_weights"),
        "instilled": read(layout.read_weights, d.instilled_weights),
    }
    reports = {kind: r for kind in files if kind.endswith("_reports")
               if (r := read(layout.read_reports, files[kind])) is not None}
    diag["reports"] = {kind: {"file": files[kind].name, "n_reports": len(r.weights), "n_outside_scale": r.n_outside}
                       for kind, r in reports.items()}

    for cond in CONDITIONS:
        target = weight_sets[cond.weights]
        if target is None:
            continue
        if cond.name == "instillation":
            learned = weight_sets["learned"]
            if learned is None:
                continue
            ids = [s for s in learned if s in target]
            x = np.array([learned[s] for s in ids])
            y = np.array([target[s] for s in ids])
            if len(ids) < 2:
                read.note(f"{model}: {cond.name} left out: {len(ids)} scenario(s) with both learned and "
                          "instilled weights (at least 2 needed)")
                continue
            c = stats.correlate(x, y, n_boot=n_boot, seed=seed)
            perm = stats.permutation_test(x, y, n_perm=n_boot, seed=seed)
            result.conditions[cond.name] = ConditionResult(
                c.r, c.ci, c.n_scenarios, 0, c.sign_agreement,
                n_choices=diag.get("learned_weights", {}).get("n_choices"), **_null(perm), x=x, y=y, scenarios=ids)
            continue
        if not all(kind in reports for kind in cond.reports):
            continue
        rows, strata, skipped = [], [], []
        for g, kind in enumerate(cond.reports):
            per_scenario = _reports_by_scenario(reports[kind])
            for s, reps in per_scenario.items():
                if s in target:
                    rows.append((s, reps))
                    strata.append(g)
                else:
                    skipped.append(s)
        if skipped:
            diag.setdefault("reports_without_weights", {})[cond.name] = sorted(set(skipped))
            names = sorted(set(skipped))
            read.note(f"{model}: {cond.name}: reports on {len(names)} scenario(s) without "
                      f"{cond.weights.replace('_', ' ')} weights left out ({', '.join(names[:5])}"
                      f"{', ...' if len(names) > 5 else ''})")
        if len(rows) < 2:
            read.note(f"{model}: {cond.name} left out: {len(rows)} scenario(s) with both reports and "
                      f"{cond.weights.replace('_', ' ')} weights (at least 2 needed)")
            continue
        x = np.array([reps.mean(axis=0) for _, reps in rows])
        y = np.array([target[s] for s, _ in rows])
        pooled = len(cond.reports) > 1
        c = stats.correlate(x, y, np.array(strata) if pooled else None, n_boot=n_boot, seed=seed)
        perm = stats.permutation_test(x, y, np.array(strata) if pooled else None, n_perm=n_boot, seed=seed)
        rel = stats.split_half_reliability([reps for _, reps in rows], seed=seed)
        rel_out = None if np.isnan(rel) else rel
        result.conditions[cond.name] = ConditionResult(
            c.r, c.ci, c.n_scenarios, int(sum(len(reps) for _, reps in rows)), c.sign_agreement,
            reliability=rel_out, noise_ceiling=None if rel_out is None else float(np.sqrt(max(rel_out, 0.0))),
            **_null(perm),
            x=stats.pooled_zscored([x[np.array(strata) == g] for g in range(len(cond.reports))]) if pooled else x,
            y=stats.pooled_zscored([y[np.array(strata) == g] for g in range(len(cond.reports))]) if pooled else y,
            scenarios=[s for s, _ in rows])

    for name, base, trained in EFFECTS:
        if base in result.conditions and trained in result.conditions:
            result.effects[name] = _effect(result, reports, weight_sets, base, trained, n_boot, seed)
    return result


def _null(perm: stats.Permutation) -> dict:
    """A condition's permutation fields (None where r is undefined)."""
    if np.isnan(perm.p):
        return {}
    return {"p_permutation": perm.p, "null_quantiles": perm.null_quantiles}


def _effect(result: ModelResult, reports: dict, weight_sets: dict, base: str, trained: str,
            n_boot: int, seed: int) -> stats.Difference:
    """Trained minus baseline r on the scenarios both have, paired over scenarios (either side
    may pool held-out halves: then it is z-scored per half, as its condition is)."""
    cb = next(c for c in CONDITIONS if c.name == base)
    ct = next(c for c in CONDITIONS if c.name == trained)
    target = weight_sets[ct.weights]

    def rows(cond: Condition) -> dict[str, tuple[np.ndarray, int]]:
        return {s: (reps.mean(axis=0), g) for g, kind in enumerate(cond.reports)
                for s, reps in _reports_by_scenario(reports[kind]).items()}

    trained_rows, base_rows = rows(ct), rows(cb)
    ids = [s for s in trained_rows if s in base_rows and s in target]
    sa = np.array([base_rows[s][1] for s in ids]) if len(cb.reports) > 1 else None
    sb = np.array([trained_rows[s][1] for s in ids]) if len(ct.reports) > 1 else None
    return stats.compare(np.array([base_rows[s][0] for s in ids]), np.array([trained_rows[s][0] for s in ids]),
                         np.array([target[s] for s in ids]), sa, sb, n_boot=n_boot, seed=seed)


def analyze(root: str | Path, n_boot: int = stats.N_BOOT, seed: int = 0, strict: bool = False) -> Analysis:
    """The paper's table for every model in ``root``. Every cell is validated (:mod:`selfinterp.layout`);
    what was kept but counted, skipped or substituted is in ``Analysis.notes`` (the console prints
    them); ``strict`` refuses what would otherwise be kept and counted."""
    d = layout.scan(root)
    if not d.models:
        raise layout.LayoutError(
            f"{root}: no results files found (expected names like <model>_instilled_selections.csv "
            "or <model>_weight_reports.csv)")
    read = _Reader(strict, d.k)
    models = {m: analyze_model(d, m, n_boot, seed, read) for m in d.models}
    return Analysis(Path(root), models, n_boot, seed, list(dict.fromkeys(read.notes)))


def to_json(a: Analysis) -> dict:
    """The stable results schema: models -> condition -> {r, ci, n_scenarios, n_reports, ...}."""
    def cond(c: ConditionResult) -> dict:
        out = {"r": c.r, "ci": list(c.ci), "n_scenarios": c.n_scenarios, "n_reports": c.n_reports,
               "sign_agreement": c.sign_agreement}
        for key in ("reliability", "noise_ceiling", "n_choices", "p_permutation"):
            if getattr(c, key) is not None:
                out[key] = getattr(c, key)
        if c.null_quantiles is not None:
            out["null_quantiles"] = list(c.null_quantiles)
        return out

    return {
        "schema": "selfinterp.results/1",
        "source": str(a.root),
        "bootstrap": {"n_boot": a.n_boot, "seed": a.seed, "level": 0.95, "unit": "scenario"},
        "permutation": {"n_perm": a.n_boot, "seed": a.seed, "null": "report rows paired with other scenarios' "
                        "weights (within stratum)", "p": "one-sided, r >= observed"},
        "models": {m: {name: cond(c) for name, c in r.conditions.items()} for m, r in a.models.items()},
        "effects": {m: {name: {"diff": e.diff, "ci": list(e.ci), "n_scenarios": e.n_scenarios}
                        for name, e in r.effects.items()} for m, r in a.models.items()},
        "diagnostics": {m: r.diagnostics for m, r in a.models.items()},
        "labels": {c.name: c.label for c in CONDITIONS},
        "notes": a.notes,
    }
