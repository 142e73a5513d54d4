"""Calls to an OpenAI(-compatible) server: errors, secrets, retries.

Every request runs with bounded concurrency (threads) and is retried with exponential backoff on
429, 5xx, timeouts and connection errors, honouring ``Retry-After``. Errors are shown with their
HTTP status, code and message. The API key is read from the environment variable named by
``api_key_env`` (or the system keyring) and nowhere else; it is never stored on disk, and every
message made here has it (and anything shaped like an API key) redacted.
"""

from __future__ import annotations

import email.utils
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

OFFICIAL_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = {408, 409, 429}  # plus every 5xx


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


def _import_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise OpenAIAPIError("the openai backend needs the openai package: pip install 'selfinterp[openai]'") from None
    return openai


def preflight(api_key_env: str | None, base_url: str) -> None:
    """What a run on the API needs before its first stage: the openai package and a key
    (:class:`OpenAIAPIError` otherwise, one line that says what to do)."""
    _import_openai()
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


@dataclass(frozen=True)
class Connection:
    """One OpenAI(-compatible) server as the backend and the fine-tuning jobs both use it: the
    SDK's client, the retry policy (:class:`Caller`), the secrets to redact, and where to log."""

    client: Any
    caller: Caller
    base_url: str
    secrets: tuple[str, ...]
    log: Callable[[str], None]
    sleep: Callable[[float], None]


def connect(base_url: str = OFFICIAL_BASE_URL, api_key_env: str | None = "OPENAI_API_KEY", concurrency: int = 8,
            max_retries: int = 6, timeout: float = 120.0, backoff: float = 1.0, max_backoff: float = 60.0,
            sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] | None = None) -> Connection:
    """A connection to the server at ``base_url`` with the key from ``api_key_env`` (the ``openai``
    package is imported here: ``pip install 'selfinterp[openai]'``)."""
    openai = _import_openai()
    key = read_api_key(api_key_env, base_url)
    log = log or (lambda s: None)
    # The SDK's own max_retries has the same policy (backoff, Retry-After) but retries silently:
    # Caller adds what it lacks — a log line per retry (key redacted), a count, an injectable sleep.
    client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)
    return Connection(client, Caller(max_retries, backoff, max_backoff, concurrency, (key,), sleep, log),
                      base_url, (key,), log, sleep)
