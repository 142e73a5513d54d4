"""Make tests/data/synthetic: a small study on the simulated backend, in the paper's layout.

The simulated decision-maker has known weights (see ``selfinterp.backends.simulated``), so the
fixture exercises the whole analysis (refitting learned weights from choices, every condition,
both training effects) in any clone of the repository, without the paper's data. It is
committed; re-make it (deterministic: seeded) after a change to the run's file layout with

    python tests/data/make_synthetic.py

Only what the analysis reads is kept (choices, reports, scenarios.json, instilled_weights.csv)
plus config.json, the settings the study ran with.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from selfinterp import config
from selfinterp.layout import classify
from selfinterp.pipeline import Run

OUT = Path(__file__).resolve().parent / "synthetic"
SETTINGS = dict(name="synthetic", seed=0, n_instilled=12, n_native=8, n_train=40, n_val=5,
                n_eval_trials=40, n_native_trials=40, n_reports=4, n_introspection=2)


def make(out: Path = OUT) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        Run(config.build("simulated", overrides=SETTINGS), tmp, progress=False).execute()
        keep = [p for p in sorted(Path(tmp).iterdir())
                if p.name in ("config.json", "scenarios.json", "instilled_weights.csv") or classify(p.name)]
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for p in keep:
            shutil.copy(p, out / p.name)
    return out


if __name__ == "__main__":
    out = make(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
    print(f"wrote {len(list(out.iterdir()))} files to {out}")
