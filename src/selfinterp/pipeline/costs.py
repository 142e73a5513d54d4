"""What a run on the API costs: token estimates from the run's own prompts and the price table.

No tokenizer: about 4 characters per token, plus the chat format's overhead (good to +-20% for
English prompts like these). Needs nothing but the standard library.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..backends.base import Messages
from ..openai_client import OFFICIAL_BASE_URL, public_url

# USD per million tokens. List prices as published by OpenAI in 2025 (check before spending; a run
# overrides or extends this with `openai.prices` in its config). `ft_input`/`ft_output` are the
# prices of calling a model fine-tuned from this one; `training` is per trained token.
PRICES: dict[str, dict[str, float]] = {
    "gpt-4o-mini-2024-07-18": dict(input=0.15, output=0.60, training=3.00, ft_input=0.30, ft_output=1.20),
    "gpt-4o-2024-08-06": dict(input=2.50, output=10.00, training=25.00, ft_input=3.75, ft_output=15.00),
    "gpt-4.1-2025-04-14": dict(input=2.00, output=8.00, training=25.00, ft_input=3.00, ft_output=12.00),
    "gpt-4.1-mini-2025-04-14": dict(input=0.40, output=1.60, training=5.00, ft_input=0.80, ft_output=3.20),
    "gpt-4.1-nano-2025-04-14": dict(input=0.10, output=0.40, training=1.50, ft_input=0.20, ft_output=0.80),
}


def estimate_tokens(chat: Messages) -> int:
    """A chat's approximate token count: about 4 characters a token, plus the chat format's overhead."""
    return 3 + sum(4 + math.ceil(len(m["content"]) / 4) for m in chat)


def price_for(model: str, overrides: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, float] | None:
    """Prices (USD per million tokens) of ``model`` or its newest dated snapshot; None if unpriced."""
    table = {**PRICES, **{k: dict(v) for k, v in (overrides or {}).items()}}
    if model in table:
        return table[model]
    # a dated snapshot's alias ("gpt-4o-mini" -> the newest priced snapshot of that name)
    snapshots = sorted(k for k in table if k.startswith(model + "-") and re.fullmatch(r"\d{4}-\d{2}-\d{2}", k[len(model) + 1:]))
    return table[snapshots[-1]] if snapshots else None


ASSUMED_AUTO_EPOCHS = 3  # for estimates when n_epochs is 'auto' (the API decides from the data size)


def estimate_plan(cfg: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens and cost per stage of ``selfinterp.pipeline.plan.dry_run_rows`` rows for a run on the API (adds
    ``input_tokens``, ``output_tokens``, ``training_tokens``, ``cost`` to each row; returns totals
    and notes). Token counts come from the run's real prompts and examples (about 4 characters a
    token); prices from :data:`PRICES` overridden by ``openai.prices``."""
    from .. import design, prompts

    o = cfg.openai
    instilled, native = design.choose_scenarios(cfg.scenarios, cfg.n_instilled, cfg.n_native, cfg.seed)
    scen = instilled + native
    weights = {s.id: design.draw_weights(s, cfg.seed) for s in scen}
    dec, intro, answer = [], [], []
    for s in scen:
        p = design.sample_pairs(s, 1, cfg.seed, "estimate")[0]
        dec.append(estimate_tokens(prompts.decision_chat(s, p.a, p.b)))
        intro.append(estimate_tokens(prompts.introspection_chat(s, p.a, p.b)))
        answer.append(math.ceil(len(prompts.report_json(s, weights[s.id])) / 4) + 1)
    dec_t, intro_t, ans_t = float(np.mean(dec)), float(np.mean(intro)), float(np.mean(answer))
    report_out = min(ans_t, cfg.report_max_new_tokens)
    choice_out = o.n_samples if o.choice_method == "sample" else 1

    base_name = o.model or cfg.model
    official = public_url(o.base_url).rstrip("/") == OFFICIAL_BASE_URL
    overrides = {k: v.model_dump() for k, v in o.prices.items()}
    price = price_for(base_name, overrides) if (official or base_name in overrides) else None
    notes = []
    if price is None:
        notes.append(f"no price for {base_name!r}" + ("" if official else f" on {public_url(o.base_url)}")
                     + ": add it as openai.prices.\"" + base_name + "\" = {input = ..., output = ..., training = ...}")
    train_by_api = cfg.trainer_name == "openai"
    auto_epochs = False
    totals = {"input_tokens": 0, "output_tokens": 0, "training_tokens": 0, "cost": 0.0 if price else None}
    for r in rows:
        inp = out = trained = 0
        if r["model_calls"]:
            if r["call_kind"] == "choice":
                inp, out = r["model_calls"] * dec_t, r["model_calls"] * choice_out
            else:
                inp, out = r["model_calls"] * intro_t, r["model_calls"] * report_out
        if r["training_examples"] and train_by_api:
            per = dec_t + 1 if r["stage"] == "instill" else intro_t + ans_t
            settings = cfg.instill if r["stage"] == "instill" else cfg.introspection
            epochs = settings.epochs if o.n_epochs is None else o.n_epochs
            if epochs == "auto":
                auto_epochs, epochs = True, ASSUMED_AUTO_EPOCHS
            r["epochs"] = epochs
            trained = r["training_examples"] * per * epochs
        cost = None
        if price:
            fine_tuned = r["stage"] != "reports_base"
            pin = price.get("ft_input") if fine_tuned and price.get("ft_input") is not None else price["input"]
            pout = price.get("ft_output") if fine_tuned and price.get("ft_output") is not None else price["output"]
            cost = (inp * pin + out * pout + trained * price.get("training", 0.0)) / 1e6
            totals["cost"] += cost
        r.update(input_tokens=int(round(inp)), output_tokens=int(round(out)), training_tokens=int(round(trained)),
                 cost=cost)
        for k in ("input_tokens", "output_tokens", "training_tokens"):
            totals[k] += r[k]
    if auto_epochs:
        notes.append(f"n_epochs = 'auto': training tokens assume {ASSUMED_AUTO_EPOCHS} epochs")
    if not train_by_api:
        notes.append(f"fine-tuning by trainer {cfg.trainer_name!r}: no API training cost")
    notes.append(f"tokens estimated at ~4 characters each (prompts {dec_t:.0f} / {intro_t:.0f} tokens, reports "
                 f"{report_out:.0f}); prices in USD per 1M tokens "
                 + (f"for {base_name}: {price}" if price else "unknown") + "; check current prices before spending")
    return {"totals": totals, "notes": notes, "model": base_name, "price": price}


def spent(run_dir: str | Path, cfg: Any) -> dict[str, Any]:
    """What a run has used on the API so far, from its own records: tokens per stage (from the
    responses in ``raw/api/``), trained tokens (from the jobs' manifests), and their cost at the
    run's prices (None where there is no price)."""
    root = Path(run_dir)
    o = cfg.openai
    base_name = o.model or cfg.model
    official = public_url(o.base_url).rstrip("/") == OFFICIAL_BASE_URL
    overrides = {k: v.model_dump() for k, v in o.prices.items()}
    price = price_for(base_name, overrides) if (official or base_name in overrides) else None
    stages: dict[str, dict[str, Any]] = {}
    for path in sorted((root / "raw" / "api").glob("*.jsonl")):
        row = stages.setdefault(path.stem, {"requests": 0, "input_tokens": 0, "output_tokens": 0, "training_tokens": 0})
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                usage = json.loads(line)["response"].get("usage") or {}
            except (json.JSONDecodeError, KeyError, AttributeError):
                continue
            row["requests"] += 1
            row["input_tokens"] += usage.get("prompt_tokens") or 0
            row["output_tokens"] += usage.get("completion_tokens") or 0
    for path in sorted((root / "models").glob("*/manifest.json")):
        m = json.loads(path.read_text())
        if m.get("trainer") == "openai" and m.get("trained_tokens"):
            stage = {"instilled": "instill"}.get(path.parent.name, path.parent.name.replace("itrained_", "itrain_"))
            row = stages.setdefault(stage, {"requests": 0, "input_tokens": 0, "output_tokens": 0, "training_tokens": 0})
            row["training_tokens"] += m["trained_tokens"]
    total = 0.0 if price else None
    for stage, row in stages.items():
        row["cost"] = None
        if price:
            ft = stage != "reports_base"
            pin = price["ft_input"] if ft and price.get("ft_input") is not None else price["input"]
            pout = price["ft_output"] if ft and price.get("ft_output") is not None else price["output"]
            row["cost"] = (row["input_tokens"] * pin + row["output_tokens"] * pout
                           + row["training_tokens"] * price.get("training", 0.0)) / 1e6
            total += row["cost"]
    return {"stages": stages, "cost": total, "model": base_name}
