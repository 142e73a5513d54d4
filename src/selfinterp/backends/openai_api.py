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

Fine-tuning (``finetune``) uploads the chat JSONL datasets, creates a job, polls it with
backoff and records every id in ``out_dir/openai_job.json`` as soon as it exists, so a
restarted run re-attaches to its files and job instead of uploading or training again; the
result (fine-tuned model name, trained tokens) goes into ``out_dir/manifest.json``.

With a ``record_path``, every response is appended to it (fsync'd) as it arrives, and a backend
made again on the same file answers the requests it holds from it: calls answered before a
crash are not sent (nor paid for) again.

Every request runs with bounded concurrency (threads) and is retried with exponential backoff on
429, 5xx, timeouts and connection errors, honouring ``Retry-After``. Errors are shown with their
HTTP status, code and message. The API key is read from the environment variable named by
``api_key_env`` (or the system keyring) and nowhere else; it is never stored on disk, and every message this module
produces has it (and anything shaped like an API key) redacted.

The ``openai`` package is imported only when a backend is made (``pip install 'selfinterp[openai]'``);
the price table and token estimates here need nothing but the standard library.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..journal import atomic_write_json
from ..modelref import ModelRef
from .base import WEIGHT_MAX, WEIGHT_MIN, ChoiceProbs, Messages, SelfReport, call_seeds

OFFICIAL_BASE_URL = "https://api.openai.com/v1"
JOB_STATE = "openai_job.json"
MANIFEST = "manifest.json"
RETRY_STATUS = {408, 409, 429}  # plus every 5xx

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


class OpenAIAPIError(RuntimeError):
    """An API call that failed for good (after retries, or not retryable), key redacted."""


class FineTuneFailed(OpenAIAPIError):
    """A fine-tuning job ended as failed or cancelled."""


# --------------------------------------------------------------------------------------------
# Secrets


_KEY_SHAPES = re.compile(r"\b(?:sk|rk|key|pk)-[A-Za-z0-9_\-*.]{3,}")


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` without the given secrets and without anything shaped like an API key
    (``sk-...``, including the partly masked keys some servers echo in 401 messages)."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "[redacted]")
    return _KEY_SHAPES.sub("[redacted]", text)


def public_url(url: str) -> str:
    """A URL without user:password (safe to store in manifests and results)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


KEYRING_SERVICE = "selfinterp"


def read_api_key(api_key_env: str | None, base_url: str) -> str:
    """The API key from the environment variable ``api_key_env``; failing that, from the system
    keyring (service "selfinterp", user = the variable's name) when the ``keyring`` package is
    installed. No key is an error naming the variable, for every server: a placeholder is never
    sent (a local server that needs no key takes any value the user sets)."""
    value = os.environ.get(api_key_env, "") if api_key_env else ""
    if value:
        return value
    if api_key_env:
        try:
            import keyring

            value = keyring.get_password(KEYRING_SERVICE, api_key_env) or ""
        except Exception:  # noqa: BLE001 - no keyring package, or no usable keyring backend
            value = ""
        if value:
            return value
    var = api_key_env or "OPENAI_API_KEY"
    local = "" if public_url(base_url).rstrip("/") == OFFICIAL_BASE_URL else \
        f"; for a server that needs no key ({public_url(base_url)}), set it to any value, e.g. {var}=none"
    raise OpenAIAPIError(f"no API key: set the environment variable {var} (openai.api_key_env names the variable; "
                         f"the key is never read from a file), or store it with: keyring set {KEYRING_SERVICE} {var}"
                         f"{local}")


def preflight(api_key_env: str | None, base_url: str) -> None:
    """What a run on the API needs before its first stage: the openai package and a key
    (:class:`OpenAIAPIError` otherwise, one line that says what to do)."""
    try:
        import openai  # noqa: F401
    except ImportError:
        raise OpenAIAPIError("the openai backend needs the openai package: pip install 'selfinterp[openai]'") from None
    read_api_key(api_key_env, base_url)


# --------------------------------------------------------------------------------------------
# Calls: retries with backoff, Retry-After, errors with code and message


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:  # an HTTP date
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def describe_error(exc: BaseException, secrets: Sequence[str] = ()) -> str:
    """``HTTP 429 rate_limit_exceeded: <message>`` (or the exception's kind), key redacted."""
    status = getattr(exc, "status_code", None)
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    body = getattr(exc, "body", None)
    if isinstance(body, dict):  # the API's {"error": {...}} is unwrapped by the client into body
        err = body.get("error", body)
        if isinstance(err, dict):
            code = code or err.get("code") or err.get("type")
            message = err.get("message") or message
    parts = [f"HTTP {status}" if status else type(exc).__name__]
    if code:
        parts.append(str(code))
    return redact(" ".join(parts) + f": {message}", secrets)


class Caller:
    """Runs API calls with retries and bounded concurrency."""

    def __init__(self, max_retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0,
                 concurrency: int = 8, secrets: Sequence[str] = (), sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] | None = None):
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self.secrets = tuple(s for s in secrets if s)
        self.sleep = sleep
        self.log = log or (lambda s: None)
        self.n_retries = 0
        self._lock = threading.Lock()

    def retryable(self, exc: BaseException) -> bool:
        """Whether a failed call is worth retrying: timeouts, connection errors, 408/409/429 and 5xx."""
        import openai

        if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
            return True
        if isinstance(exc, openai.APIStatusError):
            return exc.status_code in RETRY_STATUS or exc.status_code >= 500
        return False

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """The result of ``fn()``, retried with backoff (or Retry-After) while its error is retryable."""
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not self.retryable(exc) or attempt >= self.max_retries:
                    raise OpenAIAPIError(f"{what}: {describe_error(exc, self.secrets)}"
                                         + (f" (after {attempt} retries)" if attempt else "")) from None
                wait = _retry_after(exc)
                if wait is None:
                    wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
                wait = min(wait, self.max_backoff * 5)
                with self._lock:
                    self.n_retries += 1
                self.log(f"{what}: {describe_error(exc, self.secrets)}; retrying in {wait:.1f} s")
                self.sleep(wait)
                attempt += 1

    def map(self, what: str, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        """Every call, at most ``concurrency`` at a time, results in order."""
        if len(fns) <= 1 or self.concurrency <= 1:
            return [self.call(what, f) for f in fns]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(fns))) as pool:
            return list(pool.map(lambda f: self.call(what, f), fns))


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
                 response_format: str = "none", poll_interval: float = 30.0, max_poll_interval: float = 300.0,
                 record_path: str | Path | None = None, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] | None = None, **_ignored: Any):
        try:
            import openai
        except ImportError:
            raise OpenAIAPIError("the openai backend needs the openai package: pip install 'selfinterp[openai]'") from None
        if choice_method not in ("logprobs", "sample", "greedy"):
            raise ValueError(f"choice_method must be logprobs, sample or greedy, not {choice_method!r}")
        self.model = model
        self.base_url = base_url
        key = read_api_key(api_key_env, base_url)
        self._secrets = (key,)
        # The SDK's own max_retries has the same policy (backoff, Retry-After) but retries silently:
        # Caller adds what it lacks — a log line per retry (key redacted), a count, an injectable sleep.
        self.client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)
        self.caller = Caller(max_retries, backoff, max_backoff, concurrency, self._secrets, sleep, log)
        self.choice_method = choice_method
        self.n_samples = n_samples
        self.response_format = response_format
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.sleep = sleep
        self.log = log or (lambda s: None)
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

    # -- fine-tuning

    def finetune(self, train: Any, val: Any, config: Any = None, out_dir: str | Path | None = None,
                 seed: int | None = None, suffix: str | None = None,
                 hyperparameters: Mapping[str, Any] | None = None) -> ModelRef:
        """Fine-tune ``self.model`` on the chat JSONL file ``train`` (validated on ``val``) through
        the fine-tuning API; resumable: ids are recorded in ``out_dir`` as soon as they exist."""
        if out_dir is None:
            raise ValueError("the openai backend needs an out_dir to record its files and job")
        return FineTuneJob(self, Path(out_dir)).run(Path(train), Path(val) if val else None, seed, suffix,
                                                     dict(hyperparameters or {}))


class FineTuneJob:
    """Upload -> create -> poll, with every id written to ``openai_job.json`` as soon as it exists."""

    def __init__(self, backend: OpenAIBackend, out: Path):
        self.b = backend
        self.out = out
        self.path = out / JOB_STATE

    def load(self) -> dict:
        """The job state recorded in ``openai_job.json`` (a fresh one if absent or unreadable)."""
        if self.path.exists():
            try:
                return json.loads(self.path.read_text())
            except json.JSONDecodeError:
                pass
        return {"files": {}, "failed_jobs": []}

    def upload(self, state: dict, role: str, path: Path) -> str:
        """The id of ``path`` uploaded as ``role``, re-using a recorded upload of the same contents."""
        from ..journal import sha256_file

        digest = sha256_file(path)
        known = state["files"].get(role)
        if known and known["sha256"] == digest:
            self.b.log(f"{role}: re-using uploaded file {known['id']} ({path.name})")
            return known["id"]

        def go():
            with open(path, "rb") as f:
                return self.b.client.files.create(file=(path.name, f.read()), purpose="fine-tune")

        obj = self.b.caller.call(f"upload {path.name}", go)
        state["files"][role] = {"id": obj.id, "sha256": digest, "filename": path.name, "bytes": getattr(obj, "bytes", None)}
        atomic_write_json(self.path, state)
        self.b.log(f"{role}: uploaded {path.name} as {obj.id}")
        return obj.id

    def run(self, train: Path, val: Path | None, seed: int | None, suffix: str | None,
            hyperparameters: dict) -> ModelRef:
        """The fine-tuned model, from a new or re-attached job; its manifest is written beside the job state."""
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.load()
        request: dict[str, Any] = {"model": self.b.model, "training_file": self.upload(state, "training_file", train)}
        if val is not None:
            request["validation_file"] = self.upload(state, "validation_file", val)
        if seed is not None:
            request["seed"] = seed
        if suffix:
            request["suffix"] = suffix
        hp = {k: v for k, v in hyperparameters.items() if v is not None}
        if hp:
            request["method"] = {"type": "supervised", "supervised": {"hyperparameters": hp}}
        job = state.get("job")
        if job and job.get("request") != request:
            self.b.log(f"fine-tuning job {job['id']} was made for other settings or data; starting a new one")
            state.setdefault("superseded_jobs", []).append(job)
            job = None
        if job is None:
            created = self.b.caller.call("create fine-tuning job",
                                         lambda: self.b.client.fine_tuning.jobs.create(**request))
            job = {"id": created.id, "request": request, "status": created.status}
            state["job"] = job
            atomic_write_json(self.path, state)
            self.b.log(f"created fine-tuning job {created.id} on {self.b.model}")
        else:
            self.b.log(f"re-attaching to fine-tuning job {job['id']} ({job.get('status')})")
        done = self.poll(state)
        metrics = self.save_results(list(getattr(done, "result_files", None) or []))
        manifest = {"trainer": "openai", "base_model": self.b.model, "fine_tuned_model": done.fine_tuned_model,
                    "job_id": done.id, "training_file": request["training_file"],
                    "validation_file": request.get("validation_file"), "seed": getattr(done, "seed", seed),
                    "trained_tokens": done.trained_tokens, "hyperparameters": _dump(getattr(done, "hyperparameters", None)),
                    "method": _dump(getattr(done, "method", None)), "status": done.status,
                    "created_at": getattr(done, "created_at", None), "finished_at": getattr(done, "finished_at", None),
                    "result_files": list(getattr(done, "result_files", None) or []), **metrics,
                    "base_url": public_url(self.b.base_url)}
        atomic_write_json(self.out / MANIFEST, manifest)
        return ModelRef(base=self.b.model, adapter=done.fine_tuned_model, metadata=manifest)

    def save_results(self, file_ids: list[str]) -> dict:
        """Download the job's result files (the API's per-step metrics CSV) next to the manifest;
        best effort: a failure is logged, not fatal (the model is trained either way)."""
        import csv
        import io

        saved, last = [], {}
        for fid in file_ids:
            try:
                data = self.b.caller.call(f"download result file {fid}", lambda: self.b.client.files.content(fid)).read()
            except OpenAIAPIError as e:
                self.b.log(f"could not download the job's result file: {e}")
                continue
            from ..journal import atomic_write_text

            text = data.decode("utf-8", "replace")
            atomic_write_text(self.out / f"openai_results_{fid}.csv", text)
            saved.append(f"openai_results_{fid}.csv")
            for row in csv.DictReader(io.StringIO(text)):
                for k in ("train_loss", "valid_loss", "full_valid_loss"):
                    try:
                        if row.get(k) not in (None, ""):
                            last[k] = float(row[k])
                    except ValueError:
                        pass
                if row.get("step"):
                    last["steps"] = row["step"]
        out: dict[str, Any] = {"result_files_saved": saved}
        if "train_loss" in last:
            out["final_train_loss"] = last["train_loss"]
        if "valid_loss" in last or "full_valid_loss" in last:
            out["final_valid_loss"] = last.get("full_valid_loss", last.get("valid_loss"))
        if "steps" in last:
            out["steps"] = int(float(last["steps"]))
        return out

    def poll(self, state: dict) -> Any:
        """The succeeded job, polled with growing delays; FineTuneFailed if it fails or is cancelled."""
        job = state["job"]
        delay = self.b.poll_interval
        while True:
            current = self.b.caller.call(f"fine-tuning job {job['id']}",
                                         lambda: self.b.client.fine_tuning.jobs.retrieve(job["id"]))
            if current.status != job.get("status"):
                job["status"] = current.status
                atomic_write_json(self.path, state)
                self.b.log(f"fine-tuning job {job['id']}: {current.status}")
            if current.status == "succeeded":
                if not current.fine_tuned_model:
                    raise OpenAIAPIError(f"fine-tuning job {job['id']} succeeded without a fine_tuned_model")
                job.update(fine_tuned_model=current.fine_tuned_model, trained_tokens=current.trained_tokens)
                atomic_write_json(self.path, state)
                return current
            if current.status in ("failed", "cancelled"):
                err = getattr(current, "error", None)
                code = getattr(err, "code", None) if err is not None else None
                message = getattr(err, "message", None) if err is not None else None
                job["error"] = {"code": code, "message": message}
                state["failed_jobs"].append(job)
                state.pop("job")
                atomic_write_json(self.path, state)
                raise FineTuneFailed(redact(
                    f"fine-tuning job {job['id']} {current.status}: {code or 'no code'}: {message or 'no message'}. "
                    "Run again to start a new job (the uploaded files are re-used).", self.b._secrets))
            self.b.sleep(delay)
            delay = min(self.b.max_poll_interval, max(delay * 1.5, 0.0))


def _dump(x: Any) -> Any:
    if x is None:
        return None
    return x.model_dump(mode="json") if hasattr(x, "model_dump") else x


# --------------------------------------------------------------------------------------------
# Tokens and cost, for --dry-run (no tokenizer: about 4 characters per token, plus the chat
# format's overhead; good to +-20% for English prompts like these)


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
    """Tokens and cost per stage of ``selfinterp.run.dry_run_rows`` rows for a run on the API (adds
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
