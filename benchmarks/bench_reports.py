"""Self-report modes on a local model, side by side in one run:

1. time per report: ``constrained_reports`` (greedy, batched generation) vs ``expected_reports``
   (each number slot read as the model's whole distribution over -100..100);
2. the check that the expected value is what sampling estimates: for the first slot of each
   prompt, the mean of N constrained reports sampled at temperature 1 against the expected
   value (later slots differ by design: the expected mode writes each slot's most probable number
   before reading the next, a sample writes its own draw);
3. how noisy a sampled report is next to the expected one: the SD of the first slot's samples.

    python benchmarks/bench_reports.py [--model smollm2-135m] [--n 8] [--samples 64] [--out FILE]

Prints a markdown report (and writes it to --out), with the load average beside the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np


def introspection_chats(n: int):
    from selfinterp import prompts, scenarios
    from selfinterp.design import sample_pairs

    bank = scenarios.load_bank()
    chats, names = [], []
    for s in bank[:n]:
        p = sample_pairs(s, 1, seed=0)[0]
        chats.append(prompts.introspection_chat(s, p.a, p.b))
        names.append(s.attribute_names)
    return chats, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=8, help="prompts (one scenario each)")
    ap.add_argument("--samples", type=int, default=64, help="sampled reports per prompt for the check")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from selfinterp.backends.hf import HFBackend

    backend = HFBackend(args.model, progress=False)
    chats, names = introspection_chats(args.n)
    backend.expected_reports(chats[:1], names[:1])  # warm-up (number vocabulary, tree)
    t0 = time.perf_counter()
    expected = backend.expected_reports(chats, names)
    t_expected = (time.perf_counter() - t0) / len(chats)
    t0 = time.perf_counter()
    backend.constrained_reports(chats, names)
    t_greedy = (time.perf_counter() - t0) / len(chats)

    rows = []
    for i, (chat, n) in enumerate(zip(chats, names)):
        sampled = backend.constrained_reports([chat] * args.samples, [n] * args.samples, temperature=1.0,
                                              seed=[1000 * i + j for j in range(args.samples)])
        first = np.array([r.weights[n[0]] for r in sampled], dtype=float)
        e = expected[i]
        se = first.std(ddof=1) / np.sqrt(len(first))
        rows.append((i, e.weights[n[0]], e.sd[n[0]], first.mean(), first.std(ddof=1), se))

    lines = [f"# Report modes on {args.model} ({platform.processor() or platform.machine()}, "
             f"load average {os.getloadavg()[0]:.2f} at the end)", "",
             f"- expected-value report: {t_expected:.2f} s per report ({len(chats)} prompts, 5 slots each)",
             f"- greedy constrained report: {t_greedy:.2f} s per report (batched)",
             f"- ratio expected / greedy: {t_expected / t_greedy:.1f}x", "",
             f"First slot: the expected value against the mean of {args.samples} reports sampled at T = 1", "",
             "| prompt | expected mean | expected SD | sampled mean | sampled SD | |diff| / SE |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, em, es, sm, ss, se in rows:
        lines.append(f"| {i} | {em:.2f} | {es:.2f} | {sm:.2f} | {ss:.2f} | {abs(em - sm) / max(se, 1e-9):.2f} |")
    z = np.array([abs(em - sm) / max(se, 1e-9) for _, em, _, sm, _, se in rows])
    lines += ["", f"|diff| / SE: mean {z.mean():.2f}, max {z.max():.2f} (sampling alone: ~0.8 mean; "
              "values far above 3 would mean the two disagree)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
