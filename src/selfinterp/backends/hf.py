"""The transformers backend: CPU-first, CUDA automatically when present.

Measuring a choice is one forward pass: the prompt, rendered by the model's own chat template
up to where the assistant's answer begins, then the probabilities of the tokens "A" and "B" at
that position. Prompts are batched with LEFT padding, so that the last position of every row is
the answer position, with position ids counted from each row's first real token, so a prompt's
P(A) does not depend on what it is batched with (checked by a test to < 1e-4 in float32). Only
the last position's logits are computed (``logits_to_keep=1``).

Self-reports are generated greedily (or sampled, seeded), stopping at the end of the first
JSON object; or, in the *constrained* mode, the backend writes the JSON skeleton and the model
only picks the numbers (see :class:`_ReportFiller`).

Defaults: float32 on CPU (bf16 moves P(A) by up to 0.05 on CPU), bf16 on GPU. Whatever the
model's dtype, its output layer (the lm_head) runs in float32 (``head_dtype``): in bfloat16, logits
of 15-30 are rounded to steps of 0.125, which alone moves P(A) by up to ~0.03; a float32 head costs
one matrix product per step (only the last position's logits are computed) and halved bfloat16's
P(A) error on 128 prompts (max 0.044 -> 0.020 against float32; ``benchmarks/bench_vllm.md``).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList, StoppingCriteria, StoppingCriteriaList)

from .. import decoder, modelref, models, prompts
from ..chat_template import ANSWER_LETTERS, answer_token_ids, encode, render, supports_system
from .base import (WEIGHT_MAX, WEIGHT_MIN, ChoiceProbs, Messages, SelfReport, call_seeds,
                   json_object_end)

def pick_device(device: str = "auto") -> torch.device:
    """The device named, or for "auto" CUDA when available and the CPU otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """The torch dtype named (or given); "auto" is bfloat16 on CUDA and float32 otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    try:
        return modelref.torch_dtype(dtype)
    except ValueError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _head_in(model: Any, dtype: torch.dtype) -> bool:
    """Compute ``model``'s output layer in ``dtype``: the lm_head's forward is replaced by the
    same product with a copy of its weights in ``dtype``, made once (the backend never trains its
    model; casting per call would copy a 545M-parameter head on every decode step of a 7B model,
    and running the original head first would compute it twice). False, and nothing changed,
    when the output layer is not a plain Linear (e.g. wrapped by a LoRA adapter on the lm_head)."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return False
    weight = head.weight.detach().to(dtype)
    bias = None if head.bias is None else head.bias.detach().to(dtype)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.to(dtype), weight, bias)

    head.forward = forward
    return True


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: little padding, and a
    too-large batch fails at once rather than at the end)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


class HFBackend:
    """A causal LM from transformers (optionally with a peft adapter) behind the backend protocol."""

    def __init__(self, model: str = models.DEFAULT_MODEL, adapter: str | None = None, device: str = "auto",
                 dtype: str | torch.dtype = "auto", batch_size: int = 16, progress: bool = True,
                 head_dtype: str = "float32", share_prefix: bool = True):
        self.model_name = str(model)
        self.adapter = str(adapter) if adapter else None
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.progress = progress
        self.share_prefix = share_prefix
        path = models.resolve(model)
        net, self.tokenizer = self._load(path)
        self.tokenizer.padding_side = "left"  # the answer position is the last column of every row
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = net.to(self.device).eval()
        self.head_dtype = self.dtype if head_dtype == "model" else pick_dtype(head_dtype, self.device)
        if self.head_dtype != self.dtype and not _head_in(self.model, self.head_dtype):
            self.head_dtype = self.dtype  # recorded in info: this model's head stays in its dtype

        self.system_role = supports_system(self.tokenizer)
        probe = self.render(prompts.chat("Respond with A or B."))
        self.answer_ids = answer_token_ids(self.tokenizer, probe)
        self._number_vocab: NumberVocab | None = None  # built on the first constrained report
        self._tree: NumberTree | None = None  # built on the first expected-value report
        self.info: dict[str, Any] = {
            "backend": "hf",
            "model": self.model_name,
            "path": str(path),
            "adapter": self.adapter,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "head_dtype": str(self.head_dtype).removeprefix("torch."),
            # Templates without a system role get the system prompt folded into the first user turn.
            "folded_system": not self.system_role,
            # Choices scored with each group's shared prompt prefix run once (exact; decoder.py).
            "shared_prefix_scoring": self._prefix_ok(),
            "answer_tokens": dict(zip(ANSWER_LETTERS, self.answer_ids)),
            "manifest": models.read_manifest(self.model_name) if self.model_name in models.REGISTRY else None,
        }

    @classmethod
    def around(cls, model: Any, tokenizer: Any, batch_size: int = 16) -> "HFBackend":
        """A backend for a model already in memory (e.g. one in training, for reports at its
        evaluations): no loading, no head hook, the model's own device and dtype; the tokenizer is
        a copy, so its padding side and pad token are not changed for its owner."""
        import copy

        self = cls.__new__(cls)
        self.model_name, self.adapter = "in-memory", None
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.head_dtype = self.dtype
        self.batch_size, self.progress, self.share_prefix = batch_size, False, True
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model
        self.system_role = supports_system(self.tokenizer)
        self.answer_ids = answer_token_ids(self.tokenizer, self.render(prompts.chat("Respond with A or B.")))
        self._number_vocab, self._tree = None, None
        self.info = {"backend": "hf", "model": "in-memory", "device": str(self.device)}
        return self

    def _load(self, path: Path | str) -> tuple[Any, Any]:
        """(model, tokenizer): the base model, plus the adapter if any. An adapter is a peft
        adapter directory, or an output directory of :func:`selfinterp.training.finetune.finetune`
        (LoRA or full fine-tuning; loaded by that module, onto the base its manifest names)."""
        adapter = Path(self.adapter) if self.adapter else None
        if adapter is not None and not modelref.is_peft_adapter(adapter):
            return modelref.load_finetuned(adapter, dtype=str(self.dtype).removeprefix("torch."))
        tok = AutoTokenizer.from_pretrained(path)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        if adapter is not None:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, str(adapter))
        return net, tok

    # ---------------------------------------------------------------------------------------
    # Shared plumbing

    def render(self, chat: Messages) -> str:
        """The chat as the model's template writes it, up to where the assistant's answer begins."""
        return render(self.tokenizer, chat, add_generation_prompt=True, system_role=self.system_role).text

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    @contextmanager
    def _progress(self, what: str, total: int) -> Iterator[Callable[[int], None]]:
        """A rich progress bar with counts on stderr, for more than one batch (unless silenced)."""
        if not self.progress or total <= self.batch_size:
            yield lambda n: None
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(what, total=total)
            yield lambda n: bar.advance(task, n)

    # ---------------------------------------------------------------------------------------
    # Choices

    def _prefix_ok(self) -> bool:
        if not self.share_prefix:
            return False
        try:
            return decoder.prefix_supported(decoder.backbone(self.model))
        except NotImplementedError:  # not a Llama/Qwen2-style decoder: the plain forward
            return False

    @torch.inference_mode()
    def choice_probs(self, chats: Sequence[Messages]) -> ChoiceProbs:
        """P(A) renormalised over {A, B}, and the raw P(A) + P(B), at the first answer position.

        Prompts that share a prefix (a scenario's system prompt, instruction and question) run it
        once per group and then only their own suffixes (``share_prefix``; exact, decoder.py);
        prompts that share nothing, and models whose decoder is not supported, run whole."""
        ids = encode(self.tokenizer, [self.render(c) for c in chats])
        p_a, mass = np.zeros(len(ids)), np.zeros(len(ids))
        a, b = self.answer_ids

        def record(batch: Sequence[int], logits: torch.Tensor) -> None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            la, lb = logp[:, a], logp[:, b]
            p_a[batch] = torch.sigmoid(la - lb).cpu().numpy()  # = P(A) / (P(A) + P(B)), stably
            mass[batch] = (la.exp() + lb.exp()).cpu().numpy()
            advance(len(batch))

        groups = decoder.prefix_groups(ids, self.tokenizer) if self._prefix_ok() and len(ids) > 1 else [(0, list(range(len(ids))))]
        alone = [i for p, members in groups if not p for i in members]
        with self._progress("scoring choices", len(ids)) as advance:
            for p, members in groups:
                if not p:
                    continue
                prefix = torch.tensor([ids[members[0]][:p]], device=self.device)
                members = sorted(members, key=lambda i: len(ids[i]))
                for s in range(0, len(members), self.batch_size):  # suffixes are short: one batch's worth
                    batch = members[s: s + self.batch_size]
                    lens = torch.tensor([len(ids[i]) - p for i in batch])
                    suffixes = torch.full((len(batch), int(lens.max())), self.tokenizer.pad_token_id, dtype=torch.long)
                    for j, i in enumerate(batch):
                        suffixes[j, : lens[j]] = torch.tensor(ids[i][p:])
                    h = decoder.last_hidden_shared(self.model, prefix, suffixes.to(self.device), lens)
                    record(batch, decoder.head(self.model, h))
            for batch in _length_batches([len(ids[i]) for i in alone], self.batch_size):
                batch = [alone[j] for j in batch]
                input_ids, mask = self._pad([ids[i] for i in batch])
                # Positions count from each row's first real token, as they would unpadded (RoPE
                # models do not care about the shift, models with absolute positions do).
                positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 logits_to_keep=1, use_cache=False)
                record(batch, out.logits[:, -1, :])
        return ChoiceProbs(p_a=p_a, mass=mass)

    # ---------------------------------------------------------------------------------------
    # Free generation

    def _generation_config(self, max_new_tokens: int, temperature: float, top_p: float,
                           eos_token_id: int | list[int] | None = None) -> GenerationConfig:
        # A fresh config, so defaults shipped with a model (sampling, penalties) never leak in.
        sample = temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
            eos_token_id=eos_token_id if eos_token_id is not None else self.model.generation_config.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    @torch.inference_mode()
    def generate(self, chats: Sequence[Messages], max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int | Sequence[int] = 0, top_p: float = 1.0, stop_at_json: bool = True,
                 logits_processor: Sequence[LogitsProcessor] = ()) -> list[str]:
        """Replies to the chats: greedy by default, seeded sampling when ``temperature > 0``.

        Sampling draws from one generator per chat (:class:`_RowSampler`), seeded by ``seed``: one
        seed per chat, or an int (seed + index); so a chat's reply depends on its own seed, not on
        the chats it is batched with.

        With ``stop_at_json`` a row stops at the end of its first balanced JSON object (and the
        text is cut there), otherwise at EOS or ``max_new_tokens``. ``logits_processor`` is
        passed to transformers (e.g. to ban tokens); it is created per call, so it sees each
        batch from its first step.
        """
        seeds = call_seeds(seed, len(chats))
        ids = encode(self.tokenizer, [self.render(c) for c in chats])
        texts = [""] * len(ids)
        config = self._generation_config(max_new_tokens, 0.0, top_p)  # sampling, if any, is _RowSampler's
        with self._progress("generating", len(ids)) as advance:
            for batch in _length_batches([len(x) for x in ids], self.batch_size):
                input_ids, mask = self._pad([ids[i] for i in batch])
                prompt_len = input_ids.shape[1]
                stops = StoppingCriteriaList([_JsonObjectStop(self.tokenizer, prompt_len)] if stop_at_json else [])
                sampler = [_RowSampler([seeds[i] for i in batch], temperature, top_p)] if temperature > 0 else []
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                          stopping_criteria=stops,
                                          logits_processor=LogitsProcessorList(list(logits_processor) + sampler))
                for row, i in enumerate(batch):
                    text = self.tokenizer.decode(out[row, prompt_len:], skip_special_tokens=True)
                    end = json_object_end(text) if stop_at_json else None
                    texts[i] = text[:end] if end is not None else text
                advance(len(batch))
        return texts

    # ---------------------------------------------------------------------------------------
    # Constrained self-reports

    def number_vocab(self) -> "NumberVocab":
        """The tokens that may write a number slot of a constrained report (built once)."""
        if self._number_vocab is None:
            self._number_vocab = _number_vocab(self.tokenizer)
        return self._number_vocab

    @torch.inference_mode()
    def constrained_reports(self, chats: Sequence[Messages], attribute_names_per_chat: Sequence[Sequence[str]],
                            temperature: float = 0.0, seed: int | Sequence[int] = 0) -> list[SelfReport]:
        """Self-reports in the constrained mode: ``{"name1": <n>, ...}`` with only the numbers chosen
        by the model (integers in [-100, 100], greedily by default), so every reply parses.
        Sampled (``temperature > 0``) with one generator per chat, as in :meth:`generate`.

        ``text`` is the filled template as canonical JSON (the model's numbers; spacing normalised).
        """
        if len(chats) != len(attribute_names_per_chat):
            raise ValueError(f"{len(chats)} chats but {len(attribute_names_per_chat)} lists of attribute names")
        ids = encode(self.tokenizer, [self.render(c) for c in chats])
        eos = self.tokenizer.eos_token_id
        plans = [_report_plan(self.tokenizer, names) for names in attribute_names_per_chat]
        reports: list[SelfReport | None] = [None] * len(ids)
        vocab = self.number_vocab()
        seeds = call_seeds(seed, len(chats))
        with self._progress("constrained reports", len(ids)) as advance:
            for batch in _length_batches([len(x) for x in ids], self.batch_size):
                input_ids, mask = self._pad([ids[i] for i in batch])
                filler = _ReportFiller([plans[i] for i in batch], vocab, input_ids.shape[1], eos)
                config = self._generation_config(filler.max_new_tokens, 0.0, 1.0, eos_token_id=eos)
                sampler = [_RowSampler([seeds[i] for i in batch], temperature, 1.0)] if temperature > 0 else []
                self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                    logits_processor=LogitsProcessorList([filler] + sampler))
                for row, i in enumerate(batch):
                    names = list(attribute_names_per_chat[i])
                    values = filler.values(row)
                    weights = {n: max(WEIGHT_MIN, min(WEIGHT_MAX, v)) for n, v in zip(names, values)}
                    reports[i] = SelfReport(text=json.dumps(weights, ensure_ascii=False), weights=weights, mode="constrained")
                advance(len(batch))
        return [r for r in reports if r is not None]

    @torch.inference_mode()
    def expected_reports(self, chats: Sequence[Messages],
                         attribute_names_per_chat: Sequence[Sequence[str]]) -> list[SelfReport]:
        """Self-reports in the *expected-value* mode: the constrained template, and for each number
        slot the model's whole distribution over the integers -100..100, reported as its mean (SD
        beside it). A number's probability is the product of the constrained next-token
        probabilities along its tokens, summed over every tokenisation that writes it; the slot is
        then filled with the most probable number (along its most probable tokens) before the next
        slot is read. No sampling: a report is a function of its prompt.

        Each slot costs one forward of the prompt so far plus one short row per branching node of
        the number tree (about 50 rows of <= 5 tokens for SmolLM2's tokenizer), using the shared
        prefix (decoder.py) where the model supports it.
        """
        if len(chats) != len(attribute_names_per_chat):
            raise ValueError(f"{len(chats)} chats but {len(attribute_names_per_chat)} lists of attribute names")
        ids = encode(self.tokenizer, [self.render(c) for c in chats])
        tree = self._number_tree()
        reports = []
        with self._progress("expected-value reports", len(ids)) as advance:
            for prompt, names in zip(ids, attribute_names_per_chat):
                plan = _report_plan(self.tokenizer, names)
                context = list(prompt)
                means, sds = {}, {}
                for j, name in enumerate(names):
                    context += plan[2 * j]  # '{"name":' or ', "name":'
                    end = plan[2 * j + 2][0]  # the token that closes the number
                    dist = tree.distribution(self._branch_logits(context, tree.branch_paths), end)
                    means[name], sds[name] = dist.mean, dist.sd
                    context += list(dist.mode_path)
                text = json.dumps({n: round(v, 4) for n, v in means.items()}, ensure_ascii=False)
                reports.append(SelfReport(text=text, weights=means, mode="expected", sd=sds))
                advance(1)
        return reports

    def _number_tree(self) -> "NumberTree":
        if self._tree is None:
            self._tree = NumberTree.build(self.number_vocab())
        return self._tree

    def _branch_logits(self, context: list[int], paths: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """Next-token logits (len(paths), V) after ``context`` + each path."""
        rows = [[context[-1], *p] for p in paths]  # every row ends where its logits are read
        lens = torch.tensor([len(r) for r in rows])
        suffixes = torch.full((len(rows), int(lens.max())), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            suffixes[i, : len(r)] = torch.tensor(r)
        if self._prefix_ok():
            prefix = torch.tensor([context[:-1]], device=self.device)
            h = decoder.last_hidden_shared(self.model, prefix, suffixes.to(self.device), lens)
            return decoder.head(self.model, h).float()
        out = []  # plain forwards of context + path, right-padded (causal: padding comes after)
        head = torch.tensor(context[:-1], dtype=torch.long).expand(len(rows), -1)
        full = torch.cat([head, suffixes], 1)
        for s in range(0, len(rows), self.batch_size):
            batch = full[s: s + self.batch_size].to(self.device)
            logits = self.model(input_ids=batch, use_cache=False).logits
            last = (len(context) - 1 + lens[s: s + self.batch_size] - 1).to(self.device)
            out.append(logits[torch.arange(len(batch), device=self.device), last].float())
        return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Sampling with a generator per row


class _RowSampler(LogitsProcessor):
    """Sampling at ``temperature`` (and nucleus ``top_p``) with one random generator per row, by
    the Gumbel-max trick: the argmax of logits / T plus Gumbel noise is a sample from
    softmax(logits / T). Decoding is then greedy, and each row's noise comes from its own seeded
    generator, so a row's sample depends on its seed only, never on its batch (transformers'
    own sampling draws for the whole batch from one global generator). Runs last, after any
    processor that masks tokens."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float = 1.0):
        self.generators = [torch.Generator().manual_seed(int(s) % (1 << 63)) for s in seeds]
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            order = torch.argsort(scores, dim=-1, descending=True)
            sorted_scores = scores.gather(-1, order)
            before = torch.softmax(sorted_scores, dim=-1).cumsum(-1) - torch.softmax(sorted_scores, dim=-1)
            drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, before >= self.top_p)
            scores = scores.masked_fill(drop, float("-inf"))
        vocab = scores.shape[-1]
        noise = torch.stack([-torch.empty(vocab).exponential_(generator=g).clamp_min(1e-30).log()
                             for g in self.generators])
        return scores + noise.to(scores.device)


# --------------------------------------------------------------------------------------------
# Stopping at the end of a JSON object


class _JsonObjectStop(StoppingCriteria):
    """Per row: done once the generated text contains a balanced JSON object."""

    def __init__(self, tokenizer: Any, prompt_len: int):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in range(input_ids.shape[0]):
            # Only a token containing "}" can close the object: decode the whole reply only then.
            if self.done[row] or "}" not in self.tokenizer.decode(input_ids[row, -1:]):
                continue
            text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
            self.done[row] = json_object_end(text) is not None
        return self.done.clone()


# --------------------------------------------------------------------------------------------
# Constrained reports: the backend writes the JSON, the model writes the numbers
#
# A report is a plan of segments: forced text ('{"name1":'), a number slot, forced text
# (', "name2":'), ..., forced '}', then EOS. A logits processor masks every token except the
# next forced one, or, in a number slot, the tokens that keep the slot a prefix of a valid
# number: an optional space, then an integer in [-100, 100] without leading zeros. A slot may end
# (by taking the next forced token) as soon as it holds a valid number. The model's own logits
# choose among the allowed tokens, so the numbers are its answer, and every reply parses.

VALID_NUMBERS = frozenset(p + str(i) for i in range(WEIGHT_MIN, WEIGHT_MAX + 1) for p in ("", " "))
NUMBER_PREFIXES = frozenset(s[:j] for s in VALID_NUMBERS for j in range(len(s) + 1))  # includes ""


def _token_texts(tokenizer: Any, ids: Sequence[int]) -> dict[int, str]:
    """The text each token adds after a ':' (decoding in context keeps leading spaces that
    sentencepiece tokenizers drop when a token is decoded alone)."""
    anchor = encode(tokenizer, [":"])[0]
    head = tokenizer.decode(anchor)
    return {i: tokenizer.decode(anchor + [i])[len(head):] for i in ids}


@dataclass(frozen=True)
class NumberVocab:
    """The tokens a number slot may use: the text each writes, and those that extend each slot prefix."""

    texts: dict[int, str]  # token id -> the text it writes, for tokens made of ' ', '-' and digits
    transitions: dict[str, list[int]]  # slot prefix -> token ids that extend it to a valid prefix


def _number_vocab(tokenizer: Any) -> NumberVocab:
    """The tokens a number slot may use, from a scan of the vocabulary."""
    chars = set(" -0123456789")
    candidates = []
    for i, raw in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        s = (raw or "").replace("Ġ", " ").replace("▁", " ")
        if s and set(s) <= chars:
            candidates.append(i)
    texts = {i: t for i, t in _token_texts(tokenizer, candidates).items() if t and set(t) <= chars}
    transitions = {p: [i for i, t in texts.items() if p + t in NUMBER_PREFIXES] for p in NUMBER_PREFIXES}
    if not transitions[""]:
        raise ValueError("the tokenizer has no digit tokens: constrained reports are impossible")
    return NumberVocab(texts=texts, transitions=transitions)


@dataclass(frozen=True)
class SlotDistribution:
    """One number slot's distribution over the valid numbers: probabilities, mean, SD and mode."""

    probs: dict[int, float]  # number -> probability (sums to 1)
    mean: float
    sd: float
    mode: int
    mode_path: tuple[int, ...]  # the most probable tokens that write the mode, closing token excluded


@dataclass(frozen=True)
class NumberTree:
    """Every token path that writes a valid number slot (a prefix of " -100".."100"), as a tree.

    Node i has ``text[i]`` (what its path wrote), ``children[i]`` (token -> node) and whether its
    text is a complete number (then the slot's closing token may follow). Only nodes with two or
    more ways on need the model's logits (``branch``); the others continue with probability 1.
    """

    paths: list[tuple[int, ...]]
    text: list[str]
    children: list[dict[int, int]]
    branch: list[int]  # nodes that need logits, in the order of branch_paths

    @property
    def branch_paths(self) -> list[tuple[int, ...]]:
        """The token paths of the branching nodes, in ``branch`` order: the prefixes that need logits."""
        return [self.paths[i] for i in self.branch]

    @classmethod
    def build(cls, vocab: NumberVocab) -> "NumberTree":
        """The tree of every token path that writes a valid number with this vocabulary."""
        paths, text, children = [()], [""], [{}]
        i = 0
        while i < len(paths):  # breadth first; a slot's text only grows, so this ends
            for t in vocab.transitions.get(text[i], []):
                children[i][t] = len(paths)
                paths.append(paths[i] + (t,))
                text.append(text[i] + vocab.texts[t])
                children.append({})
            i += 1
        branch = [i for i in range(len(paths)) if len(children[i]) + (text[i] in VALID_NUMBERS) >= 2]
        return cls(paths, text, children, branch)

    def distribution(self, logits: torch.Tensor, end: int) -> SlotDistribution:
        """The slot's distribution over numbers, from the logits at each branching node (rows in
        ``branch`` order) and the token that closes the slot; each node's options renormalised
        (the constrained mode's masking)."""
        row = {node: k for k, node in enumerate(self.branch)}
        probs: dict[int, float] = {}
        best: dict[int, tuple[float, tuple[int, ...]]] = {}
        stack = [(0, 0.0)]
        while stack:
            node, logp = stack.pop()
            options = list(self.children[node]) + ([end] if self.text[node] in VALID_NUMBERS else [])
            if node in row:
                lp = torch.log_softmax(logits[row[node], options], dim=-1).tolist()
            else:
                lp = [0.0] * len(options)
            for t, l in zip(options, lp):
                if t == end and self.text[node] in VALID_NUMBERS and t not in self.children[node]:
                    v = int(self.text[node])
                    probs[v] = probs.get(v, 0.0) + math.exp(logp + l)
                    if v not in best or logp + l > best[v][0]:
                        best[v] = (logp + l, self.paths[node])
                else:
                    stack.append((self.children[node][t], logp + l))
        total = sum(probs.values())
        probs = {v: p / total for v, p in probs.items()}
        mean = sum(v * p for v, p in probs.items())
        sd = math.sqrt(max(sum(p * (v - mean) ** 2 for v, p in probs.items()), 0.0))
        mode = max(probs, key=probs.get)
        return SlotDistribution(probs, mean, sd, mode, best[mode][1])


def _report_plan(tokenizer: Any, names: Sequence[str]) -> list[list[int] | None]:
    """The segments of one report: token ids to force, or None for a number slot."""
    plan: list[list[int] | None] = []
    for j, name in enumerate(names):
        plan.append(encode(tokenizer, [("{" if j == 0 else ", ") + json.dumps(name) + ":"])[0])
        plan.append(None)
    plan.append(encode(tokenizer, ["}"])[0])
    return plan


class _ReportFiller(LogitsProcessor):
    """Masks logits so that each row writes exactly its plan, choosing only the numbers."""

    MAX_NUMBER_TOKENS = 5  # " ", "-", and three digits, in the worst tokenisation

    def __init__(self, plans: Sequence[list[list[int] | None]], vocab: NumberVocab, prompt_len: int,
                 eos_id: int):
        self.plans = [list(p) for p in plans]
        self.texts, self.transitions = vocab.texts, vocab.transitions
        self.prompt_len = prompt_len
        self.eos_id = eos_id
        n = len(plans)
        self.segment = [0] * n  # index into the row's plan
        self.pos = [0] * n  # tokens already written of a forced segment
        self.buffer = [""] * n  # the current number slot's text
        self._values: list[list[int]] = [[] for _ in range(n)]
        self.max_new_tokens = max(
            sum(len(s) if s is not None else self.MAX_NUMBER_TOKENS for s in p) for p in self.plans) + 1  # EOS

    def values(self, row: int) -> list[int]:
        if self.segment[row] < len(self.plans[row]):
            raise RuntimeError("constrained report did not finish (token budget too small)")
        return self._values[row]

    def _consume(self, row: int, token: int) -> None:
        plan, k = self.plans[row], self.segment[row]
        if k >= len(plan):
            return  # finished: generate pads this row from now on
        if plan[k] is None:  # a number slot: extend it, or end it with the next forced token
            ext = self.transitions.get(self.buffer[row], [])
            if token in ext:
                self.buffer[row] += self.texts[token]
                return
            self._values[row].append(int(self.buffer[row]))
            self.buffer[row] = ""
            self.segment[row] = k = k + 1
        seg = plan[k]
        assert seg is not None and token == seg[self.pos[row]], "generation left the constrained plan"
        self.pos[row] += 1
        if self.pos[row] == len(seg):
            self.segment[row], self.pos[row] = k + 1, 0

    def _allowed(self, row: int) -> list[int]:
        plan, k = self.plans[row], self.segment[row]
        if k >= len(plan):
            return [self.eos_id]  # the report is written: end the row
        if plan[k] is not None:
            return [plan[k][self.pos[row]]]
        allowed = list(self.transitions.get(self.buffer[row], []))
        if self.buffer[row] in VALID_NUMBERS:
            allowed.append(plan[k + 1][0])  # end the number
        return allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                self._consume(row, token)
        mask = torch.full_like(scores, float("-inf"))
        for row in range(scores.shape[0]):
            mask[row, self._allowed(row)] = 0.0
        return scores + mask
