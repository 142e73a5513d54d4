"""The vLLM backend against the transformers backend on the embedded SmolLM2-135M, in the
interpreter that has vLLM (``tests/test_vllm_backend.py`` runs this file through
``$SELFINTERP_VLLM_PYTHON -m pytest`` when the main environment has no vLLM).

Checks: identical prompt tokens; P(A) within 1e-4 in float32 (0.05 in bfloat16) and the same
argmax on >= 95% of prompts; greedy reports that are JSON and match transformers'; constrained
reports that parse; a LoRA adapter served by LoRARequest and merged, both against peft.
"""

import json
import os

import numpy as np
import pytest

from selfinterp.backends.base import json_object_end

pytest.importorskip("vllm", reason="vLLM is not installed in this interpreter")

pytestmark = pytest.mark.slow

for k, v in {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
             "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}.items():
    os.environ.setdefault(k, v)


def _chats(n_scenarios=4, per=8):
    from selfinterp import design, prompts
    from selfinterp.scenarios import assign_roles, load_bank, load_bundled_roles

    bank = assign_roles(load_bank()[:n_scenarios], load_bundled_roles(), 0)
    decision, intro, names = [], [], []
    for s in bank:
        for p in design.sample_pairs(s, per, 0, "vllm-test"):
            decision.append(prompts.decision_chat(s, p.a, p.b))
        p = design.sample_pairs(s, 1, 0, "vllm-report")[0]
        intro.append(prompts.introspection_chat(s, p.a, p.b))
        names.append(s.attribute_names)
    return decision, intro, names


@pytest.fixture(scope="module")
def model_dir():
    from selfinterp import models

    return str(models.resolve("smollm2-135m"))


@pytest.fixture(scope="module")
def hf(model_dir):
    from selfinterp.backends.hf import HFBackend

    return HFBackend(model_dir, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def chats():
    return _chats()


def _compare(a, b):
    diff = np.abs(a.p_a - b.p_a)
    same = float(np.mean((a.p_a >= 0.5) == (b.p_a >= 0.5)))
    return float(diff.max()), float(diff.mean()), same


def test_float32_matches_transformers(model_dir, hf, chats):
    from selfinterp.backends.vllm import VLLMBackend, release

    decision, intro, names = chats
    v = VLLMBackend(model_dir, settings={"dtype": "float32"})
    try:
        assert v.answer_ids == hf.answer_ids
        assert v._token_prompts(decision[:3]) == [hf.tokenizer(hf.render(c), add_special_tokens=False)["input_ids"]
                                                  for c in decision[:3]]
        pv, ph = v.choice_probs(decision), hf.choice_probs(decision)
        mx, mean, same = _compare(pv, ph)
        print(f"\nfloat32: {len(decision)} prompts, max |dP(A)| {mx:.2e}, mean {mean:.2e}, same argmax {same:.1%}, "
              f"mass {pv.mass.mean():.3f} vs {ph.mass.mean():.3f}; letters outside top 20: {v.info['letters_outside_top20']}")
        assert mx < 1e-4 and same >= 0.95
        np.testing.assert_allclose(pv.mass, ph.mass, atol=1e-4)
        # re-scoring the same prompts (prefix cache) gives the same numbers
        np.testing.assert_allclose(v.choice_probs(decision[:8]).p_a, pv.p_a[:8], atol=1e-6)

        tv = v.generate(intro, max_new_tokens=96)
        th = hf.generate(intro, max_new_tokens=96)
        print("greedy report (vLLM):", tv[0])
        for t in tv:  # a reply that holds a closed JSON object ends right after it (135M rarely writes one)
            end = json_object_end(t)
            assert end is None or end == len(t), t
        copy = [[{"role": "user", "content": 'Repeat exactly, nothing else: {"price": 3, "size": {"w": 2}} and more'}]]
        tc = v.generate(copy, max_new_tokens=40)
        print("copied JSON:", tc, "transformers:", hf.generate(copy, max_new_tokens=40))
        assert tc == hf.generate(copy, max_new_tokens=40)
        same_text = sum(a == b for a, b in zip(tv, th))
        print(f"greedy reports identical to transformers: {same_text}/{len(tv)}")
        assert same_text >= len(tv) - 1

        rv = v.constrained_reports(intro, names)
        rh = hf.constrained_reports(intro, names)
        for r, n in zip(rv, names):
            assert list(json.loads(r.text)) == list(n) and all(-100 <= x <= 100 for x in r.weights.values())
        agree = sum(a.weights == b.weights for a, b in zip(rv, rh))
        print(f"constrained reports identical to transformers: {agree}/{len(rv)}")
        for a, b in zip(rv, rh):
            print(f"  vLLM {a.text}\n  hf   {b.text}")
        # Not asserted equal: vLLM's regex lets the model tokenise the skeleton its own way (e.g. '",'
        # as one token), the transformers filler forces one tokenisation, so the numbers can differ.
    finally:
        release()


def test_bfloat16_within_005(model_dir, hf, chats):
    from selfinterp.backends.hf import HFBackend
    from selfinterp.backends.vllm import VLLMBackend, release

    decision = chats[0]
    v = VLLMBackend(model_dir, settings={"dtype": "bfloat16"})
    assert v.info["head_dtype"] == "float32"  # both engines: bfloat16 body, float32 lm_head
    try:
        pv = v.choice_probs(decision)
    finally:
        release()
    ph = HFBackend(model_dir, dtype="bfloat16", progress=False).choice_probs(decision)
    mx, mean, same = _compare(pv, ph)
    print(f"\nbfloat16 vs transformers bfloat16: max |dP(A)| {mx:.3f}, mean {mean:.3f}, same argmax {same:.1%}")
    mx32, mean32, same32 = _compare(pv, hf.choice_probs(decision))
    print(f"bfloat16 vs transformers float32: max |dP(A)| {mx32:.3f}, mean {mean32:.3f}, same argmax {same32:.1%}")
    assert mx < 0.05 and same >= 0.95 and mx32 < 0.05


def test_lora_adapter_served_as_lora_and_merged(model_dir, chats, tmp_path_factory):
    """A selfinterp.training.finetune LoRA output: vLLM with LoRARequest and vLLM on the merged weights both
    match transformers + peft."""
    from selfinterp.training import finetune as ft
    from selfinterp.backends.hf import HFBackend
    from selfinterp.backends.vllm import VLLMBackend, release

    decision = chats[0][:12]
    out = tmp_path_factory.mktemp("lora")
    train = [{"messages": c + [{"role": "assistant", "content": "A" if i % 3 else "B"}]} for i, c in enumerate(chats[0])]
    ft.finetune(model_dir, train, None, ft.FinetuneConfig(method="lora", layers=2, epochs=1, batch_size=8, lr=5e-3,
                                                          lora_rank=8, lora_alpha=16), out, progress=False)
    ref = HFBackend(model_dir, adapter=str(out / "adapter"), dtype="float32", progress=False).choice_probs(decision)
    base = HFBackend(model_dir, dtype="float32", progress=False).choice_probs(decision)
    print(f"\nthe adapter moves P(A) by up to {np.abs(ref.p_a - base.p_a).max():.3f}")
    for mode in ("lora", "merged"):
        v = VLLMBackend(model_dir, adapter=str(out), settings={"dtype": "float32", "adapters": mode})
        try:
            assert v.info["adapter_served_as"] == mode
            pv = v.choice_probs(decision)
        finally:
            release()
        mx, mean, same = _compare(pv, ref)
        print(f"adapter as {mode}: max |dP(A)| vs peft {mx:.2e}, same argmax {same:.1%}")
        assert mx < 1e-4
