"""Fine-tuning a local model on chat examples: LoRA or full, completion-only loss, CPU-first.

The protocol fine-tunes twice: once to instil preferences (the answer is "A" or "B"), once to
train correct self-reports (the answer is a JSON object). Both are the same job: given chats in
the OpenAI messages format, teach the model the assistant's last turn.

Read top to bottom:

1. :class:`FinetuneConfig` - every hyper-parameter, recorded verbatim in the manifest.
2. :func:`tokenize_example` - prompt and answer tokens, with the loss on the answer only. The
   prompt is rendered by :mod:`selfinterp.chat_template` exactly as measurement renders it.
3. The decoder split - :func:`lower_hidden` / :func:`top_logits` run the frozen lower layers
   and the trained top layers separately, so the lower layers' output can be computed once
   per example and reused every epoch (on a CPU that is most of the cost of a step).
4. :func:`finetune` - a short training loop driven by ``accelerate`` (one process, or DDP under
   ``accelerate launch``), with atomic checkpoints, resume, and a manifest.
5. The output directory: its layout, and loading it back (``load_finetuned``), live in
   :mod:`selfinterp.modelref`, which the backends read too.

Why not HF ``Trainer`` / TRL ``SFTTrainer``: they feed token ids through the whole model every
step and cannot train on cached activations, which is the main CPU speed-up here (4-7x per step,
``benchmarks/bench_finetune.md``); the loop below is short enough to read in one sitting.

Run distributed on GPUs with ``accelerate launch --num_processes N -m selfinterp.training.finetune
--base MODEL --train train.jsonl --out DIR [--val val.jsonl] [--config '{"epochs": 3}']``
(DDP; FSDP is untested). On CPUs use ``torchrun --nproc_per_node N -m selfinterp.training.finetune ...``
(gloo): ``accelerate launch --cpu`` starts several CPU processes only through MPI (mpirun).

This module imports torch; ``import selfinterp`` never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import chat_template
from .. import decoder as dec
from ..config import TrainSettings
from ..journal import atomic_write, atomic_write_json
from ..modelref import (ADAPTER_DIR, MANIFEST, TOKENIZER_DIR, TRAINED_WEIGHTS, bf16_native, load_base, resolve_dtype,
                       torch_dtype)

IGNORE = -100  # label value that cross-entropy ignores (prompt and padding positions)
CHECKPOINTS = "checkpoints"
BEST_DIR = "best"  # keep_best: the trainable weights of the best evaluation so far

# ----------------------------------------------------------------------------------------------
# 1. Configuration: one pydantic model, config.TrainSettings (a run's [instill] and [introspection]
# blocks are made of it); FinetuneConfig is its name here.

FinetuneConfig = TrainSettings


# ----------------------------------------------------------------------------------------------
# 2. Tokenisation with completion-only labels


@dataclass
class TokenizedExample:
    """One tokenised training example: ids, completion-only labels, and any soft or read-out targets."""

    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt (and on the end-of-turn marker with loss_on="answer")
    folded_system: bool  # the template has no system role: the system prompt went into the first user turn
    # Soft targets for the first answer token: (token id, probability) per alternative answer.
    soft: tuple[tuple[int, float], ...] = ()
    # Targets of the auxiliary read-out at the answer position (FinetuneConfig.attribute_loss).
    aux: tuple[float, ...] = ()

    @property
    def n_supervised(self) -> int:
        """How many tokens carry a label (are not IGNORE)."""
        return sum(1 for t in self.labels if t != IGNORE)


def tokenize_row(tok: Any, row: dict[str, Any], max_length: int = 1024, system_role: bool | None = None,
                 loss_on: str = "answer") -> TokenizedExample:
    """A training row: ``messages`` and optionally ``soft_answer`` ({answer text: probability}),
    soft targets for the answer's first token (each alternative's first token, as the answer
    would be tokenised in its place; the probabilities must be >= 0 and sum to 1)."""
    ex = tokenize_example(tok, row["messages"], max_length, system_role, loss_on)
    aux = row.get("attribute_targets")
    if aux is not None:
        if not isinstance(aux, (list, tuple)) or not aux or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in aux):
            raise ValueError(f"attribute_targets must be a non-empty list of finite numbers, not {aux!r}")
        ex = dataclasses.replace(ex, aux=tuple(float(v) for v in aux))
    soft = row.get("soft_answer")
    if soft is None:
        return ex
    if not isinstance(soft, dict) or len(soft) < 2:
        raise ValueError(f"soft_answer must map at least two answers to probabilities, not {soft!r}")
    probs = [float(v) for v in soft.values()]
    if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-4:
        raise ValueError(f"soft_answer probabilities must be >= 0 and sum to 1: {soft!r}")
    ids = []
    for answer in soft:
        alt = [*row["messages"][:-1], {"role": "assistant", "content": str(answer)}]
        other = tokenize_example(tok, alt, max_length, system_role, loss_on)
        ids.append(next(t for t in other.labels if t != IGNORE))
    if len(set(ids)) != len(ids):
        raise ValueError(f"soft_answer's answers {list(soft)} begin with the same token")
    return dataclasses.replace(ex, soft=tuple(zip(ids, probs)))


def tokenize_example(tok: Any, messages: Sequence[dict[str, str]], max_length: int = 1024,
                     system_role: bool | None = None, loss_on: str = "answer") -> TokenizedExample:
    """Prompt tokens (masked) followed by answer tokens (supervised).

    ``loss_on = "answer"`` supervises the answer's own tokens only: the end-of-turn marker the
    template writes after it is kept in the input but not in the loss (it is learned at once and
    would halve a one-token answer's loss, so ln 2 would no longer read as chance);
    ``"answer_and_eot"`` supervises both.

    The prompt and the answer are tokenised *separately*: the prompt's tokens are then exactly
    those measurement feeds the model (it tokenises the same rendered prompt), and the first
    supervised token is exactly the one the choice scorer reads. The answer text is what the
    template adds after the generation prompt, e.g. ``A<|im_end|>`` (ChatML) or
    ``A<|eot_id|>`` (Llama 3); whitespace the template writes after the end-of-turn marker is
    dropped, since nothing is generated after the marker.
    """
    if system_role is None:
        system_role = chat_template.supports_system(tok)
    prompt, answer = chat_template.prompt_and_answer(tok, messages, system_role=system_role)
    folded = not system_role and messages[0]["role"] == "system"
    answer = answer.rstrip()
    # Templates write their own BOS (as text) where they want one: add no special tokens.
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise ValueError("the chat's answer is empty")
    labels = list(answer_ids)
    if loss_on == "answer":
        # The marker is what the template adds after the answer's text; it is tokenised on its own
        # (special tokens such as <|im_end|> never merge with the text before them).
        content = str(messages[-1]["content"]).rstrip()
        at = answer.rfind(content) if content else -1
        tail = answer[at + len(content):] if at >= 0 else ""
        tail_ids = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
        if tail_ids and len(tail_ids) < len(answer_ids) and answer_ids[-len(tail_ids):] == tail_ids:
            labels = answer_ids[:-len(tail_ids)] + [IGNORE] * len(tail_ids)
    elif loss_on != "answer_and_eot":
        raise ValueError(f"loss_on must be 'answer' or 'answer_and_eot', not {loss_on!r}")
    n = len(prompt_ids) + len(answer_ids)
    if n > max_length:
        raise ValueError(f"example has {n} tokens > max_length {max_length}; raise max_length "
                         "(truncating would train on prompts that measurement never shows)")
    return TokenizedExample(input_ids=prompt_ids + answer_ids,
                            labels=[IGNORE] * len(prompt_ids) + labels,
                            folded_system=bool(folded))


# ----------------------------------------------------------------------------------------------
# 4. Training


@dataclass
class FinetunedModel:
    """A fine-tuned model's reference: its output directory and what the manifest says."""

    path: Path
    base_model: str
    method: str
    manifest: dict[str, Any]
    model: Any = field(default=None, repr=False, compare=False)  # the trained model, in the process that trained it


def read_examples(data: str | Path | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Examples ({"messages": [...]}) from a list or a JSONL file."""
    if isinstance(data, (str, Path)):
        with open(data, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return list(data)


def data_sha256(examples: Sequence[dict[str, Any]]) -> str:
    """Hash of the examples as canonical JSON lines (independent of the file's formatting)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _use_checkpointing(model: nn.Module, config: FinetuneConfig, device: torch.device) -> bool:
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing
    return device.type == "cuda" and sum(p.numel() for p in model.parameters()) > 1e9


def _prepare_trainable(model: nn.Module, config: FinetuneConfig) -> tuple[nn.Module, int]:
    """Wrap with LoRA or unfreeze the selected layers; returns (model, first trained layer)."""
    n = dec.n_layers(model)
    k = n if config.layers is None else min(config.layers, n)
    first = n - k if config.first_layer is None else config.first_layer
    if first + k > n:
        raise ValueError(f"first_layer {first} + layers {k} is beyond the model's {n} decoder layers; "
                         f"use first_layer <= {n - k}")
    trained = list(range(first, first + k))
    model.requires_grad_(False)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM",
            layers_to_transform=trained if config.layers is not None else None,
            layers_pattern="layers" if config.layers is not None else None,
        )
        model = get_peft_model(model, lora)
    else:
        backbone = dec.backbone(model)
        wide = config.dtype != "float32" and config.autocast is not None  # autocast computes in bf16 anyway
        for i in trained:
            backbone.layers[i].requires_grad_(True)
            if wide:  # float32 master weights for the trained layers; AdamW on bf16 weights loses updates
                backbone.layers[i].float()
        if first + k == n:  # the final norm sits right above the top trained layer
            backbone.norm.requires_grad_(True)
            if wide:
                backbone.norm.float()
    return model, first


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


class _LossModule(nn.Module):
    """Summed cross-entropy on the supervised tokens; one module so DDP sees every forward.

    Logits are computed only where a label is supervised: with a 49k-262k vocabulary the LM
    head over all positions would dominate a step whose answer is a single token.
    """

    def __init__(self, model: nn.Module, first_trained: int, cached: bool, n_aux: int = 0, aux_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.first_trained = first_trained
        self.cached = cached
        # The auxiliary read-out (FinetuneConfig.attribute_loss), float32, zero-initialised so the
        # first step's answer loss is the plain one; not part of the saved model.
        self.aux_head, self.aux_weight = None, aux_weight
        if n_aux:
            self.aux_head = nn.Linear(dec.lm_head(model).weight.shape[1], n_aux)
            nn.init.zeros_(self.aux_head.weight)
            nn.init.zeros_(self.aux_head.bias)

    def hidden(self, inputs: torch.Tensor, attention_mask: torch.Tensor,
               prefixes: Sequence[torch.Tensor] | None = None, sizes: Sequence[int] | None = None) -> torch.Tensor:
        if self.cached:  # a bfloat16 cache is widened to the weights' dtype (autocast narrows it again)
            dtype = dec.lm_head(self.model).weight.dtype
            inputs = inputs.to(dtype)
            if prefixes is not None:  # rows in runs of `sizes` suffixes, each run after its prefix
                out, s = [], 0
                for pre, n in zip(prefixes, sizes):
                    out.append(dec.top_hidden_shared(self.model, pre.to(dtype), inputs[s: s + n], self.first_trained))
                    s += n
                return torch.cat(out)
            return dec.top_hidden(self.model, inputs, attention_mask, self.first_trained)
        return dec.decoder_stack(self.model)(input_ids=inputs, attention_mask=attention_mask,
                                             use_cache=False).last_hidden_state  # no KV cache in training

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                soft_ids: torch.Tensor | None = None, soft_p: torch.Tensor | None = None,
                prefixes: Sequence[torch.Tensor] | None = None, sizes: Sequence[int] | None = None,
                aux: torch.Tensor | None = None) -> torch.Tensor:
        """Summed loss; with soft targets ((B, K) token ids and probabilities, rows of zeros for
        rows without) a row's first supervised token is scored by cross-entropy to them. With
        ``prefixes`` the rows are suffixes (from :func:`_collate_shared`). With ``aux`` ((B, n_aux)
        targets) the read-out of each row's answer position is scored by squared error, times
        ``aux_weight``, and added (kept, detached, in ``last_aux`` for the log)."""
        hidden = self.hidden(inputs, attention_mask, prefixes, sizes)
        targets = labels[:, 1:]
        keep = targets != IGNORE
        states = hidden[:, :-1][keep]
        logits = dec.head(self.model, states).float()
        counts = keep.sum(1)
        start = counts.cumsum(0) - counts  # each row's first supervised token among the kept ones
        aux_loss = logits.new_zeros(())
        if aux is not None and self.aux_head is not None:
            aux_loss = self.aux_weight * (self.aux_head(states[start].float()) - aux).pow(2).sum()
        self.last_aux = aux_loss.detach()
        if soft_ids is None:
            return F.cross_entropy(logits, targets[keep], reduction="sum") + aux_loss
        loss = F.cross_entropy(logits, targets[keep], reduction="none")
        soft = -(soft_p * torch.log_softmax(logits[start], -1).gather(1, soft_ids)).sum(1)
        has = soft_p.sum(1) > 0
        return torch.where(has, soft, loss[start]).sum() + loss.sum() - loss[start].sum() + aux_loss

    def loss_and_first_logits(self, inputs: torch.Tensor, attention_mask: torch.Tensor,
                              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, logits predicting each row's first supervised token) - for evaluation."""
        hidden = self.hidden(inputs, attention_mask)
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = dec.head(self.model, hidden[:, :-1][keep]).float()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        first = keep.int().argmax(1)
        rows = torch.arange(len(first), device=first.device)
        return loss, dec.head(self.model, hidden[rows, first]).float()


def _collate(rows: Sequence[tuple[torch.Tensor, list[int]]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-pad a micro-batch of (token ids or cached hidden states, labels)."""
    T = max(len(lab) for _, lab in rows)
    first = rows[0][0]
    if isinstance(first, tuple):  # a shared prefix's hidden states and this example's suffix
        first = first[1]
    if first.dim() == 1:  # token ids; pad id is irrelevant (masked)
        inputs = torch.zeros(len(rows), T, dtype=torch.long)
    else:  # cached hidden states (T_i, H)
        inputs = torch.zeros(len(rows), T, first.shape[-1], dtype=first.dtype)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (x, lab) in enumerate(rows):
        if isinstance(x, tuple):
            inputs[i, : len(x[0])] = x[0]
            inputs[i, len(x[0]): len(lab)] = x[1]
        else:
            inputs[i, : len(lab)] = x
        mask[i, : len(lab)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return inputs.to(device), mask.to(device), labels.to(device)


def _shared_runs(idx: Sequence[int], examples: Sequence[TokenizedExample],
                 tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]] | None:
    """A micro-batch's rows reordered in runs that share a prompt prefix, with each run's (prefix
    length, rows), or None when some row shares none (the batch then runs whole sequences).

    The runs are found among the batch's own prompts (one scenario's question, typically), not
    taken from the cache's groups: those can be finer (1,000 prompts of a scenario split by their
    first attribute's value), and every extra prefix in a batch is one more forward."""
    groups = dec.prefix_groups([_prompt(examples[i]) for i in idx], tokenizer)
    if any(p == 0 for p, _ in groups):
        return None
    return [idx[k] for _, members in groups for k in members], [(p, len(members)) for p, members in groups]


def _full_states(x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.cat(x) if isinstance(x, tuple) else x


def _collate_shared(rows: Sequence[tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], list[int]]],
                    runs: Sequence[tuple[int, int]], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Right-pad the suffixes of rows ordered by :func:`_shared_runs`: (suffix states, mask, suffix
    labels, {"prefixes": each run's prefix states, "sizes": each run's rows}). A run's prefix
    states are its first row's (causal attention: the same tokens give the same states)."""
    full = [(_full_states(x), lab) for x, lab in rows]
    prefixes, suffixes, s = [], [], 0
    for p, n in runs:
        prefixes.append(full[s][0][:p].to(device))
        # prefix_groups cuts before each prompt's last token, so every supervised label lies in
        # the suffix; the prefix's last state predicts a prompt token.
        suffixes += [(h[p:], lab[p:]) for h, lab in full[s: s + n]]
        s += n
    x, m, y = _collate(suffixes, device)
    return x, m, y, {"prefixes": prefixes, "sizes": [n for _, n in runs]}


def _soft_targets(examples: Sequence[TokenizedExample], device: torch.device) -> tuple:
    """((B, K) token ids, (B, K) probabilities) of a micro-batch's soft targets; () if it has none."""
    if not any(e.soft for e in examples):
        return ()
    k = max(len(e.soft) for e in examples)
    ids = torch.zeros(len(examples), k, dtype=torch.long)
    p = torch.zeros(len(examples), k)
    for i, e in enumerate(examples):
        for j, (t, q) in enumerate(e.soft):
            ids[i, j], p[i, j] = t, q
    return ids.to(device), p.to(device)


def _aux_targets(examples: Sequence[TokenizedExample], n_aux: int, device: torch.device) -> dict[str, Any]:
    """{"aux": (B, n_aux) read-out targets} of a micro-batch, or {} without the read-out."""
    if not n_aux:
        return {}
    return {"aux": torch.tensor([e.aux for e in examples], dtype=torch.float32, device=device)}


def resolve_autocast(autocast: str | None, device: torch.device) -> str | None:
    """bfloat16 autocast on a device without native bfloat16 computes in the weights' dtype: on a
    GPU without it (V100, T4) instead of failing (float16 would need loss scaling), on a CPU
    without avx512_bf16 / AMX instead of emulating it several times slower."""
    return None if autocast == "bfloat16" and not bf16_native(device) else autocast


def _autocast(config: FinetuneConfig, device: torch.device):
    if config.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch_dtype(config.autocast))


def _build_cache(model: nn.Module, examples: Sequence[TokenizedExample], first: int, config: FinetuneConfig,
                 device: torch.device, batch: int = 16, progress: Any = None,
                 tokenizer: Any = None) -> list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Hidden states entering layer ``first`` for each example (unpadded, on CPU, cache_dtype):
    a (T, H) tensor, or with ``share_prefix`` a (group's prefix (P, H), own suffix) pair whose
    prefix tensor is shared by the group.

    Examples are run in length-sorted batches (little padding; right padding leaves the real
    tokens' states unchanged under a causal mask).
    """
    if config.share_prefix and tokenizer is not None and dec.prefix_supported(dec.backbone(model)):
        return _build_cache_shared(model, examples, first, config, device, tokenizer, 2 * batch, progress)
    out: list[torch.Tensor | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    task = progress.add_task("caching lower layers", total=len(order)) if progress else None
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = order[s: s + batch]
            ids, mask, _ = _collate([(torch.tensor(examples[i].input_ids), examples[i].labels) for i in idx], device)
            with _autocast(config, device):
                h = dec.lower_hidden(model, ids, mask, first)
                if s == 0:  # the split must reproduce the model's own forward (architecture check)
                    dec.check_split(model, ids, mask, h, first)
            for j, i in enumerate(idx):
                out[i] = h[j, : len(examples[i].input_ids)].to("cpu", torch_dtype(config.cache_dtype)).clone()
            if progress:
                progress.advance(task, len(idx))
    if progress:
        progress.remove_task(task)
    return out  # type: ignore[return-value]


def _prompt(example: TokenizedExample) -> list[int]:
    """The prompt's token ids (everything before the supervised answer)."""
    return example.input_ids[: len(example.input_ids) - sum(1 for t in example.labels if t != IGNORE)]


def _build_cache_shared(model: nn.Module, examples: Sequence[TokenizedExample], first: int, config: FinetuneConfig,
                        device: torch.device, tokenizer: Any, batch: int, progress: Any) -> list:
    out: list = [None] * len(examples)
    dt = torch_dtype(config.cache_dtype)
    task = progress.add_task("caching lower layers", total=len(examples)) if progress else None
    checked = False
    model.eval()
    groups = dec.prefix_groups([_prompt(e) for e in examples], tokenizer)
    alone = [i for p, members in groups if not p for i in members]  # nothing shared: the plain path
    if alone:
        for i, h in zip(alone, _build_cache(model, [examples[i] for i in alone], first, config, device,
                                            batch // 2, progress)):
            out[i] = h
    with torch.no_grad():
        for p, members in groups:
            if not p:
                continue
            members = sorted(members, key=lambda i: len(examples[i].input_ids))
            prefix = torch.tensor([examples[members[0]].input_ids[:p]], device=device)
            stored = None
            for s in range(0, len(members), batch):
                idx = members[s: s + batch]
                lens = torch.tensor([len(examples[i].input_ids) - p for i in idx])
                suf = torch.zeros(len(idx), int(lens.max()), dtype=torch.long)
                for j, i in enumerate(idx):
                    suf[j, : lens[j]] = torch.tensor(examples[i].input_ids[p:])
                with _autocast(config, device):
                    ph, sh = dec.lower_hidden_shared(model, prefix, suf.to(device), first)
                if not checked:  # sharing must reproduce the plain split forward (an architecture check,
                    # in the weights' precision without autocast, so that rounding is not mistaken for it)
                    with torch.autocast(device_type=device.type, enabled=False):
                        ids, mask, _ = _collate([(torch.tensor(examples[i].input_ids), examples[i].labels)
                                                 for i in idx[:2]], device)
                        plain = dec.lower_hidden(model, ids, mask, first)
                        dec.check_split(model, ids, mask, plain, first)
                        cph, csh = dec.lower_hidden_shared(model, prefix, suf[:2].to(device), first)
                        for j in range(len(idx[:2])):
                            got = torch.cat([cph, csh[j, : lens[j]]]).float()
                            want = plain[j, : p + int(lens[j])].float()
                            err = (got - want).abs().max().item()
                            if not err <= 1e-3 * max(want.abs().max().item(), 1.0):
                                raise NotImplementedError(f"{type(model).__name__}: the shared-prefix forward differs "
                                                          f"from the plain one by {err:.3g}; set share_prefix = false")
                        checked = True
                if stored is None:
                    stored = ph.to("cpu", dt).clone()
                for j, i in enumerate(idx):
                    out[i] = (stored, sh[j, : lens[j]].to("cpu", dt).clone()) if p else sh[j, : lens[j]].to("cpu", dt).clone()
                if progress:
                    progress.advance(task, len(idx))
    if progress:
        progress.remove_task(task)
    return out


def pair_groups(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The group of each counterbalanced pair (examples 2i, 2i+1): the scenario its prompt asks.

    A pair's members share their prompt up to the first option value. That shared text, cut
    after its last line break, is the group's key; a key that extends another one (the first
    values happened to be equal, so more lines were shared) joins the shorter key's group.
    """
    if len(rows) % 2:
        raise ValueError(f"{len(rows)} training examples: pair batching needs counterbalanced pairs "
                         "(examples 2i and 2i+1 the same options with A and B swapped)")

    def prompt_text(row: dict[str, Any]) -> str:
        return "\n".join(str(m["content"]) for m in row["messages"][:-1])

    raw = []
    for a, b in zip(rows[0::2], rows[1::2]):
        x, y = prompt_text(a), prompt_text(b)
        n = next((i for i, (c, d) in enumerate(zip(x, y)) if c != d), min(len(x), len(y)))
        raw.append(x[: x.rfind("\n", 0, n) + 1])
    roots: list[str] = []
    for key in sorted(set(raw), key=len):
        if not any(key.startswith(r) for r in roots):
            roots.append(key)
    root_of = {key: next(r for r in roots if key.startswith(r)) for key in set(raw)}
    return [root_of[k] for k in raw]


def batch_plan(n_examples: int, batch_size: int, batching: str, rng: np.random.Generator,
               groups: Sequence[Any] | None = None, groups_per_batch: int = 2) -> list[list[int]]:
    """One epoch's batches of example indices (the last may be smaller).

    ``groups``: the group of each pair (``grouped_pairs`` only). Runs of pairs of one group are
    cut, shuffled, and ``groups_per_batch`` runs make a batch: few distinct prompt prefixes per
    batch, several for a mixed gradient.
    """
    if batching == "shuffle":
        order = rng.permutation(n_examples).tolist()
        return [order[i: i + batch_size] for i in range(0, n_examples, batch_size)]
    n_pairs = n_examples // 2
    pairs_per_batch = batch_size // 2
    if batching == "pairs":
        order = rng.permutation(n_pairs).tolist()
        runs = [order[i: i + pairs_per_batch] for i in range(0, n_pairs, pairs_per_batch)]
        per_batch = 1
    elif batching == "grouped_pairs":
        if groups is None or len(groups) != n_pairs:
            raise ValueError("grouped_pairs needs the group of every pair")
        per_run = max(1, pairs_per_batch // groups_per_batch)
        by_group: dict[Any, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        runs = []
        for members in by_group.values():
            members = [members[j] for j in rng.permutation(len(members))]
            runs += [members[i: i + per_run] for i in range(0, len(members), per_run)]
        runs = [runs[j] for j in rng.permutation(len(runs))]
        per_batch = groups_per_batch
    else:
        raise ValueError(f"unknown batching {batching!r}")
    batches = []
    for i in range(0, len(runs), per_batch):
        pairs = [p for run in runs[i: i + per_batch] for p in run]
        batches.append([e for p in pairs for e in (2 * p, 2 * p + 1)])
    return batches


def _schedule(optimizer: torch.optim.Optimizer, config: FinetuneConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("selfinterp", "torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _training_fields(config: dict[str, Any]) -> dict[str, Any]:
    # Evaluations change nothing, unless early stopping watches them.
    skip = ("checkpoint_every", "keep_checkpoints", "log_with") + (() if config.get("early_stop_patience") else ("eval_every",))
    return {k: v for k, v in config.items() if k not in skip}


def _latest_checkpoint(out_dir: Path) -> Path | None:
    # Only complete checkpoints carry the step-N name (they are renamed into place when done).
    ckpts = sorted((out_dir / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def finetune(base_model: str | Path, train: str | Path | Iterable[dict[str, Any]],
             val: str | Path | Iterable[dict[str, Any]] | None, config: FinetuneConfig, out_dir: str | Path,
             resume: bool = True, progress: bool = True,
             callback: Callable[[dict[str, Any]], None] | None = None,
             evaluator: Callable[[nn.Module, Any], dict[str, float]] | None = None) -> FinetunedModel:
    """Fine-tune ``base_model`` on ``train`` and write the result to ``out_dir``.

    ``base_model``: an HF model directory or hub id, or a ``.gguf`` file. ``train``/``val``:
    lists of {"messages": [...]} or JSONL paths. With ``resume`` an interrupted run continues
    from its last checkpoint (same config and data required) and a finished run is returned as
    is. ``callback`` receives each optimizer step's log record (raise in it to stop a run).
    ``evaluator(model, tokenizer)`` runs at every evaluation (``eval_every`` and each epoch's end)
    on the model as it is, in eval mode and without gradients, on the main process; its numbers
    join that evaluation's record in the manifest's ``evals`` (e.g. report accuracy over training).
    It must not draw random numbers or change the model: training goes on exactly as without it.
    Under ``accelerate launch`` every process calls this; rank 0 writes the files.
    """
    if config.keep_best and evaluator is None:
        raise ValueError(f"keep_best={config.keep_best!r} maximises an evaluator's number: pass evaluator=")
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    t_start = time.time()
    out_dir = Path(out_dir)
    # A local model is recorded by its absolute path, so load_finetuned works from any directory.
    base_model = str(Path(base_model).resolve()) if Path(base_model).exists() else str(base_model)
    # Autocast is ours (config.autocast), the same on CPU and GPU. Without CUDA, accelerate joins
    # a torchrun/launch process group (gloo) only when told it runs on CPU.
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available(), log_with=config.log_with,
                              project_dir=str(out_dir / "trackers") if config.log_with else None)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    # What "auto" and bf16 autocast mean on this device, settled first: the manifest, and what a
    # checkpoint must match to be resumed, hold the dtypes really used.
    config = config.model_copy(update=dict(dtype=resolve_dtype(config.dtype, device),
                                           autocast=resolve_autocast(config.autocast, device),
                                           batching="shuffle" if config.batching == "auto" else config.batching))

    train_rows, val_rows = read_examples(train), read_examples(val) if val is not None else []
    data_info = {"train": {"n": len(train_rows), "sha256": data_sha256(train_rows)},
                 "val": {"n": len(val_rows), "sha256": data_sha256(val_rows)}}
    for name, src in (("train", train), ("val", val)):
        if isinstance(src, (str, Path)):
            data_info[name]["path"] = str(Path(src).resolve())
    # What a checkpoint or finished run must share to be continued or reused (checkpointing
    # frequency does not change the training).
    identity = {"base_model": str(base_model), "config": _training_fields(config.to_dict()),
                "data": {k: v["sha256"] for k, v in data_info.items()}}

    # A finished run with the same identity is returned as is.
    manifest_path = out_dir / MANIFEST
    if resume and manifest_path.exists():
        done = json.loads(manifest_path.read_text())
        if (done["base_model"], _training_fields(done["config"])) == (identity["base_model"], identity["config"]) \
                and {k: v["sha256"] for k, v in done["data"].items()} == identity["data"]:
            return FinetunedModel(out_dir, done["base_model"], done["config"]["method"], done)
        raise FileExistsError(f"{out_dir} holds a different finished run; choose another out_dir")

    # Per-process micro-batches: batch_size examples per step over all processes.
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(f"batch_size {config.batch_size} must be divisible by processes x grad_accum "
                         f"= {world} x {config.grad_accum}")
    per_rank = config.batch_size // world
    micro = per_rank // config.grad_accum

    if not resume and main:  # a fresh run: nothing of an earlier one may be mistaken for this one's
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    # ---- model and data
    torch.manual_seed(config.seed)  # same LoRA initialisation in every process
    model, tok = load_base(base_model, config.dtype, device if device.type == "cuda" else None)
    model.to(device)
    system_role = chat_template.supports_system(tok)
    train_ex = [tokenize_row(tok, r, config.max_length, system_role, config.loss_on) for r in train_rows]
    val_ex = [tokenize_example(tok, r["messages"], config.max_length, system_role, config.loss_on) for r in val_rows]
    if not train_ex:
        raise ValueError("no training examples")
    n_aux = 0
    if config.attribute_loss > 0:
        sizes = {len(e.aux) for e in train_ex}
        if sizes == {0} or len(sizes) > 1:
            raise ValueError("attribute_loss > 0 needs every training row to carry attribute_targets of one "
                             f"length (found lengths {sorted(sizes)}); write them with the design "
                             "(instillation_examples(attribute_targets=True)) or set attribute_loss = 0")
        n_aux = sizes.pop()
    folded_system = any(e.folded_system for e in train_ex + val_ex)
    model, first = _prepare_trainable(model, config)
    checkpointing = _use_checkpointing(model, config, device)
    if checkpointing:  # the layers' own checkpointing: it also covers the layer-by-layer cached path
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cached = config.cache_lower_layers and first > 0
    # Shared prefixes also in the trained layers (each prefix once per micro-batch); checkpointed
    # layers drop the key/value store that the suffixes read, so not with checkpointing.
    share_trained = cached and config.share_prefix and not checkpointing

    # The batches of every epoch, fixed by the seed (so a resumed run takes the same ones).
    # "shuffle": each process owns a fixed shard (wrapped round so all shards are equally long, as
    # DistributedSampler does), caches it once and shuffles it each epoch. Pair batching plans
    # whole batches and gives each process every world-th example of each (each caches all).
    if config.batching == "shuffle":
        n_shard = math.ceil(len(train_ex) / world)
        shard = [(rank + world * j) % len(train_ex) for j in range(n_shard)]
        plans = []
        for epoch in range(config.epochs):
            order = np.random.default_rng([config.seed, epoch, rank]).permutation(shard).tolist()
            plans.append([order[i: i + per_rank] for i in range(0, n_shard, per_rank)])
    else:
        groups = pair_groups(train_rows) if config.batching == "grouped_pairs" else None
        shard = list(range(len(train_ex)))
        plans = [[b[rank::world] for b in batch_plan(len(train_ex), config.batch_size, config.batching,
                                                     np.random.default_rng([config.seed, epoch]), groups,
                                                     config.groups_per_batch)]
                 for epoch in range(config.epochs)]
        if any(not b for plan in plans for b in plan):
            raise ValueError(f"a batch has fewer examples than the {world} processes; use fewer processes")
    val_shard = list(range(rank, len(val_ex), world))
    steps_per_epoch = len(plans[0])
    total_steps = steps_per_epoch * config.epochs

    bar = None
    if progress and main:
        from ..progress import bar as progress_bar

        bar = progress_bar(info=True)  # a live bar on a terminal, periodic lines in a log file
        bar.start()
    bar_cache = None
    if bar is not None:
        class _CacheBar:  # the cache phase shows in the same live display, without a loss field
            def add_task(self, d, total):
                return bar.add_task(d, total=total, info="")
            def advance(self, t, n):
                bar.advance(t, n)
            def remove_task(self, t):
                bar.remove_task(t)
        bar_cache = _CacheBar()

    t_cache = time.time()
    train_inputs: dict[int, torch.Tensor]  # example index -> token ids, or cached hidden states
    if cached:
        train_inputs = dict(zip(shard, _build_cache(model, [train_ex[i] for i in shard], first, config, device,
                                                    progress=bar_cache, tokenizer=tok)))
        val_inputs = dict(zip(val_shard, _build_cache(model, [val_ex[i] for i in val_shard], first, config,
                                                      device, progress=bar_cache, tokenizer=tok)))
    else:
        train_inputs = {i: torch.tensor(train_ex[i].input_ids) for i in shard}
        val_inputs = {i: torch.tensor(val_ex[i].input_ids) for i in val_shard}
    cache_seconds = time.time() - t_cache if cached else 0.0

    loss_module = _LossModule(model, first, cached, n_aux, config.attribute_loss).to(device)
    aux_head = loss_module.aux_head
    loss_module = accelerator.prepare(loss_module)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if aux_head is not None:  # the read-out: its own group, its own learning rate (same schedule)
        groups.append({"params": list(aux_head.parameters()), "weight_decay": 0.0,
                       "lr": config.attribute_head_lr or config.lr})
    # The fused kernel updates every tensor in one pass (CPU and CUDA), the same AdamW arithmetic
    # (~5% of a cpu-recipe step, bench_finetune.md).
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)
    optimizer = accelerator.prepare(optimizer)
    # The scheduler is not prepared: accelerate would step it once per process.
    scheduler = _schedule(optimizer, config, total_steps)

    # ---- resume
    state: dict[str, Any] = {"step": 0, "step_losses": [], "epoch_losses": [], "wall_seconds": 0.0}
    ckpt = _latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        saved = json.loads((ckpt / "state.json").read_text())
        if saved["identity"] != identity:
            raise ValueError(f"{ckpt} was written with another config or data; use resume=False or another out_dir")
        if saved["world_size"] != world:  # each process's data shard and RNG stream depend on it
            raise ValueError(f"{ckpt} was written by {saved['world_size']} processes; resume with as many (now {world})")
        _load_trainable_state(model, load_file(str(ckpt / "trainable.safetensors")))
        if aux_head is not None:
            aux_head.load_state_dict(load_file(str(ckpt / "aux_head.safetensors")))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=False))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        rng = torch.load(ckpt / f"rng-{rank}.pt", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        state = saved["state"]
    else:
        torch.manual_seed(config.seed * 1000 + rank)  # dropout differs per process
    wall_before = state["wall_seconds"]

    def save_checkpoint() -> None:
        step = state["step"]
        tmp = out_dir / CHECKPOINTS / f"tmp-step-{step}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save({"cpu": torch.get_rng_state(),  # dropout's random stream, per process
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, tmp / f"rng-{rank}.pt")
        accelerator.wait_for_everyone()
        if main:
            save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
            if aux_head is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in aux_head.state_dict().items()},
                          str(tmp / "aux_head.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            state["wall_seconds"] = wall_before + time.time() - t_start
            atomic_write_json(tmp / "state.json", {"identity": identity, "world_size": world, "state": state})
            final = out_dir / CHECKPOINTS / f"step-{step}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a checkpoint exists under its name only when complete
            older = sorted((out_dir / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for p in older[: -config.keep_checkpoints]:
                shutil.rmtree(p, ignore_errors=True)
        accelerator.wait_for_everyone()

    # Held-out answer accuracy: each validation example's first answer token against the first
    # tokens of the other answers in the set ("A" vs "B" for decisions; None when all agree).
    firsts = [next(t for t in e.labels if t != IGNORE) for e in val_ex]
    candidates = sorted(set(firsts))
    cand = torch.tensor(candidates, device=device) if 2 <= len(candidates) <= 16 else None

    def evaluate() -> dict[str, float | None]:
        extra: dict[str, float] = {}
        if evaluator is not None and main:
            model.eval()
            with torch.no_grad(), _autocast(config, device):
                extra = dict(evaluator(accelerator.unwrap_model(model), tok))
            model.train()
            value = extra.get(config.keep_best) if config.keep_best else None
            if value is not None and math.isfinite(value) and value > state.get("best", {}).get("value", -math.inf):
                best = out_dir / BEST_DIR
                best.mkdir(parents=True, exist_ok=True)
                weights = _trainable_state(model)
                atomic_write(best / "trainable.safetensors", lambda tmp: save_file(weights, str(tmp)))
                state["best"] = {"step": state["step"], "key": config.keep_best, "value": value}
        if not val_ex:
            return {"val_loss": None, "val_accuracy": None, **extra}
        model.eval()
        tot = torch.zeros(4, device=device)  # loss sum, supervised tokens, correct, examples
        with torch.no_grad():
            for s in range(0, len(val_shard), micro):
                idx = val_shard[s: s + micro]
                x, m, y = _collate([(val_inputs[i], val_ex[i].labels) for i in idx], device)
                with _autocast(config, device):  # no DDP hooks for eval
                    loss, first_logits = accelerator.unwrap_model(loss_module).loss_and_first_logits(x, m, y)
                tot[0] += loss
                tot[1] += (y[:, 1:] != IGNORE).sum()
                if cand is not None:
                    pred = cand[first_logits[:, cand].argmax(1)]
                    tot[2] += (pred == torch.tensor([firsts[i] for i in idx], device=device)).sum()
                tot[3] += len(idx)
        tot = accelerator.reduce(tot, reduction="sum")
        model.train()
        return {"val_loss": (tot[0] / tot[1]).item(),
                "val_accuracy": (tot[2] / tot[3]).item() if cand is not None else None, **extra}

    def should_stop() -> bool:
        """Early stopping: no better held-out score in the last `early_stop_patience` evaluations."""
        if not config.early_stop_patience:
            return False
        evals = state.get("evals", [])
        scores = [e["val_accuracy"] if e["val_accuracy"] is not None else -(e["val_loss"] or 0.0) for e in evals]
        p = config.early_stop_patience
        return len(scores) > p and max(scores[-p:]) <= max(scores[:-p])

    if config.log_with:
        accelerator.init_trackers("selfinterp-finetune", config=_training_fields(config.to_dict()))

    # ---- train
    task = bar.add_task("fine-tuning", total=total_steps, completed=state["step"], info="") if bar else None
    model.train()
    for epoch in range(state["step"] // steps_per_epoch, config.epochs):
        if state.get("stopped_early"):
            break
        for b in range(state["step"] % steps_per_epoch if epoch == state["step"] // steps_per_epoch else 0,
                       steps_per_epoch):
            t_step = time.time()
            step_idx = plans[epoch][b]
            n_micro = min(config.grad_accum, len(step_idx))
            size = math.ceil(len(step_idx) / n_micro)
            micro_batches = [step_idx[i: i + size] for i in range(0, len(step_idx), size)]
            # Normalise by the step's supervised tokens in this process, so micro-batching does not
            # change the gradient; DDP then averages over processes.
            n_tok = sum(train_ex[i].n_supervised for i in step_idx)
            step_sum = torch.zeros(3, device=device)  # answer loss, supervised tokens, auxiliary loss
            for j, idx in enumerate(micro_batches):
                runs = _shared_runs(idx, train_ex, tok) if share_trained else None
                if runs is not None:  # each prefix once through the trained layers, gradients through it
                    idx, sizes = runs
                    x, m, y, shared = _collate_shared([(train_inputs[i], train_ex[i].labels) for i in idx], sizes,
                                                      device)
                else:
                    x, m, y = _collate([(train_inputs[i], train_ex[i].labels) for i in idx], device)
                    shared = {}
                soft = _soft_targets([train_ex[i] for i in idx], device)
                aux = _aux_targets([train_ex[i] for i in idx], n_aux, device)
                sync = contextlib.nullcontext() if j == len(micro_batches) - 1 else accelerator.no_sync(loss_module)
                with sync:
                    with _autocast(config, device):
                        total = loss_module(x, m, y, *soft, **shared, **aux)
                    accelerator.backward(total / n_tok)
                aux_sum = accelerator.unwrap_model(loss_module).last_aux.float()
                step_sum += torch.stack([total.detach().float() - aux_sum, torch.tensor(float(sum(
                    train_ex[i].n_supervised for i in idx)), device=device), aux_sum])
            if config.grad_clip is not None:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_sum = accelerator.reduce(step_sum, reduction="sum")
            state["step"] += 1
            record = {"step": state["step"], "epoch": epoch + 1, "loss": (step_sum[0] / step_sum[1]).item(), "lr": lr,
                      "seconds": round(time.time() - t_step, 4)}
            if n_aux:  # per supervised token, weighted, as it enters the objective
                record["attribute_loss"] = (step_sum[2] / step_sum[1]).item()
            state["step_losses"].append(record)
            if config.eval_every and state["step"] % config.eval_every == 0 and state["step"] < total_steps:
                ev = evaluate()
                record.update(ev)
                state.setdefault("evals", []).append({"step": state["step"], **ev})
            if bar:
                last = state.get("evals", [{}])[-1].get("val_accuracy")
                bar.update(task, advance=1, info=f"epoch {epoch + 1}/{config.epochs} loss {record['loss']:.4f}"
                           + (f" held-out acc {last:.3f}" if last is not None else ""))
            if config.log_with:
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                step=state["step"])
            if callback:
                callback(record)
            if "val_loss" in record and should_stop():
                state["stopped_early"] = state["step"]
                break
            if config.checkpoint_every and state["step"] % config.checkpoint_every == 0 \
                    and state["step"] % steps_per_epoch:
                save_checkpoint()
        # The epoch's train loss is the mean of its recorded step losses (restored ones included).
        ep_steps = [r["loss"] for r in state["step_losses"] if r["epoch"] == epoch + 1]
        ev = evaluate()
        state["epoch_losses"].append({"epoch": epoch + 1, "train_loss": float(np.mean(ep_steps)), **ev})
        if config.eval_every or evaluator is not None:
            state.setdefault("evals", []).append({"step": state["step"], **ev})
        save_checkpoint()
    if bar:
        bar.stop()
    if config.log_with:
        accelerator.end_training()

    # ---- final output: the adapter / trained weights, the tokenizer, then the manifest (last,
    # atomically: its presence marks a finished run)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if state.get("best"):  # keep_best: the best evaluation's weights are the result
            _load_trainable_state(model, load_file(str(out_dir / BEST_DIR / "trainable.safetensors")))
        if config.method == "lora":
            tmp = out_dir / (ADAPTER_DIR + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            shutil.rmtree(out_dir / ADAPTER_DIR, ignore_errors=True)
            os.replace(tmp, out_dir / ADAPTER_DIR)
        else:
            weights = _trainable_state(model)
            atomic_write(out_dir / TRAINED_WEIGHTS, lambda tmp: save_file(weights, str(tmp)))
        tok.save_pretrained(out_dir / TOKENIZER_DIR)
        manifest = {
            "base_model": str(base_model),
            "method": config.method,
            "config": config.to_dict(),
            "seed": config.seed,
            "data": data_info,
            "folded_system": folded_system,
            "first_trained_layer": first,
            "gradient_checkpointing": checkpointing,
            "shared_prefix_training": share_trained,
            "num_layers": dec.n_layers(model),
            "trainable_parameters": sum(p.numel() for p in params),
            "world_size": world,
            "device": device.type,
            "steps": state["step"],
            "steps_per_epoch": steps_per_epoch,
            "step_losses": state["step_losses"],
            "epoch_losses": state["epoch_losses"],
            "val_loss": state["epoch_losses"][-1]["val_loss"] if state["epoch_losses"] else None,
            "val_accuracy": state["epoch_losses"][-1].get("val_accuracy") if state["epoch_losses"] else None,
            "evals": state.get("evals", []),
            "kept": state.get("best"),  # keep_best: the evaluation whose weights these are
            "stopped_early_at": state.get("stopped_early"),
            "cache_seconds": cache_seconds,
            "wall_seconds": wall_before + time.time() - t_start,
            "versions": _versions(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_json(manifest_path, manifest)
    accelerator.wait_for_everyone()
    manifest = json.loads(manifest_path.read_text())
    model.eval()
    return FinetunedModel(out_dir, str(base_model), config.method, manifest, model=model)


# ----------------------------------------------------------------------------------------------
# 5. Loading


def release_memory() -> None:
    """Return the memory the CUDA allocator still caches (after training, before an inference
    model or a vLLM engine asks for its share of the device); a no-op on a CPU."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Command line (for `accelerate launch -m selfinterp.training.finetune ...`)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: fine-tune a base model on JSONL chat examples into an output directory."""
    import argparse

    ap = argparse.ArgumentParser(description="Fine-tune a local model on chat examples (JSONL).")
    ap.add_argument("--base", required=True, help="registry name (smollm2-135m), HF model directory, hub id or .gguf file")
    ap.add_argument("--train", required=True)
    ap.add_argument("--val")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="{}", help="the trainer's settings (config.TrainSettings) as JSON, or a JSON file")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from pydantic import ValidationError

    from .. import models
    from ..config import format_errors

    path = Path(args.config)
    source, text = (args.config, path.read_text()) if path.is_file() else ("--config", args.config)
    try:
        settings = FinetuneConfig.model_validate_json(text)
    except ValidationError as e:
        ap.error(format_errors(e, source))
    base = args.base if args.base.endswith(".gguf") else str(models.resolve(args.base))  # registry names too
    result = finetune(base, args.train, args.val, settings, args.out,
                      resume=not args.no_resume, progress=not args.no_progress)
    if result.manifest and int(os.environ.get("RANK", "0")) == 0:
        m = result.manifest
        print(f"done: {m['steps']} steps, final train loss {m['step_losses'][-1]['loss']:.4f}, "
              f"val loss {m['val_loss']}, {m['wall_seconds']:.1f} s -> {result.path}", file=sys.stderr)


if __name__ == "__main__":
    main()
