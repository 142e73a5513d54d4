"""Local stand-ins for an OpenAI API server, for tests (127.0.0.1 only, started and stopped by the test).

- :class:`ReplayServer` serves a fixed list of HTTP exchanges (tests/fixtures/openai/*.json) in
  order and records what the client actually sent. The fixtures are SYNTHETIC: written by hand
  after the OpenAI API reference, not captured from api.openai.com.
- :class:`FakeOpenAI` answers programmatically (files, fine-tuning jobs that succeed at the
  first poll, chat completions with logprobs and JSON-schema reports), enough to run a whole
  experiment through the openai backend.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "openai"


def load_exchanges(name: str, scenario: str) -> list[dict]:
    return json.loads((FIXTURES / name).read_text())["scenarios"][scenario]


class _Server:
    def __init__(self):
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                req = {"method": self.command, "path": self.path.split("?")[0], "headers": {k.lower(): v for k, v in self.headers.items()},
                       "body": body}
                with owner.lock:
                    owner.requests.append(req)
                status, headers, payload = owner.respond(req)
                raw = isinstance(payload, str)  # a file's content, as is
                data = payload.encode() if raw else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/octet-stream" if raw else "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def respond(self, req: dict) -> tuple[int, dict, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class ReplayServer(_Server):
    """Serves ``exchanges`` in order; a request that does not match the next exchange gets a 418
    with what was expected (and is listed in ``mismatches``)."""

    def __init__(self, exchanges: list[dict]):
        super().__init__()
        self.exchanges = list(exchanges)
        self.mismatches: list[str] = []

    def respond(self, req):
        with self.lock:
            if not self.exchanges:
                self.mismatches.append(f"unexpected {req['method']} {req['path']}")
                return 418, {}, {"error": {"message": "no more recorded exchanges", "code": "replay_exhausted"}}
            ex = self.exchanges.pop(0)
        want = ex["request"]
        problems = []
        if (req["method"], req["path"]) != (want["method"], want["path"]):
            problems.append(f"expected {want['method']} {want['path']}, got {req['method']} {req['path']}")
        text = req["body"].decode("utf-8", "replace")
        for piece in want.get("body_contains", []):
            if piece not in text:
                problems.append(f"{want['path']}: body lacks {piece!r}")
        if "json" in want:
            sent = json.loads(text)
            for k, v in want["json"].items():
                if sent.get(k) != v:
                    problems.append(f"{want['path']}: {k} = {sent.get(k)!r}, expected {v!r}")
        if problems:
            self.mismatches.extend(problems)
            return 418, {}, {"error": {"message": "; ".join(problems), "code": "replay_mismatch"}}
        r = ex["response"]
        return r["status"], r.get("headers", {}), r["text"] if "text" in r else r["body"]


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little")


class FakeOpenAI(_Server):
    """A programmatic OpenAI-compatible server: files, jobs (succeed at the first poll) and chat
    completions (P(A) a deterministic function of the prompt; reports fill the JSON schema)."""

    def __init__(self, api_key: str | None = None, delay: float = 0.0):
        super().__init__()
        self.api_key = api_key
        self.delay = delay  # seconds per chat completion (to observe concurrency)
        self.in_flight = self.max_in_flight = 0
        self.files: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.bad_auth = 0

    def respond(self, req):
        if self.api_key is not None and req["headers"].get("authorization") != f"Bearer {self.api_key}":
            self.bad_auth += 1
            return 401, {}, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}
        path, method = req["path"], req["method"]
        if path == "/v1/files" and method == "POST":
            fid = f"file-{len(self.files) + 1}"
            m = re.search(rb'filename="([^"]+)"', req["body"])
            self.files[fid] = {"id": fid, "object": "file", "bytes": len(req["body"]), "created_at": 1,
                               "filename": m.group(1).decode() if m else "upload", "purpose": "fine-tune",
                               "status": "processed"}
            return 200, {}, self.files[fid]
        if path == "/v1/fine_tuning/jobs" and method == "POST":
            body = json.loads(req["body"])
            jid = f"ftjob-{len(self.jobs) + 1}"
            self.jobs[jid] = {"id": jid, "object": "fine_tuning.job", "created_at": 1, "model": body["model"],
                              "training_file": body["training_file"], "validation_file": body.get("validation_file"),
                              "seed": body.get("seed", 0), "status": "queued", "fine_tuned_model": None,
                              "finished_at": None, "trained_tokens": None, "error": None, "result_files": [],
                              "organization_id": "org-fake", "hyperparameters": {"n_epochs": "auto"},
                              "suffix": body.get("suffix")}
            return 200, {}, self.jobs[jid]
        m = re.fullmatch(r"/v1/fine_tuning/jobs/([\w-]+)", path)
        if m and method == "GET":
            job = self.jobs[m.group(1)]
            job.update(status="succeeded", finished_at=2, trained_tokens=1234,
                       fine_tuned_model=f"ft:{job['model']}:fake:{job['suffix']}:{job['id']}")
            return 200, {}, job
        if path == "/v1/chat/completions" and method == "POST":
            import time

            with self.lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                time.sleep(self.delay)
                return 200, {}, self.chat(json.loads(req["body"]))
            finally:
                with self.lock:
                    self.in_flight -= 1
        return 404, {}, {"error": {"message": f"no route {method} {path}", "code": "not_found"}}

    def chat(self, body: dict) -> dict:
        prompt = body["messages"][-1]["content"]
        h = _h(body["model"], prompt)
        if body.get("max_tokens") == 1:
            pa = 0.05 + 0.9 * ((h % 1000) / 999)
            import math

            letter = "A" if pa >= 0.5 else "B"
            choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": letter},
                      "logprobs": {"content": [{"token": letter, "logprob": math.log(max(pa, 1 - pa)), "bytes": None,
                                                "top_logprobs": [
                                                    {"token": "A", "logprob": math.log(pa * 0.98), "bytes": None},
                                                    {"token": "B", "logprob": math.log((1 - pa) * 0.98), "bytes": None},
                                                    {"token": "The", "logprob": math.log(0.02), "bytes": None}]}]}}
            content_tokens = 1
        else:
            rf = body.get("response_format") or {}
            names = list(rf.get("json_schema", {}).get("schema", {}).get("properties", {})) or ["x"]
            content = json.dumps({n: int((_h(h, n) % 201) - 100) for n in names})
            choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content},
                      "logprobs": None}
            content_tokens = len(content) // 4
        return {"id": f"chatcmpl-{h % 10**8}", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [choice],
                "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": content_tokens,
                          "total_tokens": len(prompt) // 4 + content_tokens}}
