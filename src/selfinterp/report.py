"""Stage 11: one self-contained ``report.html`` for a run (figures embedded, no network needed).

It shows the paper-style table with CIs (and the paper's GPT-4o figures beside it), the
figures, and the diagnostics a reader needs to trust or doubt the numbers: instillation
(agreement, answer-A rate, P(A)+P(B) mass, the gate), self-report parse failures by reason per
condition, training losses, stage timings, and the model and data provenance.
"""

from __future__ import annotations

import base64
import html
import json
import platform
from pathlib import Path
from typing import Any

from .analysis import CONDITIONS
from .journal import atomic_write_text

# The paper's figures for GPT-4o (shared/paper-data/README.md), for orientation.
PAPER_GPT4O = {"instillation": 0.843, "base_reports": 0.10, "instilled_reports": 0.543, "itrained_heldout": 0.740,
               "itrained_first_half_trained": 0.767, "itrained_second_half_trained": 0.714,
               "native_instilled_reports": 0.464, "native_itrained_reports": 0.710}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}
.warn{background:#fff4e5;border:1px solid #f0b35b;padding:.6em 1em;border-radius:4px}
.ok{color:#1a7f37}.bad{color:#cf222e}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.8em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _p_text(p: float | None) -> str:
    return "" if p is None else "&lt;0.001" if p < 0.001 else f"{p:.3f}"


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return ""
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return _e(x)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def write_report(run) -> Path:
    """Write the run's self-contained report.html (table, figures, diagnostics, provenance); its path."""
    root: Path = run.root
    cfg = run.cfg
    results = json.loads((root / "analysis" / "results.json").read_text())
    label = run.label
    conds = results["models"].get(label, {})
    effects = results["effects"].get(label, {})
    states = {s.name: run.state(s.name) for s in run.stages()}
    parts: list[str] = [f"<h1>selfinterp run: {_e(cfg.name)}</h1>",
                        f"<p>Model <b>{_e(cfg.model if cfg.backend != 'simulated' else 'simulated decision-maker')}</b> "
                        f"(backend {_e(cfg.backend)}), preset {_e(cfg.preset or 'none')}, seed {cfg.seed}; "
                        f"{cfg.n_instilled} instilled and {cfg.n_native} native scenarios, {cfg.n_train} preference "
                        f"examples each, {cfg.n_reports} reports per scenario and condition ({_e(cfg.report_mode)} "
                        f"reports).</p>"]
    if cfg.preset == "smoke":
        parts.append('<p class="warn">This is a <b>smoke</b> run: a handful of scenarios on a tiny budget to prove '
                     'that every stage works. Its numbers are not expected to be meaningful.</p>')
    if cfg.report_mode == "expected":
        parts.append('<p class="warn">Reports are <b>expected values</b>: the tool wrote the JSON skeleton and each '
                     'number is the mean of the model\'s probability distribution over -100..100 for that slot (no '
                     'sampling). This is a different condition from the paper\'s sampled free-form reports.</p>')
    if cfg.report_mode == "constrained":
        parts.append('<p class="warn">Reports were generated in <b>constrained</b> mode: the JSON skeleton with the '
                     'attribute names was written by the tool and the model chose only the numbers. This is a '
                     'different condition from the paper\'s free-form reports.</p>')
    val = (states.get("validate") or {}).get("summary", {})
    if val.get("gate", {}).get("forced"):
        parts.append('<p class="warn">The instillation gate failed and the run was continued with --force.</p>')

    # -- the table
    rows = []
    for c in CONDITIONS:
        if c.name not in conds:
            continue
        v = conds[c.name]
        rows.append([_e(c.label), f"<b>{_fmt(v['r'])}</b>", f"[{_fmt(v['ci'][0], '.2f')}, {_fmt(v['ci'][1], '.2f')}]",
                     v["n_scenarios"], v["n_reports"] or f"({v.get('n_choices', 0)} choices)",
                     _fmt(v.get("sign_agreement"), ".2f"), _fmt(v.get("noise_ceiling"), ".2f"),
                     _p_text(v.get("p_permutation")), _fmt(PAPER_GPT4O.get(c.name))])
    parts.append("<h2>Accuracy of self-reports</h2>")
    parts.append(_table(["condition", "r", "95% CI", "scenarios", "reports", "sign agreement", "noise ceiling",
                         "p (permutation)", "paper (GPT-4o)"], rows) if rows else "<p>No condition could be computed.</p>")
    if effects:
        parts.append(_table(["training effect", "difference in r", "95% CI", "scenarios"],
                            [[_e(n), _fmt(e["diff"], "+.3f"), f"[{_fmt(e['ci'][0], '+.2f')}, {_fmt(e['ci'][1], '+.2f')}]",
                              e["n_scenarios"]] for n, e in effects.items()]))
    parts.append("<p>r: Pearson correlation over scenario x attribute cells between the mean report and the learned "
                 "weights (for instillation: learned vs instilled). CIs: bootstrap over scenarios. Held-out halves are "
                 "z-scored per half, then pooled. p: one-sided permutation test, each scenario's reports paired "
                 "with another scenario's weights (within a half), so habits shared by all scenarios do not count."
                 "</p>")

    # -- figures
    parts.append("<h2>Figures</h2>")
    for kind, alt in (("accuracy", "r per condition with 95% CIs"), ("scatter", "reported vs learned weights")):
        for p in sorted((root / "analysis").glob(f"{kind}_*.png")):
            parts.append(_img(p, alt))
    loss_png = _loss_plot(run, states)
    if loss_png is not None:
        parts.append(_img(loss_png, "training loss per step and held-out accuracy"))
    curve_png = _report_curve_plot(run)
    if curve_png is not None:
        parts.append(_img(curve_png, "report accuracy over training"))
        parts.append("<p>Report accuracy over training (<code>report_curves</code>): at each of the trainer's "
                     "evaluations, one expected-value report per scenario; r against the learned weights on the "
                     "fold a model was trained on (trained) and on the other (held-out), and during instillation "
                     "against the instilled weights. A trained-fold curve that rises while the held-out one does "
                     "not is memorisation.</p>")

    # -- diagnostics
    parts.append("<h2>Instillation</h2>")
    if val:
        gate = val.get("gate", {})
        if not gate.get("enabled", True):
            status = "disabled"
        elif gate.get("passed"):
            status = '<span class="ok">passed</span>'
        else:
            status = '<span class="bad">failed</span>'
        parts.append(_table(["held-out agreement", "learned vs instilled r", "answers A", "mean P(A)+P(B)",
                             "min P(A)+P(B)", "choices", "gate"],
                            [[_fmt(val.get("agreement")), _fmt(val.get("learned_vs_instilled_r")),
                              _fmt(val.get("a_rate"), ".2f"), _fmt(val.get("mean_mass"), ".3f"),
                              _fmt(val.get("min_mass"), ".3f"), val.get("n_choices"),
                              f"{status} (agreement >= {gate.get('min_agreement')}, r >= {gate.get('min_r')})"]]))
        if val.get("not_identified"):
            parts.append(f"<p>Scenarios without identified learned weights (left out): {_e(val['not_identified'])}</p>")

    parts.append("<h2>Self-report parsing</h2>")
    prow = []
    for name, st in states.items():
        s = (st or {}).get("summary", {})
        if "n_parsed" in s:
            rejected = ", ".join(f"{k}: {v}" for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1])) or "none"
            prow.append([_e(name), _e(s["mode"]), s["n_reports"], s["n_parsed"], _e(rejected),
                         f"raw/{_e(s['file'].replace('.csv', '.jsonl'))}"])
    parts.append(_table(["stage", "mode", "replies", "parsed", "rejected by reason", "raw replies"], prow))

    parts.append("<h2>Fine-tuning</h2>")
    trow = []
    for name, st in states.items():
        s = (st or {}).get("summary", {})
        if "model" in s and name.startswith(("instill", "itrain")):
            trow.append([_e(name), s.get("steps", ""), _fmt(s.get("first_loss"), ".4f"), _fmt(s.get("final_loss"), ".4f"),
                         _fmt(s.get("val_loss"), ".4f"), _fmt(s.get("train_seconds"), ".0f"), _e(s["model"])])
    parts.append(_table(["stage", "steps", "first loss", "final loss", "val loss", "seconds", "model"], trow))

    parts.append("<h2>Stages and timings</h2>")
    estimated = _estimates(run)
    srow = [[_e(n), _fmt(estimated.get(n), ".1f") if n in estimated else "", _fmt((st or {}).get("seconds"), ".1f"),
             _e((st or {}).get("finished", "")), _e(((st or {}).get("key") or "")[:12])]
            for n, st in states.items() if n != "report"]
    parts.append(_table(["stage", "estimated s", "seconds", "finished", "input key"], srow))
    if estimated:
        parts.append(f"<p>Estimated before the run (<code>estimate.json</code>, the plan of <code>selfinterp run "
                     f"--dry-run</code>) on {_e(_estimate_device(run))}.</p>")

    parts.append("<h2>Provenance</h2>")
    prov = {"config": json.loads(cfg.model_dump_json()), "python": platform.python_version(),
            "platform": platform.platform()}
    for which in ("instilled", "itrained_first", "itrained_last", "itrained_all"):
        mf = root / "models" / which / "manifest.json"
        if mf.exists():
            m = json.loads(mf.read_text())
            prov[f"model {which}"] = {k: m.get(k) for k in ("base_model", "method", "data", "versions", "folded_system")}
    design_state = states.get("design") or {}
    prov["datasets"] = {k: v for k, v in design_state.get("outputs", {}).items() if k.startswith("datasets/")}
    parts.append(f"<pre>{_e(json.dumps(prov, indent=1, default=str))}</pre>")

    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>selfinterp: {_e(cfg.name)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = root / "report.html"
    atomic_write_text(path, page)
    return path


def _estimates(run) -> dict[str, float]:
    try:
        data = json.loads(run.path("estimate.json").read_text())
        return {k: float(v["seconds"]) for k, v in data["stages"].items() if v.get("seconds")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _estimate_device(run) -> str:
    try:
        return str(json.loads(run.path("estimate.json").read_text())["device"])
    except (OSError, ValueError, KeyError, TypeError):
        return "this machine"


def _report_curve_plot(run) -> Path | None:
    """r of expected-value reports at each evaluation, per fine-tuned model and scenario set."""
    series = {}
    for which in ("instilled", "itrained_first", "itrained_last", "itrained_all"):
        mf = run.root / "models" / which / "manifest.json"
        if not mf.exists():
            continue
        evals = json.loads(mf.read_text()).get("evals", [])
        for key in sorted({k for e in evals for k in e if k.startswith("report_r_")}):
            pts = [(e["step"], e[key]) for e in evals if e.get(key) is not None]
            if pts:
                series[f"{which}: {key.removeprefix('report_r_')}"] = pts
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path = run.root / "analysis" / "report_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _loss_plot(run, states: dict) -> Path | None:
    """Training loss per step (answer tokens: ln 2 is chance for A/B) and, beside it, the held-out
    answer accuracy at the trainer's evaluations (``eval_every``), per fine-tuned model."""
    curves, evals = {}, {}
    for which in ("instilled", "itrained_first", "itrained_last", "itrained_all"):
        mf = run.root / "models" / which / "manifest.json"
        if mf.exists():
            m = json.loads(mf.read_text())
            steps = m.get("step_losses", [])
            if steps:
                curves[which] = [s["loss"] for s in steps]
            acc = [(e["step"], e["val_accuracy"]) for e in m.get("evals", []) if e.get("val_accuracy") is not None]
            if acc:
                evals[which] = acc
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path = run.root / "analysis" / "training_loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
