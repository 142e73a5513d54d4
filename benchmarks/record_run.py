"""Summarise a finished run directory as Markdown: what was run, how long each stage took, how
well instillation worked, and the paper's table. Used to record preset runs in benchmarks/.

    python benchmarks/record_run.py runs/cpu > benchmarks/cpu_preset.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from selfinterp.analysis import CONDITIONS


def fmt(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def main(root: Path) -> None:
    cfg = json.loads((root / "config.json").read_text())
    results = json.loads((root / "analysis" / "results.json").read_text())
    stages = sorted((json.loads(p.read_text()) for p in (root / "stages").glob("*.json") if p.stem.count(".") == 0),
                    key=lambda s: s["finished"])
    total = sum(s["seconds"] for s in stages)
    print(f"# Run `{cfg['name']}` (preset {cfg.get('preset')}, backend {cfg['backend']}, model {cfg['model']})\n")
    print(f"{cfg['n_instilled']} instilled + {cfg['n_native']} native scenarios; {cfg['n_train']} preference pairs "
          f"per scenario (counterbalanced: {cfg['counterbalance']}); {cfg['n_eval_trials']} / {cfg['n_native_trials']} "
          f"choice trials (both orders: {cfg['eval_counterbalance']}); {cfg['n_reports']} {cfg['report_mode']} "
          f"reports per scenario and condition; instill {json.dumps(cfg['instill'])}; introspection "
          f"{json.dumps(cfg['introspection'])}.\n")
    print(f"## Stages (wall time, sum {total / 60:.1f} min)\n")
    print("| stage | seconds | summary |\n| --- | ---: | --- |")
    for s in stages:
        summ = {k: v for k, v in (s.get("summary") or {}).items()
                if not k.startswith("_") and k not in ("file", "model", "not_identified")}
        text = ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}" for k, v in summ.items())
        print(f"| {s['stage']} | {s['seconds']:.1f} | {text} |")
    for label, conds in results["models"].items():
        print(f"\n## Results ({label})\n")
        print("| condition | r | 95% CI | scenarios | reports | sign agreement |\n| --- | ---: | --- | ---: | ---: | ---: |")
        for cond in CONDITIONS:
            c = conds.get(cond.name)
            if c:
                print(f"| {cond.label} (`{cond.name}`) | {fmt(c['r'])} | [{fmt(c['ci'][0], '.2f')}, {fmt(c['ci'][1], '.2f')}] | "
                      f"{c['n_scenarios']} | {c.get('n_reports') or c.get('n_choices', '')} | {fmt(c.get('sign_agreement'), '.2f')} |")
        for key, e in results.get("effects", {}).get(label, {}).items():
            print(f"| {key} (difference) | {e['diff']:+.3f} | [{e['ci'][0]:+.2f}, {e['ci'][1]:+.2f}] | {e['n_scenarios']} | | |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/record_run.py RUN_DIR")
    main(Path(sys.argv[1]))
