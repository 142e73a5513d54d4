"""The GPU check: the product's trainer and scorer on a model of Qwen2.5-7B's shape, in <= 5 minutes.

For a CUDA machine with no model hub: the model is randomly initialised (its shape is what
costs memory and time, not its weights) and saved once in bfloat16; its tokenizer is a small
BPE trained here on the design's own prompts, with a ChatML template. Each part is timed and
its peak GPU memory printed, under an 80 GB cap (``torch.cuda.set_per_process_memory_fraction``)
so that what passes here fits an H100-80GB:

1. ``lora-bf16``   the paper preset's training (LoRA r16 on all layers, batch 16, grouped pairs)
                   with the frozen weights in bfloat16;
2. ``lora-fp32``   the same with the trainer's default float32 weights (expected not to fit in
                   80 GB: the GPU-ready issue's point 2; an out-of-memory is reported, not raised);
3. ``full-top12``  full fine-tuning of the top 12 layers on cached lower-layer activations;
4. ``score``       P(A) for 64 decision prompts through the hf backend (bf16, fp32 head), base
                   and LoRA adapter, and 4 free and 4 constrained reports;
after each training part: finite losses, and the memory free again once the trainer returned.

    python benchmarks/gpu_check.py                 # on the GPU (prints one JSON line per part)
    python benchmarks/gpu_check.py --tiny          # the same code path on a tiny model (CPU test)

Output goes to stdout and, with --out, to a JSON file (benchmarks/gpu_check.md records a run).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from selfinterp import design, prompts, scenarios
from selfinterp.training.finetune import FinetuneConfig, finetune

QWEN7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=False)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def log(part: str, **kw) -> dict:
    rec = {"part": part, **kw}
    print(json.dumps(rec), flush=True)
    return rec


def design_data(n_scen: int, n_pairs: int, seed: int = 0):
    """Scenarios from the package's bank, weights, counterbalanced decision examples."""
    bank = scenarios.load_bank()[:n_scen]
    weights = {s.id: design.draw_weights(s, seed) for s in bank}
    train = design.instillation_examples(bank, weights, n_pairs, seed, counterbalance=True)
    val = design.instillation_examples(bank, weights, 2, seed, "instill-val", counterbalance=True)
    return bank, weights, train, val


def make_tokenizer(texts: list[str], vocab: int, out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=min(vocab, 4000), special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None)
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return tok


def make_model(shape: dict, tok, out: Path, device: str) -> tuple[float, int]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.time()
    cfg = Qwen2Config(**shape, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    free(device)
    return time.time() - t0, n


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def mem(device: str) -> dict:
    if device != "cuda":
        return {}
    return {"peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "allocated_gb": round(torch.cuda.memory_allocated() / 2**30, 2)}


def train_part(name, model_dir, train, val, cfg, work, device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        t0 = time.time()
        res = finetune(model_dir, train, val, cfg, work / name, resume=False, progress=False,
                       callback=lambda r: times.append(r["seconds"]))
        m = res.manifest
        losses = [s["loss"] for s in m["step_losses"]]
        step_s = sorted(times)[len(times) // 2] if times else float("nan")
        out = dict(ok=all(math.isfinite(x) for x in losses), steps=m["steps"], median_step_s=round(step_s, 3),
                   examples_per_s=round(cfg.batch_size / step_s, 1) if times else None,
                   first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4),
                   cache_s=round(m["cache_seconds"], 1), wall_s=round(time.time() - t0, 1),
                   trainable_m=round(m["trainable_parameters"] / 1e6, 1), **mem(device))
        del res
    except torch.OutOfMemoryError as e:  # a finding, not a crash
        out = dict(ok=False, oom=str(e).split("\n")[0][:200], **mem(device))
    except Exception as e:
        out = dict(ok=False, error=f"{type(e).__name__}: {e}"[:300], trace=traceback.format_exc()[-600:])
    free(device)
    out.update({"after_free_gb": mem(device).get("allocated_gb")})
    return log(name, **out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model (a CPU test of this script)")
    ap.add_argument("--cap-gb", type=float, default=80.0, help="GPU memory cap (an H100-80GB)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per training part")
    ap.add_argument("--parts", default="lora-bf16,lora-fp32,full-top12,score")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("no CUDA device: run with --tiny to test the script on a CPU", file=sys.stderr)
        return 2
    t_all = time.time()
    info = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                shape="tiny" if args.tiny else "Qwen2.5-7B")
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        frac = min(1.0, args.cap_gb * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(frac)
        info.update(total_gb=round(total / 2**30, 1), cap_gb=args.cap_gb)
    results = [log("setup", **info)]

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    batch = 16
    bank, weights, train, val = design_data(4, args.steps * batch // 8, seed=0)  # args.steps steps
    texts = [m["content"] for ex in train + val for m in ex["messages"]]
    tok = make_tokenizer(texts, 4000, work / "model")
    shape = TINY if args.tiny else QWEN7B
    seconds, n_params = make_model(shape, tok, work / "model", device)
    results.append(log("model", build_and_save_s=round(seconds, 1), params_b=round(n_params / 1e9, 3)))
    model_dir = str(work / "model")
    parts = args.parts.split(",")
    common = dict(epochs=1, batch_size=batch, warmup_ratio=0.0, batching="grouped_pairs", eval_every=args.steps,
                  checkpoint_every=None)
    if "lora-bf16" in parts:
        results.append(train_part("lora-bf16", model_dir, train, val,
                                  FinetuneConfig(method="lora", dtype="bfloat16", **common), work, device))
    if "lora-fp32" in parts:
        results.append(train_part("lora-fp32", model_dir, train, val,
                                  FinetuneConfig(method="lora", **common), work, device))
    if "full-top12" in parts:
        top = 12 if not args.tiny else 2
        results.append(train_part("full-top12", model_dir, train, val,
                                  FinetuneConfig(method="full", layers=top, cache_lower_layers=True,
                                                 cache_dtype="bfloat16", dtype="bfloat16", **common),
                                  work, device))
    if "score" in parts:
        from selfinterp.backends.hf import HFBackend

        chats = [prompts.decision_chat(s, p.a, p.b) for s in bank
                 for p in design.sample_pairs(s, 8, 1, "gpu-check", counterbalance=True)][:64]
        adapter = work / "lora-bf16" / "adapter"
        for label, kw in (("base", {}), ("adapter", {"adapter": str(adapter)} if adapter.exists() else None)):
            if kw is None:
                continue
            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                be = HFBackend(model_dir, dtype="bfloat16", batch_size=32, progress=False, **kw)
                be.choice_probs(chats[:4])  # warm-up
                t0 = time.time()
                cp = be.choice_probs(chats)
                score_s = time.time() - t0
                rchats = [prompts.introspection_chat(s, *(lambda p: (p.a, p.b))(design.sample_pairs(s, 1, 2, "r")[0]))
                          for s in bank]
                t0 = time.time()
                free_txt = be.generate(rchats, max_new_tokens=48)
                gen_s = time.time() - t0
                t0 = time.time()
                cons = be.constrained_reports(rchats, [[a.name for a in s.attributes] for s in bank])
                cons_s = time.time() - t0
                results.append(log(f"score-{label}", ok=bool(((cp.p_a >= 0) & (cp.p_a <= 1)).all()),
                                   prompts=len(chats), score_s=round(score_s, 2),
                                   prompts_per_s=round(len(chats) / score_s, 1),
                                   mean_mass=round(float(cp.mass.mean()), 3), free_reports_s=round(gen_s, 2),
                                   constrained_reports_s=round(cons_s, 2), constrained_ok=len(cons) == len(bank),
                                   head_dtype=be.info["head_dtype"], **mem(device)))
                del be
            except Exception as e:
                results.append(log(f"score-{label}", ok=False, error=f"{type(e).__name__}: {e}"[:300],
                                   trace=traceback.format_exc()[-600:]))
            free(device)
    results.append(log("total", wall_s=round(time.time() - t_all, 1),
                       prefix_sharing="not in the trainer yet: no exactness check to run"))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r.get("ok", True) or r["part"] == "lora-fp32" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
