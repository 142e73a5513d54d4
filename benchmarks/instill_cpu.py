"""Instil hidden preference weights into a small model on a 2-core CPU, then measure them.

A thin driver of the product: the paper's first N scenarios and instilled weights, the paper's
stimuli (``selfinterp.design``), fine-tuning by ``selfinterp.training.finetune`` (the trainer that
``selfinterp run`` uses), held-out choices scored by the hf backend, learned weights by the
product's regression (``selfinterp.regression``), r over the scenario x attribute cells.
Every knob of the recipe search is a trainer setting; results go to JSON (``--out``) and the
table in ``benchmarks/instill_cpu.md``. Runs r00-r05 of that table were made by the earlier,
separate research script (git history before this file became a driver).

    python benchmarks/instill_cpu.py                        # the best recipe (r03's settings)
    python benchmarks/instill_cpu.py --train-pairs 250 --lr 1.5e-4 --out r.json   # one knob changed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from selfinterp import design, models, prompts, scenarios
from selfinterp.training.finetune import FinetuneConfig, finetune
from selfinterp.regression import fit_preferences

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper-data"

# r03 of instill_cpu.md (0.792 / r 0.871 through the research script), as trainer settings.
BEST = dict(method="full", layers=12, cache_lower_layers=True, cache_dtype="bfloat16", lr=3e-4, epochs=1,
            batch_size=16, warmup_ratio=0.05, schedule="cosine", batching="grouped_pairs", groups_per_batch=2,
            loss_on="answer")


def paper_scenarios(n: int):
    """The first n scenarios of the paper's instilled_weights.csv (a fixed, unselected set)."""
    by_id = {s.id: s for s in scenarios.load(PAPER / "scenarios.csv")}
    wdf = pd.read_csv(PAPER / "instilled_weights.csv")
    rows = [r for r in wdf.itertuples(index=False) if r.scenario in by_id][:n]
    return [by_id[r.scenario] for r in rows], {r.scenario: np.array([r.attr1, r.attr2, r.attr3, r.attr4, r.attr5], float)
                                               for r in rows}


def evaluate(backend, scen, weights, n_pairs: int, seed: int) -> dict:
    """Held-out agreement with the simulated choice, A-rate, mass and learned-vs-instilled r."""
    from scipy.stats import pearsonr

    chats, X, y_true = [], [], []
    for s in scen:
        pairs = design.sample_pairs(s, n_pairs, seed, "instill-cpu-eval", counterbalance=True, weights=weights[s.id])
        chats += [prompts.decision_chat(s, p.a, p.b) for p in pairs]
        X.append(design.differences(s, pairs))
        y_true.append([design.simulated_choice(s, weights[s.id], p) == "A" for p in pairs])
    cp = backend.choice_probs(chats)
    choice = (cp.p_a > 0.5).reshape(len(scen), -1)
    fit = fit_preferences(np.stack(X), choice.astype(float))
    learned = np.where(fit.identified[:, None], np.nan_to_num(fit.weights), 0.0)
    instilled = np.stack([weights[s.id] for s in scen])
    r = pearsonr(learned.ravel(), instilled.ravel())[0] if learned.std() > 0 else float("nan")
    agree = (choice == np.array(y_true)).mean(1)
    return dict(agreement=float(agree.mean()), r=float(r), a_rate=float(choice.mean()), mass=float(cp.mass.mean()),
                per_scenario_agreement=[round(float(a), 3) for a in agree], n_choices=int(choice.size))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name or HF directory")
    ap.add_argument("--n-scenarios", type=int, default=10)
    ap.add_argument("--train-pairs", type=int, default=500, help="distinct pairs per scenario (each also swapped)")
    ap.add_argument("--eval-pairs", type=int, default=30, help="held-out pairs per scenario (each also swapped)")
    ap.add_argument("--val-pairs", type=int, default=10, help="pairs per scenario for the trainer's held-out curve")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--soft", type=float, metavar="T", help="soft labels: P(A) = sigmoid((u_A - u_B) / T) on the training pairs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="a trainer setting over the recipe, e.g. --set lr=1.5e-4 --set layers=8")
    ap.add_argument("--work", type=Path, default=Path("/tmp/instill-cpu"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    settings = dict(BEST, eval_every=args.eval_every, seed=args.seed)
    for kv in args.set:
        k, v = kv.split("=", 1)
        try:
            settings[k] = json.loads(v)
        except json.JSONDecodeError:  # a bare word is a string: --set method=lora
            settings[k] = v
    config = FinetuneConfig(**settings)
    print("config", json.dumps({**vars(args), "work": str(args.work), "out": str(args.out), "trainer": config.to_dict()}),
          flush=True)

    scen, weights = paper_scenarios(args.n_scenarios)
    train = design.instillation_examples(scen, weights, args.train_pairs, args.seed, "instill-cpu-train", True,
                                         label_temperature=args.soft,
                                         attribute_targets=config.attribute_loss > 0)
    val = design.instillation_examples(scen, weights, args.val_pairs, args.seed, "instill-cpu-val", True)
    base = models.resolve(args.model)
    t0 = time.time()
    key = hashlib.sha256(json.dumps([config.to_dict(), args.model, args.n_scenarios, args.train_pairs,
                                     args.val_pairs] + ([args.soft] if args.soft else []), sort_keys=True).encode()).hexdigest()[:12]
    out_dir = args.work / f"model-{key}"  # the same settings resume / reuse their model
    res = finetune(base, train, val, config, out_dir, resume=True)
    m = res.manifest
    train_s = time.time() - t0

    from selfinterp.backends.hf import HFBackend
    from selfinterp.modelref import materialise

    path = materialise(out_dir) if m["method"] == "full" else base
    backend = HFBackend(str(path), adapter=str(out_dir / "adapter") if m["method"] == "lora" else None, progress=False)
    t1 = time.time()
    result = evaluate(backend, scen, weights, args.eval_pairs, args.seed)
    result.update(steps=m["steps"], cache_min=m["cache_seconds"] / 60, train_min=(m["wall_seconds"] - m["cache_seconds"]) / 60,
                  total_min=train_s / 60, eval_min=(time.time() - t1) / 60, curve=m.get("evals", []),
                  final_train_loss=m["step_losses"][-1]["loss"], config=config.to_dict(),
                  scenarios=[s.id for s in scen], soft=args.soft)
    print("RESULT", json.dumps(result), flush=True)
    print(f"held-out agreement {result['agreement']:.3f}  r {result['r']:.3f}  A-rate {result['a_rate']:.3f}  "
          f"mass {result['mass']:.3f}  cache {result['cache_min']:.1f} + train {result['train_min']:.1f} min "
          f"({m['steps']} steps)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
