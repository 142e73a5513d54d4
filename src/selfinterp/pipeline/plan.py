"""The plan of a run before it runs (``selfinterp run --dry-run``): per stage, the model calls and
training examples it declares (:class:`~selfinterp.pipeline.stages.Stage`), and for a local model
the estimator's time and memory (:mod:`selfinterp.estimate`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .. import design, prompts
from ..config import RunConfig
from .stages import STAGES


CHARS_PER_TOKEN = 3.2  # SmolLM2's and Qwen2.5's tokenizers on the paper's prompts (one token per digit)


def _tokens(chat: Sequence[dict]) -> float:
    return 3 + sum(5 + len(m["content"]) / CHARS_PER_TOKEN for m in chat)


def prompt_sizes(cfg: RunConfig) -> dict[str, float]:
    """Mean tokens of the run's decision prompt, introspection prompt and report answer, from the
    run's own scenarios (up to 10 of them), about 3.2 characters a token."""
    instilled, native = design.choose_scenarios(cfg.scenarios, cfg.n_instilled, cfg.n_native, cfg.seed)
    dec, intro, ans = [], [], []
    for s in (instilled + native)[:10]:
        p = design.sample_pairs(s, 1, cfg.seed, "estimate")[0]
        dec.append(_tokens(prompts.decision_chat(s, p.a, p.b)))
        intro.append(_tokens(prompts.introspection_chat(s, p.a, p.b)))
        ans.append(len(prompts.report_json(s, design.draw_weights(s, cfg.seed))) / CHARS_PER_TOKEN + 2)
    return {"decision": float(np.mean(dec)), "introspection": float(np.mean(intro)), "answer": float(np.mean(ans))}


def dry_run_rows(cfg: RunConfig, device: Any = None) -> list[dict[str, Any]]:
    """Stages with their model calls and training examples. Each row: stage, model_calls,
    call_kind, training_examples, epochs and, for a local model (hf, vllm), ``work``: what the
    estimator (``selfinterp.estimate``) needs, sized for ``device`` (this machine by default)."""
    from .. import estimate as est

    local = cfg.backend in ("hf", "vllm")
    sizes = prompt_sizes(cfg) if local else {}
    device = device or (est.cpu_device() if local else None)
    gpu = device is not None and device.kind == "cuda"
    infer_dtype = ("bfloat16" if gpu else "float32") if cfg.backend == "hf" else (
        cfg.vllm.dtype if cfg.vllm.dtype != "auto" else ("bfloat16" if gpu else "float32"))
    out = []
    for stage in STAGES:
        if (stage.native and cfg.n_native == 0) or (stage.control and not cfg.cross_model_control):
            continue
        name, calls, examples, train = (stage.name, stage.model_calls(cfg), stage.training_examples(cfg),
                                        stage.train_settings(cfg))
        kind = "choice" if stage.work in ("choices", "native_choices") else "report_" + cfg.report_mode if calls else None
        work = est.Work(name, "none")
        if local and calls:
            if kind == "choice":
                work = est.Work(name, "score", calls, sizes["decision"], batch_size=cfg.batch_size, dtype=infer_dtype)
            elif kind == "report_expected":  # per slot: the prompt so far, then ~a prompt's worth of short rows
                work = est.Work(name, "score", calls * 2 * 5, sizes["introspection"], batch_size=1, dtype=infer_dtype)
            else:
                work = est.Work(name, "generate", calls, sizes["introspection"],
                                new_tokens=min(sizes["answer"], cfg.report_max_new_tokens), batch_size=cfg.batch_size,
                                dtype=infer_dtype)
        elif local and train is not None:
            tokens = sizes["decision"] + 2 if stage.work == "instill" else sizes["introspection"] + sizes["answer"]
            big = (est.find_shape(cfg.model) or est.KNOWN_SHAPES["smollm2-135m"]).params > 1e9
            ckpt = train.gradient_checkpointing if train.gradient_checkpointing is not None else (gpu and big)
            work = est.Work(name, "train", examples, tokens, epochs=train.epochs, method=train.method,
                            layers=train.layers, lora_rank=train.lora_rank,
                            cached=train.cache_lower_layers and train.first_layer != 0,  # early: nothing below
                            batch_size=max(1, train.batch_size // train.grad_accum), checkpointing=ckpt,
                            dtype=train.dtype if train.dtype != "auto" else ("bfloat16" if gpu else "float32"),
                            # the trainer drops bf16 autocast where the CPU would emulate it
                            autocast=train.autocast if gpu or device.native_bf16 else None,
                            cache_dtype=train.cache_dtype)
        out.append({"stage": name, "model_calls": calls, "call_kind": kind or "", "training_examples": examples,
                    "epochs": train.epochs if train is not None else 0, "est_seconds": 0.0, "est_gib": 0.0,
                    "work": work})
    return out


def estimate_run(cfg: RunConfig, device: Any = None, recorded: dict | None = None,
                 calibrate: bool = False) -> tuple[list[dict[str, Any]], Any]:
    """``dry_run_rows``' rows with ``est_seconds`` and ``est_gib`` filled in, and the Estimate (None when
    the run has no local model: the API's plan prices tokens instead). ``device``: this machine's
    by default; ``calibrate``: measure a CPU's matmul rate first (about a second)."""
    from .. import estimate as est

    if cfg.backend not in ("hf", "vllm"):
        return dry_run_rows(cfg, device), None
    device = device or est.local_device()
    if calibrate:
        device = est.calibrate(device)
    rows = dry_run_rows(cfg, device)
    e = est.estimate([r["work"] for r in rows], device, cfg.model,
                     recorded=est.read_recorded() if recorded is None else recorded)
    for row, s in zip(rows, e.stages):
        row["est_seconds"], row["est_gib"] = s.seconds, s.device_gib
    return rows, e
