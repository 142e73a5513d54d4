"""A model on disk: what a directory holds and how to load it. The one place that decodes a
model directory, below both the trainer (:mod:`selfinterp.training.finetune`) and the backends.

Three things name a model:

- a base model: a registry name (``smollm2-135m``), an HF model directory, a hub id or a ``.gguf``
  file (:func:`load_base`);
- a bare peft adapter directory (``adapter_config.json``) on a base model named elsewhere;
- an output directory of :func:`selfinterp.training.finetune.finetune` (``manifest.json``): a LoRA adapter
  or the trained layers' weights, on the base its manifest names (:func:`read_finetuned`,
  :func:`load_finetuned`); its merged copy, a plain HF directory, is written once into
  ``merged/`` (:func:`materialise`).

torch and transformers are imported only by the functions that load weights.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
ADAPTER_DIR = "adapter"  # peft save_pretrained output (method "lora")
TRAINED_WEIGHTS = "trained.safetensors"  # the trained parameters (method "full")
TOKENIZER_DIR = "tokenizer"
MERGED_DIR = "merged"  # materialise(): the model as one plain HF directory
_COMPLETE = ".complete"


@dataclass(frozen=True)
class ModelRef:
    """A model a backend can load: a base model (registry name, directory or hub id), optionally
    with a fine-tuned adapter directory, and metadata about how it was made."""

    base: str
    adapter: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finetuned:
    """What a :func:`selfinterp.training.finetune.finetune` output directory holds, from its manifest."""

    path: Path
    base_model: str
    method: str  # "lora" (an adapter on the base) or "full" (the trained layers' weights)
    manifest: dict[str, Any]

    @property
    def adapter(self) -> Path | None:
        """The peft adapter directory (method "lora"), else None."""
        return self.path / ADAPTER_DIR if self.method == "lora" else None

    @property
    def merged(self) -> Path:
        """Where :func:`materialise` writes the model as one plain HF directory."""
        return self.path / MERGED_DIR


def is_peft_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a bare peft adapter directory."""
    return (Path(path) / "adapter_config.json").is_file()


def is_finetuned(path: str | Path) -> bool:
    """Whether ``path`` is a selfinterp.training.finetune output directory (it has a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def read_finetuned(path: str | Path) -> Finetuned:
    """The fine-tuned model in ``path``, or an error that says what the directory lacks."""
    path = Path(path)
    if not is_finetuned(path):
        raise FileNotFoundError(f"{path} is neither a peft adapter nor a selfinterp.training.finetune output "
                                f"(no adapter_config.json, no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / MANIFEST}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or "base_model" not in manifest:
        raise ValueError(f"{path / MANIFEST} is not a selfinterp.training.finetune output (no base_model)")
    return Finetuned(path, str(manifest["base_model"]), str(manifest.get("method", "full")), manifest)


# --------------------------------------------------------------------------------------------
# Loading


def bf16_native(device: Any) -> bool:
    """Whether ``device`` computes in bfloat16 natively. A CPU without avx512_bf16 or AMX emulates
    it several times slower than float32 (benchmarks/cpu_preset.md)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from .estimate import cpu_native_bf16

    return cpu_native_bf16()


def resolve_dtype(dtype: str, device: Any) -> str:
    """The weights' dtype that "auto" means on ``device``."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" and bf16_native(device) else "float32"


DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a dtype name ("float32", "bfloat16", "float16", or fp32 / bf16 / fp16):
    the package's one map of dtype names."""
    import torch

    name = DTYPE_ALIASES.get(name, name)
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return getattr(torch, name)


def load_base(base_model: str | Path, dtype: str = "float32", device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF directory / hub id, or a ``.gguf`` file (de-quantised).
    ``device``: load the weights straight onto it (a GPU), not through host memory first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype == "auto":
        dtype = resolve_dtype(dtype, torch.device(device or "cpu"))
    placement = {"device_map": {"": str(device)}} if device is not None else {}
    spec = str(base_model)
    if spec.endswith(".gguf"):
        p = Path(spec)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch_dtype(dtype),
                                                     **placement)
        model.hf_quantizer = None  # weights are already floats; lets save_pretrained/peft work
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        tok = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype(dtype), **placement)
    return model, tok


def load_finetuned(out_dir: str | Path, dtype: str | None = None, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) as they were at the end of training, in eval mode."""
    import torch

    ft = read_finetuned(out_dir)
    model, tok = load_base(ft.base_model, dtype or ft.manifest.get("config", {}).get("dtype", "auto"))
    if (ft.path / TOKENIZER_DIR).exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ft.path / TOKENIZER_DIR)
    if ft.method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ft.adapter)
    else:
        from safetensors.torch import load_file

        state = load_file(str(ft.path / TRAINED_WEIGHTS))
        params = dict(model.named_parameters())
        unknown = [n for n in state if n not in params]
        if unknown:
            raise ValueError(f"{ft.path / TRAINED_WEIGHTS} does not match {ft.base_model}: {unknown[:3]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
    if device:
        model.to(device)
    model.eval()
    return model, tok


# --------------------------------------------------------------------------------------------
# The merged copy


def _merged_ready(out: Path) -> bool:
    return (out / "config.json").exists() and (out / _COMPLETE).exists()


def materialise(finetuned: str | Path) -> Path:
    """A fine-tuned model as a plain HF model directory (LoRA merged), e.g. as the base of
    further training or for an engine that loads one directory. Written once, atomically."""
    ft = read_finetuned(finetuned)
    out = ft.merged
    if _merged_ready(out):
        return out
    model, tok = load_finetuned(ft.path)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tmp = ft.path / (MERGED_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / _COMPLETE).write_text("")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def wait_for_merged(finetuned: str | Path, timeout: float = 3600.0) -> Path:
    """The merged copy that another process (rank 0) is writing, once it is complete."""
    out = Path(finetuned) / MERGED_DIR
    deadline = time.monotonic() + timeout
    while not _merged_ready(out):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{out}: rank 0 did not write the merged model within {timeout:.0f} s")
        time.sleep(1.0)
    return out
