"""Stage 11: one self-contained ``report.html`` for a run (figures embedded, no network needed).

It shows the paper-style table with CIs (and the paper's GPT-4o figures beside it), the
figures, and the diagnostics a reader needs to trust or doubt the numbers: instillation
(agreement, answer-A rate, P(A)+P(B) mass, the gate), self-report parse failures by reason per
condition, training losses, stage timings, and the model and data provenance.

The page itself is ``templates/report.html.j2`` (jinja2, autoescaped); this module gathers what it
shows as plain data (``report_context``); ``figures`` draws the PNGs.
"""

from __future__ import annotations

import base64
import json
import platform
from pathlib import Path
from typing import Any

from . import figures
from .analysis import CONDITIONS
from .journal import atomic_write_text

# The paper's figures for GPT-4o (shared/paper-data/README.md), for orientation.
PAPER_GPT4O = {"instillation": 0.843, "base_reports": 0.10, "instilled_reports": 0.543, "itrained_heldout": 0.740,
               "itrained_first_half_trained": 0.767, "itrained_second_half_trained": 0.714,
               "native_instilled_reports": 0.464, "native_itrained_reports": 0.710}

# The fine-tuned models a run may hold, under models/<name>/.
MODELS = ("instilled", "itrained_first", "itrained_last", "itrained_all")

def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return ""
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return str(x)


def _p_text(p: float | None) -> str:
    return "" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_report(run) -> Path:
    """Write the run's self-contained report.html (table, figures, diagnostics, provenance); its path."""
    page = _template().render(**report_context(run))
    path = run.root / "report.html"
    atomic_write_text(path, page)
    return path


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("selfinterp", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("report.html.j2")


def report_context(run) -> dict[str, Any]:
    """What report.html shows, as plain data (numbers formatted, figures as data URIs)."""
    root: Path = run.root
    cfg = run.cfg
    results = json.loads((root / "analysis" / "results.json").read_text())
    conds = results["models"].get(run.label, {})
    effects = results["effects"].get(run.label, {})
    states = {s.name: run.state(s.name) for s in run.stages()}
    summaries = {n: (st or {}).get("summary", {}) for n, st in states.items()}
    manifests = _manifests(run)

    accuracy = [dict(label=c.label, r=_fmt(v["r"]), ci=f"[{_fmt(v['ci'][0], '.2f')}, {_fmt(v['ci'][1], '.2f')}]",
                     n_scenarios=v["n_scenarios"], reports=v["n_reports"] or f"({v.get('n_choices', 0)} choices)",
                     sign=_fmt(v.get("sign_agreement"), ".2f"), ceiling=_fmt(v.get("noise_ceiling"), ".2f"),
                     p=_p_text(v.get("p_permutation")), paper=_fmt(PAPER_GPT4O.get(c.name)))
                for c in CONDITIONS if (v := conds.get(c.name)) is not None]
    effect_rows = [[n, _fmt(e["diff"], "+.3f"), f"[{_fmt(e['ci'][0], '+.2f')}, {_fmt(e['ci'][1], '+.2f')}]",
                    e["n_scenarios"]] for n, e in effects.items()]

    images = [dict(alt=alt, src=_data_uri(p), caption=None)
              for kind, alt in (("accuracy", "r per condition with 95% CIs"), ("scatter", "reported vs learned weights"))
              for p in sorted((root / "analysis").glob(f"{kind}_*.png"))]
    if (loss_png := _loss_plot(root, manifests)) is not None:
        images.append(dict(alt="training loss per step and held-out accuracy", src=_data_uri(loss_png), caption=None))
    if (curve_png := _report_curve_plot(root, manifests)) is not None:
        images.append(dict(alt="report accuracy over training", src=_data_uri(curve_png), caption=(
            "Report accuracy over training (report_curves): at each of the trainer's evaluations, one expected-value "
            "report per scenario; r against the learned weights on the fold a model was trained on (trained) and on "
            "the other (held-out), and during instillation against the instilled weights. A trained-fold curve that "
            "rises while the held-out one does not is memorisation.")))

    val = summaries.get("validate") or {}
    validate = None
    if val:
        gate = val.get("gate", {})
        validate = dict(agreement=_fmt(val.get("agreement")), r=_fmt(val.get("learned_vs_instilled_r")),
                        a_rate=_fmt(val.get("a_rate"), ".2f"), mean_mass=_fmt(val.get("mean_mass"), ".3f"),
                        min_mass=_fmt(val.get("min_mass"), ".3f"), n_choices=val.get("n_choices"),
                        gate="disabled" if not gate.get("enabled", True) else "passed" if gate.get("passed") else "failed",
                        min_agreement=gate.get("min_agreement"), min_r=gate.get("min_r"),
                        forced=bool(gate.get("forced")), not_identified=val.get("not_identified") or None)

    parsing = [[name, s["mode"], s["n_reports"], s["n_parsed"],
                ", ".join(f"{k}: {v}" for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1])) or "none",
                "raw/" + s["file"].replace(".csv", ".jsonl")]
               for name, s in summaries.items() if "n_parsed" in s]
    training = [[name, s.get("steps", ""), _fmt(s.get("first_loss"), ".4f"), _fmt(s.get("final_loss"), ".4f"),
                 _fmt(s.get("val_loss"), ".4f"), _fmt(s.get("train_seconds"), ".0f"), s["model"]]
                for name, s in summaries.items() if "model" in s and name.startswith(("instill", "itrain"))]
    estimated, device = _estimate(run)
    stage_rows = [[n, _fmt(estimated.get(n), ".1f") if n in estimated else "", _fmt((st or {}).get("seconds"), ".1f"),
                   (st or {}).get("finished", ""), ((st or {}).get("key") or "")[:12]]
                  for n, st in states.items() if n != "report"]

    prov = {"config": json.loads(cfg.model_dump_json()), "python": platform.python_version(),
            "platform": platform.platform()}
    for which, m in manifests.items():
        prov[f"model {which}"] = {k: m.get(k) for k in ("base_model", "method", "data", "versions", "folded_system")}
    prov["datasets"] = {k: v for k, v in (states.get("design") or {}).get("outputs", {}).items()
                        if k.startswith("datasets/")}

    return dict(
        run=dict(name=cfg.name, model=cfg.model if cfg.backend != "simulated" else "simulated decision-maker",
                 backend=cfg.backend, preset=cfg.preset or "none", seed=cfg.seed, n_instilled=cfg.n_instilled,
                 n_native=cfg.n_native, n_train=cfg.n_train, n_reports=cfg.n_reports, report_mode=cfg.report_mode),
        accuracy=accuracy, effects=effect_rows, figures=images, validate=validate, parsing=parsing,
        training=training, stages=stage_rows, estimate_device=device if estimated else None,
        provenance=json.dumps(prov, indent=1, default=str))


def _estimate(run) -> tuple[dict[str, float], str]:
    """estimate.json's seconds per stage ({} when it cannot be read) and the device it was made for."""
    try:
        data = json.loads(run.path("estimate.json").read_text())
        seconds = {k: float(v["seconds"]) for k, v in data["stages"].items() if v.get("seconds")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, "this machine"
    return seconds, str(data.get("device", "this machine"))


def _manifests(run) -> dict[str, dict]:
    """The manifest of each fine-tuned model the run has, by name."""
    out = {}
    for which in MODELS:
        mf = run.root / "models" / which / "manifest.json"
        if mf.exists():
            out[which] = json.loads(mf.read_text())
    return out


def _report_curve_plot(root: Path, manifests: dict[str, dict]) -> Path | None:
    """r of expected-value reports at each evaluation, per fine-tuned model and scenario set."""
    series = {}
    for which, m in manifests.items():
        evals = m.get("evals", [])
        for key in sorted({k for e in evals for k in e if k.startswith("report_r_")}):
            pts = [(e["step"], e[key]) for e in evals if e.get(key) is not None]
            if pts:
                series[f"{which}: {key.removeprefix('report_r_')}"] = pts
    return figures.report_curves(series, root / "analysis" / "report_curves.png") if series else None


def _loss_plot(root: Path, manifests: dict[str, dict]) -> Path | None:
    """Training loss per step and held-out answer accuracy at the trainer's evaluations, per model."""
    curves, evals = {}, {}
    for which, m in manifests.items():
        if steps := m.get("step_losses", []):
            curves[which] = [s["loss"] for s in steps]
        if acc := [(e["step"], e["val_accuracy"]) for e in m.get("evals", []) if e.get("val_accuracy") is not None]:
            evals[which] = acc
    return figures.training_curves(curves, evals, root / "analysis" / "training_loss.png") if curves else None
