"""Local model speed on this machine, side by side in one run:

1. model load: the GGUF file (de-quantised by transformers at every load) vs the converted cache;
2. choice scoring: the batched scorer (``HFBackend.choice_probs``: left-padded batches, last
   position's logits only) vs one prompt at a time with ``generate(max_new_tokens=1)``, the
   obvious way to read P(A); both on the same real decision prompts, with their agreement.

    python benchmarks/bench_local.py [--model smollm2-135m] [--n 32] [--batch-size 16] [--out FILE]

Prints a markdown report (and writes it to --out). The CPU may be shared with other work:
the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def load_times(name: str) -> list[tuple[str, float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfinterp import models

    s = models.spec(name)
    cache = models.resolve(name)  # installs (converts) on first use, not timed here
    files = [models.package_file(p) for p in s.packages]
    rows = []
    if len(files) == 1 and files[0] is not None:  # split GGUFs are not kept after conversion
        gguf = files[0]
        _, t = timed(lambda: (AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name),
                              AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                   dtype=torch.float32)))
        rows.append(("GGUF (de-quantised at load)", t))
    _, t = timed(lambda: (AutoTokenizer.from_pretrained(cache),
                          AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)))
    rows.append(("converted cache (safetensors)", t))
    return rows


def decision_chats(n: int) -> list:
    from selfinterp import prompts, scenarios
    from selfinterp.design import sample_pairs

    bank = scenarios.load_bank()
    chats = []
    for s in bank:
        for p in sample_pairs(s, 2, seed=0):
            chats.append(prompts.decision_chat(s, p.a, p.b))
    return chats[:n]


def one_at_a_time(backend, chats) -> np.ndarray:
    """P(A) the slow way: generate one token per prompt and read the scores of A and B."""
    import torch

    from selfinterp.backends.hf import encode

    a, b = backend.answer_ids
    tok, model = backend.tokenizer, backend.model
    out = []
    with torch.inference_mode():
        for chat in chats:
            ids = torch.tensor([encode(tok, [backend.render(chat)])[0]])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=tok.pad_token_id)
            logits = gen.scores[0][0].float()
            out.append(torch.sigmoid(logits[a] - logits[b]).item())
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32, help="decision prompts to score")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()

    import torch
    import transformers

    from selfinterp.backends.hf import HFBackend, encode

    lines = [f"# Local model benchmark: {args.model}", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
             f"transformers {transformers.__version__}; load average before: "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", ""]

    loads = load_times(args.model)
    lines += ["## Model load (tokenizer + model, float32)", "", "| source | seconds | ratio |", "| --- | --- | --- |"]
    fastest = min(t for _, t in loads)
    lines += [f"| {what} | {t:.1f} | {t / fastest:.1f}x |" for what, t in loads]

    backend = HFBackend(args.model, batch_size=args.batch_size, progress=False)
    chats = decision_chats(args.n)
    n_tokens = [len(x) for x in encode(backend.tokenizer, [backend.render(c) for c in chats])]
    backend.choice_probs(chats[:2])  # warm-up (first-call allocations)
    # The methods take turns on chunks of one batch, so that other work on a shared CPU slows
    # them alike instead of whichever happened to run during a busy minute.
    batched, single_scorer, slow = [], [], []
    t_batched = t_single_scorer = t_slow = 0.0
    for i in range(0, len(chats), args.batch_size):
        chunk = chats[i: i + args.batch_size]
        out, t = timed(lambda: backend.choice_probs(chunk))
        batched.append(out)
        t_batched += t
        out, t = timed(lambda: np.array([backend.choice_probs([c]).p_a[0] for c in chunk]))
        single_scorer.append(out)
        t_single_scorer += t
        out, t = timed(lambda: one_at_a_time(backend, chunk))
        slow.append(out)
        t_slow += t
    p_a = np.concatenate([c.p_a for c in batched])
    mass = np.concatenate([c.mass for c in batched])
    single_scorer, slow = np.concatenate(single_scorer), np.concatenate(slow)

    lines += ["", f"## Choice scoring: {len(chats)} decision prompts ({min(n_tokens)}-{max(n_tokens)} tokens), float32",
              "", "| method | seconds | prompts/s | speed-up vs generate |", "| --- | --- | --- | --- |"]
    for what, t in ((f"batched scorer (batch {args.batch_size}, logits_to_keep=1)", t_batched),
                     ("scorer one prompt at a time (logits_to_keep=1)", t_single_scorer),
                     ("one at a time, generate(max_new_tokens=1)", t_slow)):
        lines.append(f"| {what} | {t:.1f} | {len(chats) / t:.2f} | {t_slow / t:.2f}x |")
    lines += ["", f"Agreement of P(A): batched vs generate max |diff| = {np.max(np.abs(p_a - slow)):.1e}, "
              f"batched vs scorer one at a time {np.max(np.abs(p_a - single_scorer)):.1e}. "
              f"Mean P(A) = {p_a.mean():.3f}, mean P(A)+P(B) = {mass.mean():.3f}.",
              "The three methods took turns on chunks of one batch (shared CPU: compare ratios, not seconds).",
              f"Load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
