"""What a run will cost on a device: time and peak memory per stage, each with its basis.

Pure arithmetic, no model code: a model's shape (``Shape``), a device (``Device``), and the work of
each stage in tokens (``Work``). Time = floating-point operations / an effective rate for the kind
of work; the rate comes, best first, from

1. runs recorded on this machine (``rates.json`` in the cache: each finished stage of an hf run
   stores the rate it achieved, so estimates improve with use),
2. the reference CPU (rates measured on a 2-core x86-64 CPU with SmolLM2-135M, scaled by the
   number of cores), or
3. for a GPU, its nominal dense bf16 rate times a stated utilisation (token generation: the
   weights read once per step at a stated fraction of the memory bandwidth).

Memory: weights, trainable parameters with their gradients and AdamW state, activations of one
micro-batch (per-layer bytes per token, checked against the tensors autograd really saves in
tests/test_estimate.py), the lower-layer cache (host memory) and, for scoring, the logits.
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's dimensions (Llama/Qwen family: GQA attention, SwiGLU MLP)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        """Dimensions per attention head (the hidden size over the heads)."""
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention, the SwiGLU MLP and its two norms."""
        kv = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        """Parameters of the input embedding and, unless tied to it, the output layer."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        """Parameters of the whole model: every layer, the embeddings and the final norm."""
        return self.layers * self.layer_params + self.embedding_params + self.hidden

    def lora_params(self, rank: int, layers: int) -> int:
        """LoRA on every linear layer of ``layers`` decoder layers (q, k, v, o, gate, up, down)."""
        kv = self.kv_heads * self.head_dim
        pairs = [(self.hidden, self.hidden)] * 2 + [(self.hidden, kv)] * 2 + [(self.hidden, self.intermediate)] * 3
        return layers * rank * sum(i + o for i, o in pairs)

    def flops_per_token(self, layers: int | None = None, context: int = 0) -> float:
        """Forward FLOPs of one token through ``layers`` decoder layers (all by default), attending
        to ``context`` earlier tokens; the output layer is counted separately (``head_flops``)."""
        n = self.layers if layers is None else layers
        return n * (2 * self.layer_params + 4 * self.hidden * context)

    @property
    def head_flops(self) -> float:
        """Forward FLOPs of the output layer for one token."""
        return 2 * self.hidden * self.vocab

    def activation_bytes_per_token(self, checkpointing: bool = False, dtype_bytes: int = 2,
                                   residual_bytes: int = 4) -> float:
        """Bytes autograd keeps per token and trained layer for the backward pass (SDPA attention,
        so no seq x seq matrix): with checkpointing only the layer's input (in the weights' dtype,
        ``residual_bytes``); else also the norms (float32 under autocast), q, k, v, the attention
        output, the MLP's input, gate, up and activation (``dtype_bytes``: the compute dtype)."""
        layer_input = residual_bytes * self.hidden
        if checkpointing:
            return layer_input
        kv = self.kv_heads * self.head_dim
        norms = 4 * (2 * self.hidden) * 2
        low = dtype_bytes * (3 * self.hidden + self.hidden + 2 * kv + self.hidden + 4 * self.intermediate)
        return layer_input + norms + low


KNOWN_SHAPES: dict[str, Shape] = {s.name: s for s in [
    # From each model's published config.json.
    Shape("smollm2-135m", 30, 576, 1536, 9, 3, 49152, True),
    Shape("qwen2.5-coder-0.5b", 24, 896, 4864, 14, 2, 151936, True),
    Shape("Qwen/Qwen2.5-0.5B-Instruct", 24, 896, 4864, 14, 2, 151936, True),
    Shape("Qwen/Qwen2.5-1.5B-Instruct", 28, 1536, 8960, 12, 2, 151936, True),
    Shape("Qwen/Qwen2.5-3B-Instruct", 36, 2048, 11008, 16, 2, 151936, True),
    Shape("Qwen/Qwen2.5-7B-Instruct", 28, 3584, 18944, 28, 4, 152064, False),
    Shape("Qwen/Qwen2.5-14B-Instruct", 48, 5120, 13824, 40, 8, 152064, False),
    Shape("Qwen/Qwen2.5-32B-Instruct", 64, 5120, 27648, 40, 8, 152064, False),
    Shape("meta-llama/Llama-3.1-8B-Instruct", 32, 4096, 14336, 32, 8, 128256, False),
]}


def shape_from_config(name: str, config: Mapping[str, Any]) -> Shape:
    """A Shape from a Hugging Face ``config.json`` (keys of the Llama/Qwen/Mistral families)."""
    try:
        return Shape(name, int(config["num_hidden_layers"]), int(config["hidden_size"]),
                     int(config["intermediate_size"]), int(config["num_attention_heads"]),
                     int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                     int(config["vocab_size"]), bool(config.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: config.json lacks a decoder shape field ({e})") from None


def find_shape(model: str) -> Shape | None:
    """The shape of a registry model, a known hub name, or a local directory with config.json."""
    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model]
    p = Path(model)
    for cfg in (p / "config.json", p.parent / "config.json") if p.exists() else ():
        if cfg.is_file():
            try:
                return shape_from_config(model, json.loads(cfg.read_text()))
            except (ValueError, json.JSONDecodeError):
                return None
    return None


# --------------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True)
class Device:
    """What the estimate needs of a machine: memory, and peak compute and memory bandwidth."""

    name: str
    kind: str  # "cpu" or "cuda"
    memory_gib: float  # GPU memory, or host RAM for a CPU
    tflops: float = 0.0  # nominal dense bf16 tensor throughput (GPUs)
    bandwidth_gbs: float = 0.0  # memory bandwidth, GB/s
    cores: int = 0  # CPU cores (for a CPU device)
    host_gib: float | None = None  # host RAM beside a GPU, where known
    matmul_gflops: tuple[float, float] | None = None  # a CPU's measured (float32, bfloat16) matmul rate
    native_bf16: bool = True  # a CPU with avx512_bf16 / AMX (else training computes in float32)

    @property
    def key(self) -> str:
        """The device's part of the key of its recorded rates (its name)."""
        return self.name


# Vendor datasheet figures: dense (not sparse) bf16 tensor TFLOPS, memory, bandwidth.
GPUS: dict[str, Device] = {
    "h100-80gb": Device("NVIDIA H100 80GB SXM", "cuda", 80, 989, 3350),
    "h100-pcie": Device("NVIDIA H100 80GB PCIe", "cuda", 80, 756, 2000),
    "h200": Device("NVIDIA H200 141GB", "cuda", 141, 989, 4800),
    "a100-80gb": Device("NVIDIA A100 80GB", "cuda", 80, 312, 2039),
    "a100-40gb": Device("NVIDIA A100 40GB", "cuda", 40, 312, 1555),
    "l40s": Device("NVIDIA L40S", "cuda", 48, 362, 864),
    "a10g": Device("NVIDIA A10G", "cuda", 24, 125, 600),
    "l4": Device("NVIDIA L4", "cuda", 24, 121, 300),
    "rtx4090": Device("NVIDIA GeForce RTX 4090", "cuda", 24, 165, 1008),
}

# Utilisations assumed for a GPU never measured here (stated in every estimate that uses them).
GPU_UTILISATION = {"score": 0.35, "cache": 0.35, "train": 0.30}
GPU_BANDWIDTH_FRACTION = 0.6  # of nominal memory bandwidth, reading the weights once per decode step
GPU_STEP_OVERHEAD_S = 0.015  # Python / kernel-launch time per generated token of a transformers batch


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (avx512_bf16 or AMX). Without it torch emulates
    bfloat16: on an AVX2-only AMD EPYC a SmolLM2-135M forward under bf16 autocast took 6.7x as long
    as in float32. torch's probes are private; a torch without them counts as lacking it."""
    try:
        import torch
    except ImportError:
        return False
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(f()) for f in probes if callable(f))


def cpu_device(cores: int | None = None, memory_gib: float | None = None) -> Device:
    """This machine's CPU (the cores this process may use, its RAM)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if memory_gib is None:
        try:
            memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        except (ValueError, OSError, AttributeError):
            memory_gib = 0.0
    return Device(f"CPU ({cores} cores, {platform.machine() or 'unknown'})", "cpu", round(memory_gib, 1), cores=cores,
                  native_bf16=cpu_native_bf16())


def gpu_by_name(name: str, memory_gib: float) -> Device:
    """The GPUS entry for a CUDA device name (as torch reports it), or a generic one."""
    n = name.lower()
    words = set(re.split(r"[^a-z0-9]+", n))
    key = ("h200" if "h200" in n else ("h100-pcie" if "pcie" in n else "h100-80gb") if "h100" in n
           else ("a100-80gb" if memory_gib > 50 else "a100-40gb") if "a100" in n
           else "l40s" if "l40s" in words else "a10g" if "a10g" in words else "l4" if "l4" in words
           else "rtx4090" if "4090" in n else None)
    if key is None:
        return Device(f"{name} (unknown: an A10G's rates assumed)", "cuda", round(memory_gib, 1), 125, 600)
    return replace(GPUS[key], name=name, memory_gib=round(memory_gib, 1))


def local_device() -> Device:
    """The device a run here would use: the first CUDA GPU if torch sees one, else the CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return replace(gpu_by_name(props.name, props.total_memory / GIB), host_gib=cpu_device().memory_gib)
    except Exception:  # no torch, or a broken CUDA set-up: estimate for the CPU
        pass
    return cpu_device()


def calibrate(device: Device, seconds: float = 0.5) -> Device:
    """``device`` (a CPU) with its matmul rate measured now, in float32 and bfloat16, on every
    thread torch uses (about 2 x ``seconds``): the estimate scales the reference CPU's rates by it."""
    if device.kind != "cpu":
        return device
    import time

    import torch

    rates = []
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(768, 768, dtype=dt), torch.randn(768, 768, dtype=dt)
        best = 0.0
        for _ in range(4):  # the first round warms the thread pool up; the best round is the rate
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds / 4:
                a @ b
                n += 1
            best = max(best, n * 2 * 768**3 / elapsed / 1e9)
        rates.append(best)
    return replace(device, matmul_gflops=(round(rates[0], 1), round(rates[1], 1)))


def parse_device(name: str) -> Device:
    """``cpu``, ``cpu:<cores>``, or a GPU name of ``GPUS`` (``h100-80gb``; ``8xh100-80gb`` is refused
    with a pointer: one device per estimate, data parallelism divides the times)."""
    key = name.strip().lower()
    if key == "cpu":
        return cpu_device()
    if key.startswith("cpu:"):
        try:
            cores = int(key[4:])
        except ValueError:
            cores = 0
        if cores < 1:
            raise ValueError(f"--device {name}: cpu:<cores> needs a positive number of cores")
        return cpu_device(cores)
    if key in GPUS:
        return GPUS[key]
    raise ValueError(f"--device {name}: unknown device; use cpu, cpu:<cores> or one of {', '.join(GPUS)}")


# --------------------------------------------------------------------------------------------
# Rates


# Effective FLOP/s on the reference CPU: 2 cores of an x86-64 server CPU with AVX-512 bf16, torch
# 2.13, SmolLM2-135M; from the stage times of `selfinterp run --preset cpu`, seed 0 (cpu_preset.md):
# validate (600 choices, float32), instill's cache (10,000 prompts, 18 layers, bf16 autocast) and
# steps (625 x 16, top 12 layers, bf16 autocast), reports (constrained, 50 per stage).
REFERENCE_CORES = 2
REFERENCE_RATES = {"score": 2.1e11, "cache": 5.2e11, "train": 3.7e11}
# What calibrate() reads on the reference CPU (float32, bfloat16 GFLOP/s): read on 2026-12-03 on
# the same kind of machine, when a float32 forward of SmolLM2 (8 x 200 tokens) took 2.24 s, as on
# the reference day (2.30 s, cpu-models.md). That day bf16-autocast training and caching ran
# ~2x slower than REFERENCE_RATES (instill_cpu.md, p04-p05) with no such drop in the matmul
# figure, so this scaling is a first guess; the rates a run records here replace it.
REFERENCE_MATMUL_GFLOPS = (185.0, 420.0)
REFERENCE_STEP_S = 0.08  # seconds per generated token of a batch (overhead-bound on a CPU)
BF16_SCORE_SPEEDUP_CPU = 1.8  # bench_local.md: bfloat16 vs float32 scoring on this CPU
MODEL_LOAD_S = 3.0  # fixed seconds to load a model (plus its bytes at DISK_GBS)
DISK_GBS = 1.0


@dataclass(frozen=True)
class Rate:
    """An effective rate for one kind of work, and what it rests on."""

    flops: float  # effective FLOP/s (for "step": seconds per decode step instead)
    basis: str


def rates_file() -> Path | None:
    """``$SELFINTERP_RATES`` (empty: keep no record), else ``rates.json`` in selfinterp's cache."""
    env = os.environ.get("SELFINTERP_RATES")
    if env is not None:
        return Path(env) if env else None
    from .models import cache_base

    return cache_base() / "rates.json"


def machine_key(device: Device) -> str:
    """The key of this machine and device in the record of achieved rates (host name | device)."""
    return f"{platform.node()}|{device.key}"


def read_recorded(path: Path | None = None) -> dict:
    """The achieved rates recorded in ``path`` (the rates file by default); empty if none or unreadable."""
    path = path or rates_file()
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record_rate(device: Device, model: str, kind: str, dtype: str, rate: float, source: str,
                path: Path | None = None) -> None:
    """Store a rate a finished stage achieved (the mean with the earlier ones, newer weighing half)."""
    from .journal import atomic_write_text

    path = path or rates_file()
    if path is None:
        return
    data = read_recorded(path)
    slot = data.setdefault(machine_key(device), {}).setdefault(model, {})
    old = slot.get(f"{kind}:{dtype}")
    value = rate if not old else 0.5 * old["rate"] + 0.5 * rate
    slot[f"{kind}:{dtype}"] = {"rate": value, "n": (old or {}).get("n", 0) + 1, "last": source}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # an estimate's memory is a convenience, never a reason for a run to fail


def rate_for(kind: str, device: Device, model: str, dtype: str, recorded: Mapping | None = None) -> Rate:
    """The effective rate of one kind of work: 'score', 'cache', 'train' (FLOP/s) or 'step'
    (seconds per generated token of a batch)."""
    hit = (((recorded or {}).get(machine_key(device)) or {}).get(model) or {}).get(f"{kind}:{dtype}")
    if hit:
        return Rate(hit["rate"], f"measured here by {hit['n']} earlier stage(s) of this model (last: {hit['last']})")
    if device.kind == "cpu":
        wide = dtype == "float32"
        if device.matmul_gflops and all(REFERENCE_MATMUL_GFLOPS):
            i = 0 if wide or kind == "step" else 1
            scale = device.matmul_gflops[i] / REFERENCE_MATMUL_GFLOPS[i]
            where = (f"reference CPU x {scale:.2g} (this CPU's {('float32', 'bfloat16')[i]} matmul: "
                     f"{device.matmul_gflops[i]:.0f} GFLOP/s, measured now; reference {REFERENCE_MATMUL_GFLOPS[i]:.0f})")
        else:
            scale = device.cores / REFERENCE_CORES
            where = f"reference 2-core CPU x {scale:.2g} for {device.cores} cores"
        if kind == "step":
            return Rate(REFERENCE_STEP_S / max(scale, 1e-9) ** 0.5, f"{where} (per generated token: 0.08 s / sqrt(scale))")
        r = REFERENCE_RATES[kind] * scale
        if kind == "score" and dtype != "float32":
            r *= BF16_SCORE_SPEEDUP_CPU
            where += ", bf16 1.8x"
        if kind in ("cache", "train") and dtype == "float32":  # the reference trained under bf16 autocast
            r /= BF16_SCORE_SPEEDUP_CPU
            where += ", float32: the reference's bf16 rate / 1.8"
        return Rate(r, where)
    if kind == "step":
        return Rate(GPU_STEP_OVERHEAD_S, f"{GPU_STEP_OVERHEAD_S * 1e3:.0f} ms overhead per token + weights read at "
                                         f"{GPU_BANDWIDTH_FRACTION:.0%} of {device.bandwidth_gbs:.0f} GB/s")
    u = GPU_UTILISATION[kind]
    return Rate(device.tflops * 1e12 * u, f"{device.tflops:.0f} TFLOPS bf16 nominal x {u:.0%} utilisation (assumed)")


# --------------------------------------------------------------------------------------------
# Work and estimates


@dataclass(frozen=True)
class Work:
    """One stage's work, in prompts and tokens."""

    stage: str
    kind: str  # "none", "score", "generate", "train"
    prompts: int = 0  # model calls (choices or reports), or training examples
    prompt_tokens: float = 0.0  # mean tokens per prompt (training: per example)
    new_tokens: float = 0.0  # generated tokens per report
    epochs: int = 0
    method: str = "lora"  # training: "lora" or "full"
    layers: int | None = None  # training: top decoder layers trained (None: all)
    lora_rank: int = 16
    cached: bool = False  # training: lower layers run once and cached
    batch_size: int = 16
    checkpointing: bool = False
    dtype: str = "float32"  # weights' dtype (training) or inference dtype
    autocast: str | None = "bfloat16"
    cache_dtype: str = "float32"


@dataclass(frozen=True)
class StageEstimate:
    """One stage's estimate: seconds, peak device and host memory, FLOPs, and seconds and FLOPs by part."""

    stage: str
    seconds: float
    device_gib: float  # peak memory on the device (for a CPU: the process's RAM)
    host_gib: float  # host memory beside a GPU (the lower-layer cache); 0 on a CPU (in device_gib)
    flops: float
    parts: dict[str, float] = field(default_factory=dict)  # seconds by part
    part_flops: dict[str, float] = field(default_factory=dict)  # FLOPs by part


@dataclass(frozen=True)
class Estimate:
    """A run's estimate on a device: every stage's, what it rests on, whether it fits and why not."""

    device: Device
    shape: Shape | None
    stages: tuple[StageEstimate, ...]
    basis: tuple[str, ...]
    fits: bool
    problems: tuple[str, ...]

    @property
    def seconds(self) -> float:
        """Seconds of the whole run (every stage's, summed)."""
        return sum(s.seconds for s in self.stages)

    @property
    def peak_gib(self) -> float:
        """The largest device memory any stage needs, GiB."""
        return max((s.device_gib for s in self.stages), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """The estimate as a JSON-ready dict, rounded, with one entry per stage."""
        return {"device": self.device.name, "model": self.shape.name if self.shape else None,
                "seconds": round(self.seconds, 1), "peak_gib": round(self.peak_gib, 2), "fits": self.fits,
                "problems": list(self.problems), "basis": list(self.basis),
                "stages": {s.stage: {"seconds": round(s.seconds, 1), "device_gib": round(s.device_gib, 2),
                                     "host_gib": round(s.host_gib, 2), "flops": s.flops} for s in self.stages}}


def _weights_gib(shape: Shape, dtype: str) -> float:
    return shape.params * BYTES[dtype] / GIB


def training_memory(shape: Shape, w: Work) -> dict[str, float]:
    """GiB by part for one training stage (device side; the cache is host memory)."""
    n_trained = shape.layers if w.layers is None else min(w.layers, shape.layers)
    trainable = shape.lora_params(w.lora_rank, n_trained) if w.method == "lora" else n_trained * shape.layer_params
    act_bytes, resid = BYTES[w.autocast or w.dtype], BYTES[w.dtype]
    tokens = w.batch_size * w.prompt_tokens
    acts = tokens * shape.activation_bytes_per_token(w.checkpointing, act_bytes, resid) * n_trained
    if w.checkpointing:  # one layer's full set while it is recomputed
        acts += tokens * shape.activation_bytes_per_token(False, act_bytes, resid)
    # fp32 gradients and AdamW m and v, plus the fp32 trainable weights themselves where "weights"
    # does not hold them (LoRA adapters; fully trained layers of a model loaded narrower)
    own = 4 if (w.method == "lora" or BYTES[w.dtype] != 4) else 0
    parts = {"weights": _weights_gib(shape, w.dtype), "trainable": trainable * (own + 4 + 8) / GIB,
             "activations": acts / GIB,
             "logits": w.batch_size * 2 * shape.vocab * 4 / GIB}  # the answer positions only, fp32
    parts["cache (host)"] = (w.prompts * w.prompt_tokens * shape.hidden * BYTES[w.cache_dtype] / GIB) if w.cached else 0.0
    return parts


def inference_memory(shape: Shape, w: Work) -> dict[str, float]:
    """GiB by part for one scoring or generating stage: weights, KV cache, working memory, logits."""
    tokens = w.batch_size * (w.prompt_tokens + w.new_tokens)
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * BYTES[w.dtype]
    work = w.batch_size * (w.prompt_tokens + w.new_tokens) * (shape.hidden * 4 + shape.intermediate * 2) * BYTES[w.dtype]
    return {"weights": _weights_gib(shape, w.dtype), "kv cache": kv / GIB, "working": work / GIB,
            "logits": w.batch_size * shape.vocab * 4 / GIB}


def estimate_stage(shape: Shape, w: Work, device: Device, model: str, recorded: Mapping | None = None,
                   basis: dict[str, str] | None = None) -> StageEstimate:
    """Seconds, memory and FLOPs of one stage on ``device``; each rate's basis goes into ``basis``."""
    basis = {} if basis is None else basis
    load = MODEL_LOAD_S + _weights_gib(shape, w.dtype) * GIB / (DISK_GBS * 1e9) if w.kind != "none" else 0.0
    parts: dict[str, float] = {"load": load} if load else {}
    flops = 0.0
    mem: dict[str, float] = {}
    pf: dict[str, float] = {}
    if w.kind == "score":
        rate = rate_for("score", device, model, w.dtype, recorded)
        basis["score"] = rate.basis
        flops = w.prompts * (w.prompt_tokens * shape.flops_per_token(context=int(w.prompt_tokens / 2)) + shape.head_flops)
        parts["score"] = flops / rate.flops
        pf = {"score": flops}
        mem = inference_memory(shape, w)
    elif w.kind == "generate":
        rate = rate_for("score", device, model, w.dtype, recorded)
        step = rate_for("step", device, model, w.dtype, recorded)
        basis["score"], basis["generate"] = rate.basis, step.basis
        prefill = w.prompts * (w.prompt_tokens * shape.flops_per_token(context=int(w.prompt_tokens / 2)))
        decode = w.prompts * w.new_tokens * (shape.flops_per_token(context=int(w.prompt_tokens)) + shape.head_flops)
        flops = prefill + decode
        batches = -(-w.prompts // max(w.batch_size, 1))
        per_step = step.flops
        if device.kind == "cuda":
            per_step += _weights_gib(shape, w.dtype) * GIB / (device.bandwidth_gbs * 1e9 * GPU_BANDWIDTH_FRACTION)
        parts["prefill"] = prefill / rate.flops
        parts["decode"] = max(batches * w.new_tokens * per_step, decode / rate.flops)
        pf = {"prefill": prefill, "decode": decode, "decode_steps": batches * w.new_tokens}
        mem = inference_memory(shape, w)
    elif w.kind == "train":
        n_trained = shape.layers if w.layers is None else min(w.layers, shape.layers)
        tokens = w.prompts * w.prompt_tokens
        train_rate = rate_for("train", device, model, w.autocast or w.dtype, recorded)
        basis["train"] = train_rate.basis
        if w.cached:
            cache_rate = rate_for("cache", device, model, w.autocast or w.dtype, recorded)
            basis["cache"] = cache_rate.basis
            cache_flops = tokens * shape.flops_per_token(shape.layers - n_trained)
            parts["cache"] = cache_flops / cache_rate.flops
            frozen_per_epoch = 0.0
        else:
            cache_flops = 0.0
            frozen_per_epoch = tokens * 2 * shape.flops_per_token(shape.layers - n_trained)  # forward + input grads
        trained = shape.flops_per_token(n_trained) * (3 if w.method == "full" else 2.2)  # LoRA: no weight grads
        if w.checkpointing:
            trained += shape.flops_per_token(n_trained)  # the forward once more
        step_flops = w.epochs * (tokens * trained + frozen_per_epoch)
        parts["steps"] = step_flops / train_rate.flops
        flops = cache_flops + step_flops
        pf = {"cache": cache_flops, "steps": step_flops}
        mem = training_memory(shape, w)
    host = mem.pop("cache (host)", 0.0)
    device_gib = sum(mem.values())
    if device.kind == "cpu":
        device_gib, host = device_gib + host, 0.0
    return StageEstimate(w.stage, sum(parts.values()), device_gib, host, flops, parts, pf)


def achieved_rates(est: StageEstimate, w: Work, seconds: float, cache_seconds: float | None = None,
                   score_rate: float | None = None) -> dict[str, float]:
    """The rates a finished stage achieved, by kind ('score', 'cache', 'train': FLOP/s; 'step':
    seconds per generated token of a batch), from its estimate's FLOPs and the seconds it took
    (the estimated model-load time taken off)."""
    busy = max(seconds - est.parts.get("load", 0.0), 1e-3)
    pf = est.part_flops
    if w.kind == "score" and pf.get("score"):
        return {"score": pf["score"] / busy}
    if w.kind == "generate" and pf.get("decode_steps"):
        prefill = pf["prefill"] / score_rate if score_rate else est.parts.get("prefill", 0.0)
        return {"step": max(busy - prefill, 0.05 * busy) / pf["decode_steps"]}
    if w.kind == "train" and pf.get("steps"):
        out = {}
        if w.cached and cache_seconds and pf.get("cache"):
            out["cache"] = pf["cache"] / max(cache_seconds, 1e-3)
            busy = max(busy - cache_seconds, 1e-3)
        out["train"] = pf["steps"] / busy
        return out
    return {}


def estimate(works: Sequence[Work], device: Device, model: str, shape: Shape | None = None,
             recorded: Mapping | None = None) -> Estimate:
    """Time and memory of every stage of a run on ``device``, and whether it fits."""
    shape = shape or find_shape(model)
    if shape is None:
        return Estimate(device, None, tuple(StageEstimate(w.stage, 0.0, 0.0, 0.0, 0.0) for w in works),
                        (f"no shape known for {model!r}: pass a local model directory with config.json",),
                        True, ())
    basis: dict[str, str] = {}
    stages = tuple(estimate_stage(shape, w, device, model, recorded, basis) for w in works)
    lines = [f"model: {shape.name}, {shape.params / 1e9:.2f} B parameters, {shape.layers} layers"]
    lines += [f"{k}: {v}" for k, v in basis.items()]
    problems = []
    limit = 0.95 * device.memory_gib if device.memory_gib else float("inf")
    for s in stages:
        if s.device_gib > limit:
            where = "RAM" if device.kind == "cpu" else "GPU memory"
            problems.append(f"{s.stage}: needs ~{s.device_gib:.1f} GiB of {where}, the device has {device.memory_gib:.0f}")
        if device.host_gib and s.host_gib > 0.9 * device.host_gib:
            problems.append(f"{s.stage}: its lower-layer cache needs ~{s.host_gib:.1f} GiB of host RAM")
    return Estimate(device, shape, stages, tuple(lines), not problems, tuple(problems))
