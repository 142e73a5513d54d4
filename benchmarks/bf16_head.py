"""Where bfloat16's P(A) error comes from: the same choice prompts scored by transformers in
float32 (the reference), and by transformers and vLLM in bfloat16 with the lm_head in bfloat16
(``head_dtype = "model"``) or in float32 (the default), every pair compared. Run it where both
engines are installed (``.venv-vllm``); recorded in ``bench_vllm.md``:

    .venv-vllm/bin/python benchmarks/bf16_head.py [--n-choices 128]
"""

import argparse

from bench_vllm import workload  # also sets the offline / KV-cache environment before vLLM is imported


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-choices", type=int, default=128)
    args = ap.parse_args()

    import numpy as np

    from selfinterp import models
    from selfinterp.backends.hf import HFBackend
    from selfinterp.backends.vllm import VLLMBackend, release

    path = str(models.resolve("smollm2-135m"))
    decision, _ = workload(args.n_choices, 1)
    p = {"transformers float32": HFBackend(path, dtype="float32", progress=False).choice_probs(decision).p_a}
    for head in ("model", "float32"):
        label = "bfloat16 head" if head == "model" else "float32 head"
        p[f"transformers bf16, {label}"] = HFBackend(path, dtype="bfloat16", head_dtype=head,
                                                     progress=False).choice_probs(decision).p_a
        p[f"vLLM bf16, {label}"] = VLLMBackend(path, settings={"dtype": "bfloat16", "head_dtype": head}).choice_probs(decision).p_a
        release()

    ref = p["transformers float32"]
    print(f"SmolLM2-135M-Instruct, {len(decision)} choice prompts; float32 P(A) from {ref.min():.3f} to {ref.max():.3f}")
    names = list(p)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = np.abs(p[a] - p[b])
            same = np.mean((p[a] >= 0.5) == (p[b] >= 0.5))
            print(f"{a:34s} vs {b:34s} max |dP(A)| {d.max():.4f}  mean {d.mean():.4f}  same argmax {same:.1%}")


if __name__ == "__main__":
    main()
