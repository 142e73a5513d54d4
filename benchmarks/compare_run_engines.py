"""Re-score a finished run's choices with the transformers backend, on the run's own fine-tuned
models and the same prompts, and compare with the P(A) the run recorded (e.g. a run made with
``backend = "vllm"``): max / mean |dP(A)| and the share of identical choices, per stage.

    .venv-vllm/bin/python benchmarks/compare_run_engines.py runs/smoke-vllm [--dtype float32]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from selfinterp import design, prompts
    from selfinterp.backends.hf import HFBackend
    from selfinterp.config import RunConfig
    from selfinterp.modelref import materialise
    from selfinterp.pipeline import Run

    cfg = RunConfig(**json.loads((args.run_dir / "config.json").read_text()))
    run = Run(cfg.model_copy(update={"backend": "hf"}), args.run_dir, progress=False)
    out = run.model_dir("instilled")
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["method"] == "lora":
        hf = HFBackend(manifest["base_model"], adapter=str(out / "adapter"), dtype=args.dtype, progress=False)
    else:
        hf = HFBackend(str(materialise(out)), dtype=args.dtype, progress=False)
    col = "p_a" if cfg.soft_targets else "prob_a"
    print(f"{args.run_dir}: recorded by backend {cfg.backend} (vllm dtype {cfg.vllm.dtype}, lm_head "
          f"{cfg.vllm.head_dtype}); transformers {args.dtype} (lm_head {hf.info['head_dtype']}) on models/instilled ({manifest['method']})")
    allp, allh = [], []
    for stage, scen, n, purpose, name in (
            ("validate", run.design["instilled"], cfg.n_eval_trials, "eval", f"{run.label}_instilled_selections.csv"),
            ("native_choices", run.design["native"], cfg.n_native_trials, "native",
             f"{run.label}_instilled_latent_selections.csv")):
        if not (args.run_dir / name).exists():
            continue
        chats = [prompts.decision_chat(s, p.a, p.b) for s in scen
                 for p in design.sample_pairs(s, n, cfg.seed, purpose, cfg.eval_counterbalance)]
        recorded = pd.read_csv(args.run_dir / name)[col].to_numpy()
        mine = hf.choice_probs(chats).p_a
        d = np.abs(recorded - mine)
        same = np.mean((recorded >= 0.5) == (mine >= 0.5))
        print(f"  {stage:15s} {len(chats):4d} choices: max |dP(A)| {d.max():.4f}, mean {d.mean():.4f}, "
              f"same choice {same:.1%}")
        allp.append(recorded), allh.append(mine)
    p, h = np.concatenate(allp), np.concatenate(allh)
    d = np.abs(p - h)
    same = np.mean((p >= 0.5) == (h >= 0.5))
    print(f"  {'all':15s} {len(p):4d} choices: max |dP(A)| {d.max():.4f}, mean {d.mean():.4f}, same choice {same:.1%}")
    sys.exit(0 if (d.max() <= 0.05 and same >= 0.95) else 1)


if __name__ == "__main__":
    main()
