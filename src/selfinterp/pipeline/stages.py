"""The protocol's stages: what each one does, what it needs, the settings that key it, and the
work it declares for the dry run (:mod:`selfinterp.pipeline.plan`). ``STAGES`` is the one list.

Stages, in order (each writes its artifacts into the run directory):

 1. design              scenarios (instilled, native), roles, weights, fine-tuning datasets
 2. instill             fine-tune the base model on the preference examples
 3. validate            held-out choices of the instilled model; a gate on instillation
 4. reports_base        the base model's self-reports on the instilled scenarios (control)
 5. reports_instilled   the instilled model's self-reports
 6. itrain_first/last/all   introspection training of the instilled model on each half, and all
 7. reports_itrained_first/last   each fold's reports on the half it did not train on
 8. native_choices      the instilled model's choices on native scenarios -> native weights
 9. reports_native_instilled / reports_native_itrained   reports on native scenarios
10. itrain_control_* / reports_control_*   the cross-model control (``cross_model_control``)
11. analysis            the paper's table (selfinterp.analysis) -> analysis/results.json, figures
12. report              report.html
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np

from .. import analysis, design, layout, stats
from ..config import RunConfig
from ..journal import atomic_write_json
from ..scenarios import Scenario
from . import measure

if TYPE_CHECKING:  # for annotations only
    from .runner import Run


class GateFailed(RuntimeError):
    """Instillation did not reach the configured thresholds."""


def _none(cfg: RunConfig) -> int:
    return 0


def _instilled(cfg: RunConfig) -> int:
    return cfg.n_instilled


def _first(cfg: RunConfig) -> int:  # design.halves: the first half takes the odd one
    return (cfg.n_instilled + 1) // 2


def _second(cfg: RunConfig) -> int:
    return cfg.n_instilled - _first(cfg)


def _native(cfg: RunConfig) -> int:
    return cfg.n_native


@dataclass(frozen=True)
class Stage:
    """One stage of the protocol: its name, title, needs, the settings it reads, what runs it,
    and its work for the dry run: ``work`` ("choices", "native_choices", "reports", "instill",
    "introspection" or "") on ``on(cfg)`` scenarios."""

    name: str
    title: str
    needs: tuple[str, ...]
    fields: tuple[str, ...]  # the RunConfig fields the stage reads
    fn: Callable[["Run"], dict[str, Any]]
    native: bool = False     # only when the run has native scenarios
    control: bool = False    # only with cross_model_control
    work: Literal["", "choices", "native_choices", "reports", "instill", "introspection"] = ""
    on: Callable[[RunConfig], int] = _none

    def model_calls(self, cfg: RunConfig) -> int:
        """How many model calls the stage makes (choices or reports)."""
        ecb = 2 if cfg.eval_counterbalance else 1
        per = {"choices": cfg.n_eval_trials * ecb, "native_choices": cfg.n_native_trials * ecb,
               "reports": cfg.n_reports}.get(self.work, 0)
        return self.on(cfg) * per

    def training_examples(self, cfg: RunConfig) -> int:
        """How many examples the stage trains on (one epoch)."""
        per = {"instill": cfg.n_train * (2 if cfg.counterbalance else 1),
               "introspection": cfg.n_introspection}.get(self.work, 0)
        return self.on(cfg) * per

    def train_settings(self, cfg: RunConfig):
        """The settings block the stage trains with (``cfg.instill`` / ``cfg.introspection``), or None."""
        return getattr(cfg, self.work) if self.work in ("instill", "introspection") else None


# --------------------------------------------------------------------------------------------
# Stage functions


def stage_design(run: Run) -> dict:
    """Stage design: scenarios, weights -> datasets/, instilled_weights.csv, scenarios.json, design.json."""
    cfg = run.cfg
    instilled, native = design.choose_scenarios(cfg.scenarios, cfg.n_instilled, cfg.n_native, cfg.seed)
    weights = {s.id: design.draw_weights(s, cfg.seed) for s in instilled}
    first, second = design.halves(instilled)
    ds = run.path("datasets")
    counts = {
        "instill_train.jsonl": design.write_jsonl(ds / "instill_train.jsonl", design.instillation_examples(
            instilled, weights, cfg.n_train, cfg.seed, "instill-train", cfg.counterbalance,
            label_temperature=cfg.instill.label_temperature if cfg.instill.labels == "soft" else None,
            attribute_targets=cfg.instill.attribute_loss > 0)),
        "instill_val.jsonl": design.write_jsonl(ds / "instill_val.jsonl", design.instillation_examples(
            instilled, weights, cfg.n_val, cfg.seed, "instill-val", cfg.counterbalance)),
    }
    for name, part in (("all", instilled), ("first_half", first), ("second_half", second)):
        f = f"introspection_{name}.jsonl"
        counts[f] = design.write_jsonl(ds / f, design.introspection_examples(part, weights, cfg.n_introspection, cfg.seed))
    for f in counts:
        run.output(ds / f)
    design.write_weights_csv(run.path("instilled_weights.csv"), instilled, weights)
    atomic_write_json(run.path("scenarios.json"), [s.to_dict() for s in instilled + native])
    atomic_write_json(run.path("design.json"), {
        "instilled": [s.to_dict() for s in instilled], "native": [s.to_dict() for s in native],
        "weights": {k: v.tolist() for k, v in weights.items()},
        "halves": {"first": [s.id for s in first], "second": [s.id for s in second]}})
    for f in ("instilled_weights.csv", "scenarios.json", "design.json"):
        run.output(run.path(f))
    run._design = None
    return {"n_instilled": len(instilled), "n_native": len(native), "datasets": counts}


def _learned(run: Run) -> dict[str, np.ndarray]:
    """The instilled model's learned weights (from the validate stage's choices)."""
    k = run.k
    ranges = layout.read_ranges(run.path("scenarios.json"), k)
    return analysis.learn(layout.read_choices(run.path(f"{run.label}_instilled_selections.csv"), k), ranges).weights


def _inner_split(run: Run, scenarios: list[Scenario]) -> tuple[list[Scenario], list[Scenario]]:
    """introspection_stop 'inner_r': (inner training, inner validation) scenarios of a training fold,
    a seeded choice of inner_fraction of them (at least one) for validation."""
    k = max(1, round(run.cfg.inner_fraction * len(scenarios)))
    if len(scenarios) - k < 1:
        raise ValueError(f"introspection_stop 'inner_r': a fold of {len(scenarios)} scenario(s) cannot spare "
                         f"{k} for the inner split; use more instilled scenarios")
    pick = set(random.Random(f"{run.cfg.seed}:inner:{scenarios[0].id}").sample([s.id for s in scenarios], k))
    return [s for s in scenarios if s.id not in pick], [s for s in scenarios if s.id in pick]


def _introspection_data(run: Run, name: str, trained: list[Scenario]) -> tuple[str, list[Scenario], list[Scenario]]:
    """The fold's training file, and its (trained, inner) scenarios: with introspection_stop
    'inner_r' the inner scenarios' examples are left out (a file of their own under datasets/)."""
    if run.cfg.introspection_stop != "inner_r":
        return name, trained, []
    fit, inner = _inner_split(run, trained)
    sub = name.replace(".jsonl", ".inner_train.jsonl")
    rows = design.introspection_examples(fit, run.design["weights"], run.cfg.n_introspection, run.cfg.seed)
    design.write_jsonl(run.path("datasets", sub), rows)
    run.output(run.path("datasets", sub))
    return sub, fit, inner


def _fold_curves(run: Run, trained: list[Scenario], heldout: list[Scenario], inner: list[Scenario]) -> dict | None:
    if not (run.cfg.report_curves or inner):
        return None
    learned = _learned(run)
    sets = {"trained": (trained, learned), "heldout": (heldout, learned)}
    if inner:
        sets["inner"] = (inner, learned)
    return sets


def stage_instill(run: Run) -> dict:
    """Stage instill: fine-tune the base model on the preference examples into models/instilled."""
    curves = {"instilled": (run.design["instilled"], run.design["weights"])} if run.cfg.report_curves else None
    return run.train("instilled", "base", "instill_train.jsonl",
                     "instill_val.jsonl" if run.cfg.n_val else None, run.cfg.instill, curves)


def stage_validate(run: Run) -> dict:
    """Stage validate: held-out choices of the instilled model (selections CSV); the instillation gate."""
    cfg, d = run.cfg, run.design
    c = measure.choices(run, "instilled", d["instilled"], cfg.n_eval_trials, "eval", cfg.eval_counterbalance,
                            f"{run.label}_instilled_selections.csv")
    m, items, p_a = c.summary(), c.items, c.p_a
    truth = np.array([design.simulated_choice(s, d["weights"][s.id], p) == "A" for _, s, p in items])
    agreement = float(np.mean((p_a >= 0.5) == truth))
    k = run.k
    ranges = layout.read_ranges(run.path("scenarios.json"), k)
    learned = analysis.learn(layout.read_choices(run.path(m["file"]), k), ranges)
    ids = [s for s in learned.weights if s in d["weights"]]
    r = stats.pearson(np.array([learned.weights[s] for s in ids]), np.array([d["weights"][s] for s in ids])) \
        if len(ids) >= 2 else float("nan")
    m.update({"agreement": agreement, "learned_vs_instilled_r": r, "n_identified": len(ids),
              "not_identified": learned.flags})
    run.console.print(f"  held-out agreement with the instilled choices {agreement:.3f}, learned-vs-instilled "
                      f"r {r:.3f} over {len(ids)} scenarios; answers A {m['a_rate']:.2f}, P(A)+P(B) {m['mean_mass']:.2f}")
    # A NaN r (fewer than 2 scenarios with identified weights) fails the gate: nothing was shown to be learned.
    ok = not cfg.gate.enabled or (agreement >= cfg.gate.min_agreement and bool(r >= cfg.gate.min_r))
    m["gate"] = {"enabled": cfg.gate.enabled, "passed": bool(ok), "min_agreement": cfg.gate.min_agreement,
                 "min_r": cfg.gate.min_r, "forced": bool(not ok and run.force)}
    if not ok and not run.force:
        atomic_write_json(run.path("stages", "validate.failed.json"), m)
        raise GateFailed(
            f"instillation did not take: held-out agreement {agreement:.3f} (gate {cfg.gate.min_agreement}), "
            f"learned-vs-instilled r {r:.3f} (gate {cfg.gate.min_r}; {len(ids)} of {len(d['instilled'])} scenarios "
            f"had identified weights), answering A {m['a_rate']:.0%} of the time. "
            "Try more examples per scenario (n_train), more epochs or a higher learning rate (instill.*), more "
            "trained layers, or counterbalance = true; see benchmarks/instill_cpu.md. Re-run with --force to "
            "continue anyway.")
    return m


def _reports(run: Run, which: str, scenarios: list[Scenario], version: str, out_name: str) -> dict:
    return measure.reports(run, which, scenarios, version, out_name).summary()


def stage_reports_base(run: Run) -> dict:
    """Stage reports_base: the base model's self-reports (control) -> <label>_weight_reports.csv."""
    return _reports(run, "base", run.design["instilled"], "base", f"{run.label}_weight_reports.csv")


def stage_reports_instilled(run: Run) -> dict:
    """Stage reports_instilled: the instilled model's self-reports -> its weight reports CSV."""
    return _reports(run, "instilled", run.design["instilled"], "instilled",
                               f"{run.label}_instilled_weight_reports.csv")


def _halves(run: Run) -> tuple[list[Scenario], list[Scenario]]:
    return design.halves(run.design["instilled"])


def _train_on_fold(run: Run, which: str, base: str, fold: str) -> dict:
    """Introspection training of ``base`` on the first half, the second half or all instilled
    scenarios (``fold``), with the report curves and the inner split the run asks for."""
    first, second = _halves(run)
    trained, heldout, data = {"first": (first, second, "introspection_first_half.jsonl"),
                              "last": (second, first, "introspection_second_half.jsonl"),
                              "all": (run.design["instilled"], [], "introspection_all.jsonl")}[fold]
    data, fit, inner = _introspection_data(run, data, trained)
    curves = _fold_curves(run, fit, heldout, inner)
    if curves and not heldout:  # all: native scenarios' learned weights come later (native_choices)
        curves.pop("heldout")
    return run.train(which, base, data, None, run.cfg.introspection, curves)


def stage_itrain_first(run: Run) -> dict:
    """Stage itrain_first: introspection training on the first half -> models/itrained_first."""
    return _train_on_fold(run, "itrained_first", "instilled", "first")


def stage_itrain_last(run: Run) -> dict:
    """Stage itrain_last: introspection training on the second half -> models/itrained_last."""
    return _train_on_fold(run, "itrained_last", "instilled", "last")


def stage_itrain_all(run: Run) -> dict:
    """Stage itrain_all: introspection training on every instilled scenario -> models/itrained_all."""
    return _train_on_fold(run, "itrained_all", "instilled", "all")


def _fold_name(run: Run, which: str) -> str:
    first, _ = _halves(run)
    n = len(run.design["instilled"])
    return f"{run.label}_itrained_{which}_{len(first) if which == 'first' else n - len(first)}_of_{n}_weight_reports.csv"


def stage_reports_itrained_first(run: Run) -> dict:
    """Stage reports_itrained_first: reports on the second half after training on the first -> CSV."""
    _, second = _halves(run)
    return _reports(run, "itrained_first", second, "itrained_first", _fold_name(run, "first"))


def stage_reports_itrained_last(run: Run) -> dict:
    """Stage reports_itrained_last: reports on the first half after training on the second -> CSV."""
    first, _ = _halves(run)
    return _reports(run, "itrained_last", first, "itrained_last", _fold_name(run, "last"))


def stage_native_choices(run: Run) -> dict:
    """Stage native_choices: the instilled model's choices on native scenarios -> latent selections CSV."""
    cfg = run.cfg
    return measure.choices(run, "instilled", run.design["native"], cfg.n_native_trials, "native", cfg.eval_counterbalance,
                               f"{run.label}_instilled_latent_selections.csv").summary()


def stage_reports_native_instilled(run: Run) -> dict:
    """Stage reports_native_instilled: the instilled model's reports on native scenarios -> CSV."""
    return _reports(run, "instilled", run.design["native"], "instilled_latent",
                               f"{run.label}_instilled_latent_weight_reports.csv")


def stage_reports_native_itrained(run: Run) -> dict:
    """Stage reports_native_itrained: reports on native scenarios after training on all -> CSV."""
    n = len(run.design["instilled"])
    return _reports(run, "itrained_all", run.design["native"], "itrained_all_latent",
                               f"{run.label}_itrained_all_{n}_latent_weight_reports.csv")


# The cross-model control: the base model (never instilled) given the same introspection training
# on the same fold and asked about the same held-out scenarios; its reports are compared with the
# *instilled* model's learned weights. If it does as well, the reports follow the scenario text,
# not the reporting model's own weights.

# With introspection_stop 'inner_r' the control is stopped by the same rule (its inner-split reports
# against the instilled model's learned weights).

def stage_itrain_control_first(run: Run) -> dict:
    """Stage itrain_control_first: the base model's introspection training on the first half."""
    return _train_on_fold(run, "control_first", "base", "first")


def stage_itrain_control_last(run: Run) -> dict:
    """Stage itrain_control_last: the base model's introspection training on the second half."""
    return _train_on_fold(run, "control_last", "base", "last")


def stage_itrain_control_all(run: Run) -> dict:
    """Stage itrain_control_all: the base model's introspection training on every instilled scenario."""
    return _train_on_fold(run, "control_all", "base", "all")


def stage_reports_control_first(run: Run) -> dict:
    """Stage reports_control_first: the control's reports on the second half -> CSV."""
    _, second = _halves(run)
    return _reports(run, "control_first", second, "control_itrained_first",
                               _fold_name(run, "first").replace("_itrained_", "_control_itrained_", 1))


def stage_reports_control_last(run: Run) -> dict:
    """Stage reports_control_last: the control's reports on the first half -> CSV."""
    first, _ = _halves(run)
    return _reports(run, "control_last", first, "control_itrained_last",
                               _fold_name(run, "last").replace("_itrained_", "_control_itrained_", 1))


def stage_reports_control_native(run: Run) -> dict:
    """Stage reports_control_native: the control's reports on native scenarios -> CSV."""
    n = len(run.design["instilled"])
    return _reports(run, "control_all", run.design["native"], "control_itrained_all_latent",
                               f"{run.label}_control_itrained_all_{n}_latent_weight_reports.csv")


def stage_analysis(run: Run) -> dict:
    """Stage analysis: the paper's table -> analysis/results.json, with the figures beside it."""
    from ..figures import write_all

    a = analysis.analyze(run.root, seed=run.cfg.seed)
    out = run.path("analysis")
    results = analysis.to_json(a)
    atomic_write_json(out / "results.json", results)
    run.output(out / "results.json")
    for p in write_all(a, out):
        run.output(p)
    return {"conditions": sorted(results["models"].get(run.label, {}))}


def stage_report(run: Run) -> dict:
    """Stage report: the run's report.html."""
    from ..report import write_report

    path = write_report(run)
    run.output(path)
    return {"file": path.name}


_ALL = ("backend", "model", "seed")
_DESIGN = ("scenarios", "seed", "n_instilled", "n_native", "n_train", "n_val", "counterbalance", "n_introspection",
           "instill.labels", "instill.attribute_loss")
_REPORTS = ("n_reports", "report_mode", "report_max_new_tokens", "report_temperature")
_MODEL_BACKEND = ("backend", "model", "simulated", "trainer", "openai", "vllm")  # what training reads
_INFER = _MODEL_BACKEND + ("batch_size",)  # and what measuring reads (batch_size: see RunConfig.hash_fields)

# introspection_stop / inner_fraction: absent from the keys when "end" (RunConfig.hash_fields). With
# "inner_r" a training stage also reads the validate stage's choices (learned weights), which follow
# from instill's output, its declared need.
_INTROSPECTION = _MODEL_BACKEND + ("introspection", "introspection_stop", "inner_fraction")

STAGES: list[Stage] = [
    Stage("design", "scenarios, weights and fine-tuning datasets", (), _DESIGN, stage_design),
    Stage("instill", "fine-tune the base model on the preference examples", ("design",),
          _MODEL_BACKEND + ("instill",), stage_instill, work="instill", on=_instilled),
    Stage("validate", "held-out choices of the instilled model; the instillation gate", ("instill",),
          _INFER + ("n_eval_trials", "eval_counterbalance", "soft_targets", "gate"), stage_validate,
          work="choices", on=_instilled),
    Stage("reports_base", "the base model's self-reports (control)", ("design",), _INFER + _REPORTS,
          stage_reports_base, work="reports", on=_instilled),
    Stage("reports_instilled", "the instilled model's self-reports", ("validate",), _INFER + _REPORTS,
          stage_reports_instilled, work="reports", on=_instilled),
    Stage("itrain_first", "introspection training on the first half", ("instill",), _INTROSPECTION,
          stage_itrain_first, work="introspection", on=_first),
    Stage("itrain_last", "introspection training on the second half", ("instill",), _INTROSPECTION,
          stage_itrain_last, work="introspection", on=_second),
    Stage("itrain_all", "introspection training on every instilled scenario", ("instill",),
          _INTROSPECTION, stage_itrain_all, native=True, work="introspection", on=_instilled),
    Stage("reports_itrained_first", "reports on the second half after training on the first", ("itrain_first",),
          _INFER + _REPORTS, stage_reports_itrained_first, work="reports", on=_second),
    Stage("reports_itrained_last", "reports on the first half after training on the second", ("itrain_last",),
          _INFER + _REPORTS, stage_reports_itrained_last, work="reports", on=_first),
    Stage("native_choices", "the instilled model's choices on native scenarios", ("validate",),
          _INFER + ("n_native_trials", "eval_counterbalance", "soft_targets"), stage_native_choices, native=True,
          work="native_choices", on=_native),
    Stage("reports_native_instilled", "the instilled model's reports on native scenarios", ("validate",),
          _INFER + _REPORTS, stage_reports_native_instilled, native=True, work="reports", on=_native),
    Stage("reports_native_itrained", "reports on native scenarios after training on all", ("itrain_all",),
          _INFER + _REPORTS, stage_reports_native_itrained, native=True, work="reports", on=_native),
    Stage("itrain_control_first", "control: the base model given introspection training on the first half",
          ("design",), _INTROSPECTION, stage_itrain_control_first, control=True, work="introspection", on=_first),
    Stage("itrain_control_last", "control: the base model given introspection training on the second half",
          ("design",), _INTROSPECTION, stage_itrain_control_last, control=True, work="introspection", on=_second),
    Stage("itrain_control_all", "control: the base model given introspection training on every instilled scenario",
          ("design",), _INTROSPECTION, stage_itrain_control_all, native=True, control=True,
          work="introspection", on=_instilled),
    Stage("reports_control_first", "control: its reports on the second half", ("itrain_control_first",),
          _INFER + _REPORTS, stage_reports_control_first, control=True, work="reports", on=_second),
    Stage("reports_control_last", "control: its reports on the first half", ("itrain_control_last",),
          _INFER + _REPORTS, stage_reports_control_last, control=True, work="reports", on=_first),
    Stage("reports_control_native", "control: its reports on native scenarios", ("itrain_control_all",),
          _INFER + _REPORTS, stage_reports_control_native, native=True, control=True, work="reports", on=_native),
    Stage("analysis", "the paper's table, figures", (
        "validate", "reports_base", "reports_instilled", "reports_itrained_first", "reports_itrained_last",
        "native_choices", "reports_native_instilled", "reports_native_itrained", "reports_control_first",
        "reports_control_last", "reports_control_native"), ("seed",), stage_analysis),
    Stage("report", "report.html", ("analysis",), ("name",), stage_report),
]


