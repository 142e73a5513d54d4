"""benchmarks/gpu_check.py runs end to end on a tiny model (its GPU run is recorded in gpu_check.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tokenizers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--tiny", "--steps", "2", "--out", str(tmp_path / "out.json")])
    parts = {r["part"]: r for r in json.loads((tmp_path / "out.json").read_text())}
    assert rc == 0
    for name in ("lora-bf16", "lora-fp32", "full-top12", "score-base", "score-adapter"):
        assert parts[name]["ok"], parts[name]
    assert parts["full-top12"]["steps"] == 2 and parts["full-top12"]["last_loss"] < parts["full-top12"]["first_loss"] + 1
    assert parts["score-base"]["prompts"] == 64
