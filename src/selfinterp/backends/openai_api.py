"""The OpenAI API backend: the paper's setup (GPT-4o / GPT-4o-mini, fine-tuning jobs, logprobs),
and any OpenAI-compatible server (vLLM, llama.cpp's server, hosted providers) via ``base_url``.

Choices (``choice_probs``), by ``choice_method``:

- ``logprobs`` (default): one chat completion per prompt with ``max_tokens=1``, ``logprobs=True``,
  ``top_logprobs=20``; P(A) and P(B) are the summed probabilities of the top tokens that read
  "A" / "B" (surrounding whitespace ignored), renormalised; ``mass`` = P(A) + P(B). A letter
  missing from the top 20 counts as 0; if both are missing, P(A) = 0.5 with mass 0.
- ``sample``: ``n_samples`` completions at temperature 1 (one request with ``n``), where logprobs
  are not available; P(A) = #A / (#A + #B), mass = (#A + #B) / n.
- ``greedy``: one completion at temperature 0, the paper's exact method: P(A) is 1 or 0.

Reports (``generate``) are chat completions at temperature 0 by default, optionally with a
``response_format`` (``json_object``). ``constrained_reports`` asks for a strict JSON schema
with exactly the scenario's attribute names as integer properties in [-100, 100] (the API's
structured outputs; on vLLM, guided decoding) - the API's counterpart of the local backend's
constrained mode.

Calls, retries, errors and secrets are :mod:`selfinterp.openai_client`'s; fine-tuning through the
API is a trainer's (:mod:`selfinterp.training.openai_jobs`), what a run costs the pipeline's
(:mod:`selfinterp.pipeline.costs`).

With a ``record_path``, every response is appended to it (fsync'd) as it arrives, and a backend
made again on the same file answers the requests it holds from it: calls answered before a
crash are not sent (nor paid for) again.

The ``openai`` package is imported only when a backend is made (``pip install 'selfinterp[openai]'``).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .base import WEIGHT_MAX, WEIGHT_MIN, ChoiceProbs, Messages, SelfReport, call_seeds
from ..openai_client import (OFFICIAL_BASE_URL, FineTuneFailed, OpenAIAPIError,  # noqa: F401 - the
                             connect, public_url, redact)  # backend's errors, importable from here


# --------------------------------------------------------------------------------------------
# The backend


def _letter_probs(top: Sequence[Any]) -> tuple[float, float]:
    pa = pb = 0.0
    for t in top or ():
        token = (t.token if hasattr(t, "token") else t["token"]).strip()
        lp = t.logprob if hasattr(t, "logprob") else t["logprob"]
        if token == "A":
            pa += math.exp(lp)
        elif token == "B":
            pb += math.exp(lp)
    return pa, pb


def report_schema(names: Sequence[str]) -> dict[str, Any]:
    """A strict JSON schema: exactly these attributes, each an integer in [-100, 100]."""
    return {"type": "json_schema", "json_schema": {
        "name": "weights", "strict": True,
        "schema": {"type": "object", "additionalProperties": False, "required": list(names),
                   "properties": {n: {"type": "integer", "minimum": WEIGHT_MIN, "maximum": WEIGHT_MAX}
                                  for n in names}}}}


class OpenAIBackend:
    """The backend protocol over an OpenAI(-compatible) API. ``model`` is the model's name on the
    server (a base model, or a fine-tuned ``ft:...`` name)."""

    def __init__(self, model: str, base_url: str = OFFICIAL_BASE_URL, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 8, max_retries: int = 6, timeout: float = 120.0, backoff: float = 1.0,
                 max_backoff: float = 60.0, choice_method: str = "logprobs", n_samples: int = 20,
                 response_format: str = "none", record_path: str | Path | None = None,
                 sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] | None = None):
        if choice_method not in ("logprobs", "sample", "greedy"):
            raise ValueError(f"choice_method must be logprobs, sample or greedy, not {choice_method!r}")
        self.model = model
        self.base_url = base_url
        conn = connect(base_url, api_key_env, concurrency, max_retries, timeout, backoff, max_backoff, sleep, log)
        self.client, self.caller, self._secrets = conn.client, conn.caller, conn.secrets
        self.choice_method = choice_method
        self.n_samples = n_samples
        self.response_format = response_format
        self.log = conn.log
        self.record_path = Path(record_path) if record_path else None
        self._record_lock = threading.Lock()
        self._recorded = self._read_records()
        self.n_replayed = 0
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        self.info = {"backend": "openai", "model": model, "base_url": public_url(base_url),
                     "choice_method": choice_method, "n_samples": n_samples if choice_method == "sample" else None,
                     "response_format": response_format}

    # -- bookkeeping

    def _read_records(self) -> dict[str, Any]:
        """Responses already paid for (the record file of an interrupted stage), by request hash;
        a line cut off by a crash is ignored."""
        out: dict[str, Any] = {}
        if self.record_path is None or not self.record_path.exists():
            return out
        for line in self.record_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                out[rec["request_hash"]] = rec["response"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        return out

    def _record(self, kind: str, request: Mapping[str, Any], response: Any, request_hash: str = "") -> None:
        """Count usage; append the response (never the key or headers) to the record file at once."""
        usage = getattr(response, "usage", None)
        with self._record_lock:
            self.usage["requests"] += 1
            if usage is not None:
                self.usage["prompt_tokens"] += getattr(usage, "prompt_tokens", 0) or 0
                self.usage["completion_tokens"] += getattr(usage, "completion_tokens", 0) or 0
            if self.record_path is None:
                return
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            body = response.model_dump(mode="json") if hasattr(response, "model_dump") else response
            line = json.dumps({"kind": kind, "time": time.time(), "request_hash": request_hash, "request": dict(request),
                               "response": body}, ensure_ascii=False)
            with open(self.record_path, "a", encoding="utf-8") as f:
                f.write(redact(line, self._secrets) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def _chat(self, kind: str, chat: Messages, _draw: int = 0, **params: Any) -> Any:
        """A call (to run later) of one chat completion; ``_draw`` tells apart repeated identical
        requests (samples), so that each is recorded and replayed as its own."""
        from ..journal import sha256_json

        request = {"model": self.model, "messages": chat, **params}
        key = sha256_json({"base_url": public_url(self.base_url), **request, **({"_draw": _draw} if _draw else {})})

        def go():
            if key in self._recorded:  # answered before a crash: not asked (nor paid for) again
                from openai.types.chat import ChatCompletion

                with self._record_lock:
                    self.n_replayed += 1
                return ChatCompletion.model_validate(self._recorded[key])
            response = self.client.chat.completions.create(**request)
            self._record(kind, {k: v for k, v in request.items() if k != "messages"}, response, key)
            return response

        return go

    # -- choices

    def choice_probs(self, chats: Sequence[Messages]) -> ChoiceProbs:
        """P(A) and the P(A) + P(B) mass per decision prompt, measured by ``choice_method``."""
        if self.choice_method == "logprobs":
            calls = [self._chat("choice", c, max_tokens=1, temperature=0, logprobs=True, top_logprobs=20) for c in chats]
        elif self.choice_method == "sample":
            calls = [self._chat("choice", c, max_tokens=1, temperature=1, n=self.n_samples) for c in chats]
        else:
            calls = [self._chat("choice", c, max_tokens=1, temperature=0) for c in chats]
        responses = self.caller.map("chat completion (choice)", calls)
        answers_of = [[(c.message.content or "").strip()[:1] for c in r.choices] for r in responses]
        if self.choice_method == "sample":
            # servers that ignore `n` (llama.cpp's, some providers) return one choice: ask again, one by one
            extra = [(i, self._chat("choice", chats[i], d + 1, max_tokens=1, temperature=1))
                     for i, a in enumerate(answers_of) for d in range(self.n_samples - len(a))]
            for (i, _), r in zip(extra, self.caller.map("chat completion (choice)", [f for _, f in extra])):
                answers_of[i].append((r.choices[0].message.content or "").strip()[:1])
        p_a, mass = [], []
        for r, answers in zip(responses, answers_of):
            if self.choice_method == "logprobs":
                lp = r.choices[0].logprobs
                content = getattr(lp, "content", None) if lp is not None else None
                if not content:
                    raise OpenAIAPIError(f"the server returned no logprobs for model {self.model!r}; set "
                                         "openai.choice_method = 'sample' (or 'greedy') for servers without them")
                pa, pb = _letter_probs(content[0].top_logprobs)
                total = pa + pb
                p_a.append(pa / total if total > 0 else 0.5)
                mass.append(total)
            else:
                na, nb = answers.count("A"), answers.count("B")
                p_a.append(na / (na + nb) if na + nb else 0.5)
                mass.append((na + nb) / max(1, len(answers)))
        return ChoiceProbs(p_a=np.array(p_a, dtype=float), mass=np.array(mass, dtype=float))

    # -- reports

    def generate(self, chats: Sequence[Messages], max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int | Sequence[int] = 0) -> list[str]:
        """Chat completions; ``seed`` is one per chat (a chat's request, and so its recorded
        answer, does not depend on its batch) or an int (seed + index)."""
        seeds = call_seeds(seed, len(chats))
        extra: dict[str, Any] = {}
        if self.response_format == "json_object":
            extra["response_format"] = {"type": "json_object"}
        calls = [self._chat("generate", c, max_tokens=max_new_tokens, temperature=temperature, seed=sd, **extra)
                 for c, sd in zip(chats, seeds)]
        return [r.choices[0].message.content or "" for r in self.caller.map("chat completion (report)", calls)]

    def constrained_reports(self, chats: Sequence[Messages], attribute_names_per_chat: Sequence[Sequence[str]],
                            max_new_tokens: int = 128) -> list[SelfReport]:
        """One self-report per chat, generated under a strict JSON schema of the chat's attribute names."""
        from ..report_parser import parse_report

        calls = [self._chat("report", c, max_tokens=max_new_tokens, temperature=0,
                            response_format=report_schema(list(names)))
                 for c, names in zip(chats, attribute_names_per_chat)]
        out = []
        for r, names in zip(self.caller.map("chat completion (constrained report)", calls), attribute_names_per_chat):
            text = r.choices[0].message.content or ""
            parsed = parse_report(text, list(names))
            weights = dict(zip(names, parsed.weights)) if parsed.ok else None
            out.append(SelfReport(text=text, weights=weights, mode="constrained"))
        return out
