"""Choice scoring on the hf backend: whole prompts vs each scenario's shared prefix run once, in
float32 and bfloat16, side by side in one run on the same prompts (recorded in bench_local.md).

Prints seconds per configuration, the speed-ups, and how far bfloat16 moves P(A) from float32
(max |dP(A)|, and the share of prompts whose choice, P(A) >= 0.5, is the same): the figures that
decide whether bfloat16 may become the CPU default (issue 11: only if P(A) stays within 0.02 and
>= 99% of choices agree). Use a fine-tuned model (``--model DIR``, e.g. a run's materialised
``models/instilled``): a base model's P(A) sits near 0.5 for every prompt, where a choice flips
on any rounding.

    python benchmarks/bench_scoring.py [--model smollm2-135m] [--scenarios 10] [--pairs 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name or HF directory")
    ap.add_argument("--scenarios", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=32, help="pairs per scenario, each also swapped")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch

    from selfinterp import design, prompts, scenarios
    from selfinterp.backends.hf import HFBackend

    bank = scenarios.load_bank()[: args.scenarios]
    chats = [prompts.decision_chat(s, p.a, p.b) for s in bank
             for p in design.sample_pairs(s, args.pairs, 0, "bench-scoring", counterbalance=True)]
    print(f"{args.model}: {len(chats)} decision prompts of {len(bank)} scenarios, batch {args.batch_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    seconds, p_a = {}, {}
    for dtype in ("float32", "bfloat16"):
        for share in (False, True):
            name = f"{dtype}, {'shared prefix' if share else 'whole prompts'}"
            backend = HFBackend(args.model, dtype=dtype, batch_size=args.batch_size, progress=False, share_prefix=share)
            backend.choice_probs(chats[:4])  # warm-up (first-call allocations)
            t = time.perf_counter()
            p_a[name] = backend.choice_probs(chats).p_a
            seconds[name] = time.perf_counter() - t
            print(f"  {name:32s} {seconds[name]:7.1f} s  ({1000 * seconds[name] / len(chats):.1f} ms/prompt)", flush=True)
    base = "float32, whole prompts"
    for name in seconds:
        if name != base:
            d = np.abs(p_a[name] - p_a[base])
            same = np.mean((p_a[name] >= 0.5) == (p_a[base] >= 0.5))
            print(f"  {name:32s} speed-up x{seconds[base] / seconds[name]:.2f}  max |dP(A)| {d.max():.4f}  "
                  f"mean {d.mean():.4f}  same choice {same:.3f}")
    print(f"  P(A) range (float32): {p_a[base].min():.3f}-{p_a[base].max():.3f}, A-rate {np.mean(p_a[base] >= 0.5):.2f}")


if __name__ == "__main__":
    main()
