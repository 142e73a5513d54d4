"""The estimator (selfinterp.estimate): its arithmetic, its memory model against what a real
model holds, recorded rates, and the dry-run plan that prints it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from selfinterp import config, estimate as est, pipeline
from selfinterp.cli import app

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)


def tiny_model():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def test_parameter_count_matches_a_real_model():
    m = tiny_model()
    shape = est.shape_from_config("tiny", m.config.to_dict())
    assert shape.params == sum(p.numel() for p in m.parameters())
    # LoRA on every linear layer of the top 2 layers: what peft really adds
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=targets, layers_to_transform=[1, 2], layers_pattern="layers"))
    assert shape.lora_params(4, 2) == sum(p.numel() for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_memory_matches_what_autograd_saves(checkpointing):
    """The bytes of the tensors autograd keeps for the backward pass (counted by a saved-tensors
    hook, each storage once, parameters excluded) are what the estimate says, within 25%."""
    import torch

    m = tiny_model()
    shape = est.shape_from_config("tiny", m.config.to_dict())
    params = {p.data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen.setdefault(t.data_ptr(), t.numel() * t.element_size())
        return t

    if checkpointing:
        m.gradient_checkpointing_enable()
    m.model.norm = torch.nn.Identity()  # the decoder layers only: what the estimate counts per layer
    m.train()
    ids = torch.randint(0, TINY["vocab_size"], (8, 128))
    emb = m.model.embed_tokens(ids).detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.model(inputs_embeds=emb, use_cache=False)
    predicted = 8 * 128 * TINY["num_hidden_layers"] * shape.activation_bytes_per_token(checkpointing, 2, 4)
    assert 0.75 < predicted / sum(seen.values()) < 1.25, (predicted, sum(seen.values()))


def test_arithmetic_of_a_scoring_stage():
    shape = est.KNOWN_SHAPES["smollm2-135m"]
    dev = est.Device("test cpu", "cpu", 24, cores=2)
    w = est.Work("validate", "score", prompts=600, prompt_tokens=200, batch_size=16, dtype="float32")
    s = est.estimate_stage(shape, w, dev, "smollm2-135m")
    per_prompt = 200 * shape.flops_per_token(context=100) + shape.head_flops
    assert s.flops == pytest.approx(600 * per_prompt)
    load = est.MODEL_LOAD_S + shape.params * 4 / 1e9
    assert s.seconds == pytest.approx(load + 600 * per_prompt / est.REFERENCE_RATES["score"])
    # twice the cores, twice the rate
    s4 = est.estimate_stage(shape, w, est.Device("test cpu", "cpu", 24, cores=4), "smollm2-135m")
    assert s4.parts["score"] == pytest.approx(s.parts["score"] / 2)


def test_arithmetic_of_a_training_stage_on_a_gpu():
    shape = est.KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"]
    h100 = est.GPUS["h100-80gb"]
    w = est.Work("instill", "train", prompts=5000, prompt_tokens=250, epochs=3, method="lora", batch_size=16,
                 checkpointing=True, dtype="bfloat16", autocast="bfloat16")
    s = est.estimate_stage(shape, w, h100, "Qwen/Qwen2.5-7B-Instruct")
    tokens = 5000 * 250
    flops = 3 * tokens * shape.flops_per_token() * (2.2 + 1)  # LoRA backward + the recomputed forward
    assert s.part_flops["steps"] == pytest.approx(flops)
    assert s.parts["steps"] == pytest.approx(flops / (989e12 * est.GPU_UTILISATION["train"]))
    mem = est.training_memory(shape, w)
    assert mem["weights"] == pytest.approx(shape.params * 2 / est.GIB)
    assert mem["trainable"] == pytest.approx(shape.lora_params(16, 28) * 16 / est.GIB)  # fp32 copy, grads, m, v
    assert s.device_gib == pytest.approx(sum(v for k, v in mem.items() if k != "cache (host)"))


def test_fits_and_does_not_fit():
    cfg = config.build("paper")
    rows, e = pipeline.estimate_run(cfg, est.parse_device("h100-80gb"), recorded={})
    assert e.fits and e.peak_gib < 80 and all(r["est_seconds"] > 0 for r in rows if r["model_calls"] or r["training_examples"])
    rows, e = pipeline.estimate_run(cfg, est.Device("small cpu", "cpu", 16, cores=2), recorded={})
    assert not e.fits and any("instill" in p and "GiB of RAM" in p for p in e.problems)


def test_recorded_rates_take_precedence(tmp_path):
    dev = est.Device("test cpu", "cpu", 24, cores=2)
    path = tmp_path / "rates.json"
    est.record_rate(dev, "smollm2-135m", "score", "float32", 1e11, "runs/x/validate", path)
    est.record_rate(dev, "smollm2-135m", "score", "float32", 3e11, "runs/y/validate", path)
    recorded = json.loads(path.read_text())
    r = est.rate_for("score", dev, "smollm2-135m", "float32", recorded)
    assert r.flops == pytest.approx(2e11) and "measured here by 2 earlier stage(s)" in r.basis and "runs/y" in r.basis
    # another model, dtype or machine does not use it
    assert "reference" in est.rate_for("score", dev, "other", "float32", recorded).basis
    assert "reference" in est.rate_for("score", dev, "smollm2-135m", "bfloat16", recorded).basis
    assert "reference" in est.rate_for("score", est.Device("other", "cpu", 24, cores=2), "smollm2-135m", "float32",
                                       recorded).basis


def test_achieved_rates_invert_the_estimate():
    """A stage that takes exactly its estimated time reports back the rates it was estimated with."""
    shape = est.KNOWN_SHAPES["smollm2-135m"]
    dev = est.Device("test cpu", "cpu", 24, cores=2)
    w = est.Work("instill", "train", prompts=1000, prompt_tokens=200, epochs=1, method="full", layers=12, cached=True)
    s = est.estimate_stage(shape, w, dev, "smollm2-135m")
    got = est.achieved_rates(s, w, s.seconds, cache_seconds=s.parts["cache"])
    assert got["train"] == pytest.approx(est.REFERENCE_RATES["train"]) and got["cache"] == pytest.approx(est.REFERENCE_RATES["cache"])
    g = est.Work("reports_base", "generate", prompts=50, prompt_tokens=250, new_tokens=50, batch_size=16)
    s = est.estimate_stage(shape, g, dev, "smollm2-135m")
    step = est.achieved_rates(s, g, s.seconds, score_rate=est.REFERENCE_RATES["score"])["step"]
    assert step == pytest.approx(est.REFERENCE_STEP_S)


def test_devices():
    assert est.parse_device("cpu:8").cores == 8
    assert est.gpu_by_name("NVIDIA H100 80GB HBM3", 79.1).tflops == 989
    assert est.gpu_by_name("NVIDIA A100-SXM4-40GB", 39.4).memory_gib == 39.4
    assert "unknown" in est.gpu_by_name("Tesla T4", 15).name
    for bad in ("tpu", "cpu:0", "cpu:x"):
        with pytest.raises(ValueError, match="--device"):
            est.parse_device(bad)


def test_dry_run_prints_the_estimate_and_its_basis():
    res = CliRunner().invoke(app, ["run", "--preset", "paper", "--dry-run", "--device", "h100-80gb"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "NVIDIA H100 80GB" in out and "peak GiB" in out and "Fits: peak" in out
    assert "989 TFLOPS bf16 nominal x 30% utilisation (assumed)" in out and "7.62 B parameters" in out
    res = CliRunner().invoke(app, ["run", "--preset", "paper", "--dry-run", "--device", "nope"])
    assert res.exit_code == 1 and "--device nope: unknown device" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["run", "--preset", "simulated", "--device", "h100-80gb"])
    assert res.exit_code == 1 and "--device sets the device of a --dry-run estimate" in res.output


def test_a_cpu_without_native_bf16_is_estimated_in_float32():
    """The trainer drops bf16 autocast on a CPU that would emulate it; the plan does likewise, and
    float32 training is estimated at the reference's bf16 rate / 1.8."""
    from dataclasses import replace

    dev = est.Device("test cpu", "cpu", 24, cores=2)
    assert est.rate_for("train", dev, "m", "float32").flops == pytest.approx(
        est.REFERENCE_RATES["train"] / est.BF16_SCORE_SPEEDUP_CPU)
    assert est.rate_for("train", dev, "m", "bfloat16").flops == pytest.approx(est.REFERENCE_RATES["train"])
    cfg = config.build("cpu")
    works = {native: {r["stage"]: r["work"] for r in pipeline.dry_run_rows(cfg, replace(dev, native_bf16=native))}
             for native in (True, False)}
    assert works[True]["instill"].autocast == "bfloat16" and works[False]["instill"].autocast is None
