"""The decoder of a causal LM taken apart: its parts, a forward in two pieces, shared prefixes.

Training on cached lower layers (:mod:`selfinterp.training.finetune`) and scoring many prompts that begin
alike (:mod:`selfinterp.backends.hf`) both run a transformers decoder layer by layer rather than
through its ``forward``. Everything that depends on the decoder's anatomy lives here:

1. :func:`backbone` / :func:`lm_head` / :func:`head` - the parts of an HF or peft causal LM.
2. :func:`lower_hidden` / :func:`top_hidden` / :func:`top_logits` - the layers below and from a
   split point, as the model's own forward runs them (checked by :func:`check_split`).
3. :func:`prefix_groups` / :func:`lower_hidden_shared` / :func:`top_hidden_shared` /
   :func:`last_hidden_shared` - prompts
   that share a prefix (one scenario's system prompt, instruction and question): the prefix runs
   once, each prompt only its own suffix, attending to the prefix's keys and values. Exact under
   causal attention (tests compare with a plain forward within 1e-5 in float32).

Supported: Llama/Qwen2-style decoders (``model.model.{embed_tokens, layers, rotary_emb, norm}``);
shared prefixes only with one full-attention type and sdpa or eager attention
(:func:`prefix_supported`); anything else is refused with a message, never approximated.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Sequence

import torch
import torch.nn as nn

def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``, ``Qwen2Model``...) inside an HF or peft causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    for name in ("layers", "rotary_emb", "norm", "embed_tokens"):
        if inner is None or not hasattr(inner, name):
            raise NotImplementedError(
                f"{type(base).__name__}: training on cached lower layers supports Llama/Qwen2-style "
                "decoders (model.model.{embed_tokens, layers, rotary_emb, norm}: Llama, Qwen2/3, Mistral, "
                "Gemma 2/3); "
                "use cache_lower_layers=False for this architecture")
    return inner


def lm_head(model: nn.Module) -> nn.Module:
    """The output layer (the lm_head) of an HF or peft causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def n_layers(model: nn.Module) -> int:
    """The number of decoder layers of an HF or peft causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.config.num_hidden_layers)


def _run_layers(stack: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                start: int, stop: int) -> torch.Tensor:
    """Decoder layers [start, stop) on right-padded hidden states, as the model's forward runs them.

    Mirrors the forward of the Llama/Qwen2/Qwen3/Mistral/Gemma 2-3 decoders in transformers 5:
    absolute positions 0..T-1 (right padding), one causal mask per attention type (full or
    sliding window), rotary embeddings shared by all layers or one per attention type (Gemma 3).
    Anything else is caught by the check on the first cached batch (:func:`check_split`).
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = stack.config
    # Models without `layer_types` (Llama, Mistral) use one attention type for every layer.
    default_type = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    layer_types = getattr(config, "layer_types", None) or [default_type] * config.num_hidden_layers
    types = sorted(set(layer_types[start:stop]))
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise NotImplementedError(f"attention types {sorted(unknown)} are not supported by the lower-layer cache")

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    # No KV cache here; transformers 5.2x renamed the argument past_key_values -> cache (the old
    # name warns until it is removed), so pass whichever this version takes.
    mask_cache = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    layer_cache = ("cache" if start < stop and "cache" in inspect.signature(stack.layers[start].forward).parameters
                   else "past_key_values")
    kw = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
              **{mask_cache: None})
    make_mask = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {t: make_mask[t](**kw) for t in types}
    if "layer_type" in inspect.signature(stack.rotary_emb.forward).parameters:
        rotary = {t: stack.rotary_emb(hidden, position_ids, t) for t in types}
    else:
        shared = stack.rotary_emb(hidden, position_ids)
        rotary = {t: shared for t in types}
    for i in range(start, stop):
        t = layer_types[i]
        hidden = stack.layers[i](hidden, attention_mask=masks[t], position_ids=position_ids,
                                    position_embeddings=rotary[t], use_cache=False, **{layer_cache: None})
    return hidden


def lower_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 first_trained: int) -> torch.Tensor:
    """The hidden state entering decoder layer ``first_trained`` (what the cache stores)."""
    stack = backbone(model)
    return _run_layers(stack, stack.embed_tokens(input_ids), attention_mask, 0, first_trained)


def top_hidden(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
               first_trained: int) -> torch.Tensor:
    """Final (normed) hidden states from the input of layer ``first_trained``."""
    stack = backbone(model)
    hidden = _run_layers(stack, hidden, attention_mask, first_trained, len(stack.layers))
    return stack.norm(hidden)


def head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states, as the causal LM computes them (incl. Gemma 2's soft cap)."""
    logits = lm_head(model)(hidden)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cap = getattr(base.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def top_logits(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
               first_trained: int) -> torch.Tensor:
    """Logits at every position from cached lower-layer hidden states."""
    return head(model, top_hidden(model, hidden, attention_mask, first_trained))


def decoder_stack(model: nn.Module) -> nn.Module:
    """The decoder stack for the uncached path (any HF causal LM, not only Llama/Qwen2-style)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model


# Shared prompt prefixes. Every prompt of a scenario starts with the same ~95 tokens (system
# prompt, instruction, question); causal attention makes their hidden states independent of what
# follows, so the frozen layers run them once per group and only each prompt's suffix after it.


def prefix_groups(prompts: Sequence[Sequence[int]], tokenizer: Any, min_prefix: int = 8) -> list[tuple[int, list[int]]]:
    """(shared prefix length, prompt indices) for groups of prompts (token ids) that share a prefix.

    The prompts are cut into lines (at tokens that end with a line break) and put in a trie of
    lines; each node is a prefix shared by its examples. Grouping picks the nodes that save the
    most computation, (examples - 1) x tokens, by dynamic programming over the trie (one
    scenario's question, not just the system prompt, nor each value of its first attribute). The
    length returned is the group's true common prefix, so any grouping is exact.
    """
    n = len(prompts)
    ids = [list(p) for p in prompts]
    newline_end: dict[int, bool] = {}

    def cuts(seq: list[int]) -> list[int]:
        out = []
        for j, t in enumerate(seq[:-1]):  # a cut before the last prompt token leaves a suffix
            if t not in newline_end:
                newline_end[t] = tokenizer.decode([t]).endswith("\n")
            if newline_end[t]:
                out.append(j + 1)
        return out

    # The trie: node -> (token length, examples through it, children); node ids by (parent, line).
    length, members, children = [0], [list(range(n))], [dict()]
    for i, seq in enumerate(ids):
        node, prev = 0, 0
        for c in cuts(seq):
            line = tuple(seq[prev:c])
            child = children[node].get(line)
            if child is None:
                child = len(length)
                children[node][line] = child
                length.append(c)
                members.append([])
                children.append({})
            members[child].append(i)
            node, prev = child, c

    def best(node: int) -> tuple[int, list[int]]:  # (tokens saved, chosen nodes) in this subtree
        # Each group also costs a prefix pass and a partly filled batch: ~64 tokens' worth.
        here = (len(members[node]) - 1) * length[node] - 64 if length[node] >= min_prefix else 0
        below, chosen = 0, []
        for child in children[node].values():
            if len(members[child]) > 1:
                v, c = best(child)
                below, chosen = below + v, chosen + c
        return (here, [node]) if here >= below and here > 0 else (below, chosen)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    _, nodes = best(0)
    out, grouped = [], set()
    for node in nodes:
        group = members[node]
        p = None
        for i in group[1:]:  # the group's true common prefix (at least the node's lines)
            k = length[node]  # each member agrees with the first up to the node, maybe further
            while k < len(ids[i]) - 1 and k < len(ids[group[0]]) - 1 and ids[i][k] == ids[group[0]][k]:
                k += 1
            p = k if p is None else min(p, k)
        out.append((p, group))
        grouped.update(group)
    out += [(0, [i]) for i in range(n) if i not in grouped]
    return out


class _PrefixKV:
    """A stand-in for a transformers Cache inside attention: in "store" mode it keeps each layer's
    keys/values of one prefix; in "read" mode it puts them before a batch of suffixes' own."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reading = False

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        if not self.reading:
            self.kv[layer_idx] = (k, v)
            return k, v
        pk, pv = self.kv[layer_idx]
        b = k.shape[0]
        return torch.cat([pk.expand(b, -1, -1, -1), k.to(pk.dtype)], 2), torch.cat([pv.expand(b, -1, -1, -1), v.to(pv.dtype)], 2)


def attn_impl(stack: nn.Module) -> str:
    """The attention implementation of a decoder stack ("eager" when unset)."""
    return getattr(stack.config, "_attn_implementation", None) or "eager"


def prefix_supported(stack: nn.Module) -> bool:
    """Shared prefixes are run with one causal mask and one rotary table for all layers."""
    config = stack.config
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (types == {"full_attention"} and attn_impl(stack) in ("sdpa", "eager") and not getattr(config, "sliding_window", None)
            and "layer_type" not in inspect.signature(stack.rotary_emb.forward).parameters)


def _run_shared(stack: nn.Module, layers: Sequence[nn.Module], h: torch.Tensor,
                g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``layers`` on one prefix's hidden states h (1, P, H), then on a batch of right-padded
    suffixes g (B, S, H) that attend to the prefix's keys and values (positions P..P+S-1).
    Differentiable: in training the prefix runs once per batch and its gradient collects every
    suffix's share."""
    dev = h.device
    P, (B, S) = h.shape[1], g.shape[:2]
    name = "cache" if "cache" in inspect.signature(layers[0].forward).parameters else "past_key_values"
    pos_p = torch.arange(P, device=dev)[None]
    pos_s = (P + torch.arange(S, device=dev))[None].expand(B, -1)
    pe_p, pe_s = stack.rotary_emb(h, pos_p), stack.rotary_emb(g, pos_s)
    causal = torch.tril(torch.ones(S, S, dtype=torch.bool, device=dev))
    m_p = torch.tril(torch.ones(P, P, dtype=torch.bool, device=dev))[None, None]
    m_s = torch.cat([torch.ones(B, S, P, dtype=torch.bool, device=dev), causal[None].expand(B, -1, -1)], 2)[:, None]
    if attn_impl(stack) == "eager":  # eager attention adds its mask to the scores: 0 / -inf, not True / False
        m_p, m_s = (torch.zeros(m.shape, dtype=h.dtype, device=dev).masked_fill(~m, torch.finfo(h.dtype).min)
                    for m in (m_p, m_s))
    kv = _PrefixKV()
    for layer in layers:
        h = layer(h, attention_mask=m_p, position_ids=pos_p, position_embeddings=pe_p, use_cache=True, **{name: kv})
    kv.reading = True
    for layer in layers:
        g = layer(g, attention_mask=m_s, position_ids=pos_s, position_embeddings=pe_s, use_cache=True, **{name: kv})
    return h, g


def lower_hidden_shared(model: nn.Module, prefix: torch.Tensor, suffixes: torch.Tensor, first_trained: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states entering layer ``first_trained`` for one prefix (1, P) of token ids and a
    batch of right-padded suffixes (B, S): (prefix (P, H), suffixes (B, S, H))."""
    stack = backbone(model)
    h, g = stack.embed_tokens(prefix), stack.embed_tokens(suffixes)
    if first_trained == 0:
        return h[0], g
    h, g = _run_shared(stack, stack.layers[:first_trained], h, g)
    return h[0], g


def top_hidden_shared(model: nn.Module, prefix: torch.Tensor, suffixes: torch.Tensor,
                      first_trained: int) -> torch.Tensor:
    """Final (normed) hidden states (B, S, H) of right-padded suffixes from the input of layer
    ``first_trained``: one prefix's states (P, H) and the suffixes' (B, S, H), as a plain
    :func:`top_hidden` of prefix + suffix gives them at the suffix positions."""
    stack = backbone(model)
    _, g = _run_shared(stack, stack.layers[first_trained:], prefix[None], suffixes)
    return stack.norm(g)


def check_split(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, first: int) -> None:
    """Raise NotImplementedError unless the layers from ``first`` on ``h`` reproduce the model's forward."""
    full = decoder_stack(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    split = top_hidden(model, h, mask, first)
    real = mask.bool()
    err = (full[real] - split[real]).abs().max().item()
    scale = full[real].abs().max().item()
    if not err <= 1e-3 * max(scale, 1.0):
        raise NotImplementedError(
            f"{type(model).__name__}: running the decoder in two parts does not reproduce its forward "
            f"(max difference {err:.3g}); the lower-layer cache does not support this architecture")


def last_hidden_shared(model: nn.Module, prefix: torch.Tensor, suffixes: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states (B, H) at each suffix's last real token, for one prefix (1, P)
    and right-padded suffixes (B, S) of ``lengths`` real tokens: what a plain forward of
    prefix + suffix gives at its last position."""
    _, h = lower_hidden_shared(model, prefix, suffixes, n_layers(model))
    rows = torch.arange(len(lengths), device=h.device)
    return backbone(model).norm(h[rows, lengths.to(h.device) - 1])
