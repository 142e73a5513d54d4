"""Measuring a model: its choices on fresh pairs and its self-reports, written in the paper's CSV
layout (plus the raw replies), every model call journaled as it completes (a stage resumes
without repeating one); and report accuracy measured during training (``report_curves``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .. import design, prompts, stats
from ..journal import Journal, atomic_write_text
from ..report_parser import parse_report
from ..scenarios import Scenario

if TYPE_CHECKING:  # for annotations only
    from .runner import Run


@dataclass(frozen=True)
class ChoiceMeasurement:
    """A model's choices in one stage: the items shown (key, scenario, pair), P(A) and the
    P(A) + P(B) mass per item, and the selections CSV written."""

    file: str
    items: list[tuple[str, Scenario, design.Pair]]
    p_a: np.ndarray
    mass: np.ndarray

    def summary(self) -> dict:
        """The stage's recorded result (JSON-ready)."""
        return {"file": self.file, "n_choices": len(self.items), "a_rate": float(np.mean(self.p_a >= 0.5)),
                "mean_p_a": float(self.p_a.mean()), "mean_mass": float(self.mass.mean()),
                "min_mass": float(self.mass.min())}


@dataclass(frozen=True)
class ReportMeasurement:
    """A model's self-reports in one stage: the reports CSV written, the report mode, how many
    reports were asked for and parsed, and the rejected ones counted by reason."""

    file: str
    mode: str
    n_reports: int
    n_parsed: int
    rejected: dict[str, int]

    def summary(self) -> dict:
        """The stage's recorded result (JSON-ready)."""
        return {"file": self.file, "mode": self.mode, "n_reports": self.n_reports, "n_parsed": self.n_parsed,
                "rejected": dict(self.rejected)}


def call_seed(*identity: Any) -> int:
    """The sampling seed of one model call, from what the call is (e.g. the run's seed, the stage,
    the scenario, the report's index), never from where it falls in a list of calls to do: a
    stable hash, in [0, 2**31) so that every backend and API takes it."""
    digest = hashlib.sha256("\0".join(map(str, identity)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (1 << 31)


def _bar(run: Run, title: str):
    from ..progress import bar

    return bar(f"  {title}", console=run.console, disable=not run.progress)


def call_in_batches(run: Run, which: str, title: str, items: Sequence[tuple], journal: Journal,
                    call: Callable[[Any, Sequence[tuple]], list[dict]]) -> None:
    """``call(backend, batch)`` over the items (keyed by their first element) that the
    journal does not hold yet, recording each batch's results as soon as they arrive. The model
    is loaded only if there is something left to do."""
    todo = [it for it in items if it[0] not in journal]
    try:
        if todo:
            backend = run.backend(which)
            with _bar(run, title) as bar:
                task = bar.add_task("", total=len(items), completed=len(items) - len(todo))
                for start in range(0, len(todo), run.cfg.batch_size):
                    batch = todo[start:start + run.cfg.batch_size]
                    journal.record_many(zip((it[0] for it in batch), call(backend, batch)))
                    bar.update(task, advance=len(batch))
            del backend
    finally:  # also when interrupted: the journal's writer lock goes with it
        journal.close()


def choices(run: Run, which: str, scenarios: Sequence[Scenario], n_trials: int, purpose: str,
            counterbalance: bool, out_name: str) -> ChoiceMeasurement:
    """Choices of a model on fresh pairs -> a selections CSV in the paper's layout."""
    items = []
    for s in scenarios:
        for i, p in enumerate(design.sample_pairs(s, n_trials, run.cfg.seed, purpose, counterbalance)):
            items.append((f"{s.id}:{i}", s, p))
    journal = run.journal("choices")

    def score(backend, batch):
        probs = backend.choice_probs([prompts.decision_chat(s, p.a, p.b) for _, s, p in batch])
        return [{"p_a": float(pa), "mass": float(m)} for pa, m in zip(probs.p_a, probs.mass)]

    call_in_batches(run, which, f"{which} model choices", items, journal, score)
    rows = []
    for k, s, p in items:
        r = journal[k]
        rows.append({"model": run.label, "scenario": s.id, "selection": "A" if r["p_a"] >= 0.5 else "B",
                     **{f"A_attribute_{j + 1}": v for j, v in enumerate(p.a)},
                     **{f"B_attribute_{j + 1}": v for j, v in enumerate(p.b)},
                     ("p_a" if run.cfg.soft_targets else "prob_a"): r["p_a"], "mass": r["mass"]})
    import pandas as pd

    path = run.path(out_name)
    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))
    run.output(path)
    return ChoiceMeasurement(out_name, items, np.array([journal[k]["p_a"] for k, _, _ in items]),
                             np.array([journal[k]["mass"] for k, _, _ in items]))


def reports(run: Run, which: str, scenarios: Sequence[Scenario], version: str, out_name: str) -> ReportMeasurement:
    """Self-reports of a model -> a reports CSV in the paper's layout, raw replies beside it.

    Each report is sampled with a seed of its own identity (the run's seed, the stage, the
    scenario, the report's index), so an interrupted and resumed stage, or another batch size,
    draws exactly the samples an uninterrupted run draws."""
    cfg = run.cfg
    items = []
    for s in scenarios:
        for i, p in enumerate(design.sample_pairs(s, cfg.n_reports, cfg.seed, "report")):
            items.append((f"{s.id}:{i}", s, p, i))
    journal = run.journal("reports")
    stage = run.current

    def report(backend, batch):
        chats = [prompts.introspection_chat(s, p.a, p.b) for _, s, p, _ in batch]
        if cfg.report_mode == "expected":  # no sampling: the mean (and SD) of each slot's distribution
            out = backend.expected_reports(chats, [s.attribute_names for _, s, _, _ in batch])
            return [{"text": r.text, "mode": "expected", "sd": r.sd} for r in out]
        if cfg.report_mode == "constrained":
            texts = [r.text for r in backend.constrained_reports(chats, [s.attribute_names for _, s, _, _ in batch])]
        else:
            texts = backend.generate(chats, max_new_tokens=cfg.report_max_new_tokens,
                                     temperature=cfg.report_temperature,
                                     seed=[call_seed(cfg.seed, stage, s.id, i) for _, s, _, i in batch])
        return [{"text": t, "mode": cfg.report_mode} for t in texts]

    call_in_batches(run, which, f"{which} model reports ({cfg.report_mode})", items, journal, report)
    rows, raw, reasons = [], [], {}
    for k, s, p, i in items:
        text = journal[k]["text"]
        parsed = parse_report(text, s.attribute_names)
        raw.append({"scenario": s.id, "report": i, "mode": journal[k]["mode"], "text": text, "ok": parsed.ok,
                    "reason": parsed.reason, "detail": parsed.detail,
                    **({"sd": journal[k]["sd"]} if "sd" in journal[k] else {})})
        if not parsed.ok:
            reasons[parsed.reason] = reasons.get(parsed.reason, 0) + 1
            continue
        rows.append({"explaining_model": run.label, "version": version, "scenario": s.id,
                     **{f"report_attr{j + 1}": w for j, w in enumerate(parsed.weights)},
                     **{f"A_attribute_{j + 1}": v for j, v in enumerate(p.a)},
                     **{f"B_attribute_{j + 1}": v for j, v in enumerate(p.b)}})
    import pandas as pd

    n_attrs = run.k
    cols = ["explaining_model", "version", "scenario"] + [f"report_attr{j}" for j in range(1, n_attrs + 1)] + \
        [f"{o}_attribute_{j}" for o in "AB" for j in range(1, n_attrs + 1)]
    path = run.path(out_name)
    atomic_write_text(path, pd.DataFrame(rows, columns=cols).to_csv(index=False))
    raw_path = run.path("raw", out_name.replace(".csv", ".jsonl"))
    atomic_write_text(raw_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in raw))
    run.output(path)
    run.output(raw_path)
    return ReportMeasurement(out_name, cfg.report_mode, len(items), len(rows), reasons)


def report_curve_evaluator(run: Run, sets: dict[str, tuple[list[Scenario], dict[str, np.ndarray]]]):
    """The trainer's evaluator for ``report_curves``: per set, one expected-value report per
    scenario (a pair of its own, the same at every evaluation) and r against the set's weights."""
    pairs = {s.id: design.sample_pairs(s, 1, run.cfg.seed, "curve")[0] for scens, _ in sets.values() for s in scens}

    def evaluate(model, tokenizer) -> dict[str, float]:
        from ..backends.hf import HFBackend

        backend = HFBackend.around(model, tokenizer, batch_size=run.cfg.batch_size)
        out = {}
        for name, (scens, weights) in sets.items():
            scens = [s for s in scens if s.id in weights]
            if not scens:  # r over the cells of even one scenario is defined (k attributes)
                continue
            reps = backend.expected_reports([prompts.introspection_chat(s, pairs[s.id].a, pairs[s.id].b) for s in scens],
                                            [s.attribute_names for s in scens])
            x = np.array([[r.weights[n] for n in s.attribute_names] for r, s in zip(reps, scens)])
            out[f"report_r_{name}"] = stats.pearson(x, np.array([weights[s.id] for s in scens]))
        return out

    return evaluate
