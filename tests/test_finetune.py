"""Fine-tuning: label masks per chat template, training, checkpoints/resume, the lower-layer cache,
adapter round trips, and a 2-process (gloo) run. All on the tiny random model: seconds each."""

from __future__ import annotations

import math
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from selfinterp import chat_template  # noqa: E402
from selfinterp.decoder import lower_hidden, top_logits  # noqa: E402
from selfinterp.training.finetune import IGNORE, FinetuneConfig, finetune, tokenize_example  # noqa: E402
from selfinterp.modelref import load_base, load_finetuned  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
SYSTEM = "Your job is to make hypothetical decisions on behalf of different people or characters."

# template name -> (file or None for the tokenizer's own, end-of-turn marker, system folded?)
CASES = {
    "smollm2": (None, "<|im_end|>", False),
    "qwen2.5": ("qwen2.5.jinja", "<|im_end|>", False),
    "llama3": ("llama3.jinja", "<|eot_id|>", False),
    "gemma": ("gemma.jinja", "<end_of_turn>", True),
}


def chat(i: int, answer: str = "A") -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Decision {i}: which is better?\nA: {i % 7} apples\nB: {i % 5} pears"},
            {"role": "assistant", "content": answer}]


def examples(n: int, answer: str = "A") -> list[dict]:
    return [{"messages": chat(i, answer)} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# Label masks


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("answer", ["A", '{"price": 40, "size": -12}'])
def test_label_mask_per_template(tokenizer, name, answer):
    template_file, marker, folded = CASES[name]
    tok = tokenizer
    original = tok.chat_template
    try:
        if template_file:
            tok.chat_template = (TEMPLATES / template_file).read_text()
        messages = chat(3, answer)
        # The default supervises the answer only; its end-of-turn marker is input, not loss.
        only = tokenize_example(tok, messages, max_length=512)
        kept = [t for t in only.labels if t != IGNORE]
        assert tok.decode(kept, skip_special_tokens=False) == answer
        assert tok.decode(only.input_ids[len(only.input_ids) - len(only.labels) + only.labels.index(kept[0]):],
                          skip_special_tokens=False).strip() == answer + marker
        ex = tokenize_example(tok, messages, max_length=512, loss_on="answer_and_eot")
        assert ex.input_ids == only.input_ids
        supervised = [t for t in ex.labels if t != IGNORE]
        assert tok.decode(supervised, skip_special_tokens=False) == answer + marker
        # Supervision is one contiguous block at the end; the prompt before it is exactly the
        # measurement prompt's tokens.
        n_prompt = len(ex.labels) - len(supervised)
        assert all(t == IGNORE for t in ex.labels[:n_prompt])
        assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
        prompt = chat_template.render(tok, messages[:-1], add_generation_prompt=True).text
        assert ex.input_ids[:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert ex.folded_system is folded
        if folded:
            assert SYSTEM in prompt and "system" not in prompt.split(SYSTEM)[0]
    finally:
        tok.chat_template = original


def test_too_long_is_an_error_not_a_truncation(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        tokenize_example(tokenizer, chat(1), max_length=8)


# ---------------------------------------------------------------------------------------------
# Training, saving, loading

FAST = dict(epochs=3, batch_size=8, lr=2e-2, warmup_ratio=0.0, autocast=None, seed=1)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    config = FinetuneConfig(method="lora", lora_rank=4, lora_alpha=8, **FAST)
    return finetune(tiny_model_dir, examples(24), examples(8)[4:], config, out, progress=False)


def test_lora_lowers_training_loss(lora_run):
    m = lora_run.manifest
    losses = [r["loss"] for r in m["step_losses"]]
    assert m["steps"] == len(losses) == 9  # 3 epochs x 24/8
    assert [r["step"] for r in m["step_losses"]] == list(range(1, 10))
    # The tiny random model's logits are bounded (frozen norm, tiny tied embeddings), so the loss
    # cannot fall far from ln(vocab); what must happen is that "A" becomes the prediction.
    assert losses[-1] < losses[0] - 0.3
    assert m["epoch_losses"][-1]["train_loss"] < m["epoch_losses"][0]["train_loss"]
    assert m["val_loss"] is not None and m["val_loss"] < losses[0]


def test_lora_learns_to_answer_a(lora_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lora_run.path / "tokenizer")
    prompt = chat_template.render(tok, chat(101)[:-1], add_generation_prompt=True).text
    with torch.no_grad():
        logits = lora_run.model(**tok(prompt, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
    assert tok.decode(int(logits.argmax())) == "A"


def test_manifest_records_the_run(lora_run, tiny_model_dir):
    m = json.loads((lora_run.path / "manifest.json").read_text())
    assert m["base_model"] == str(tiny_model_dir)
    assert m["config"]["lora_rank"] == 4 and m["seed"] == 1
    assert len(m["data"]["train"]["sha256"]) == 64 and m["data"]["train"]["n"] == 24
    assert m["folded_system"] is False
    assert {"torch", "transformers", "peft", "accelerate"} <= set(m["versions"])
    assert m["wall_seconds"] > 0
    assert (lora_run.path / "adapter" / "adapter_config.json").exists()


def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits


def test_adapter_round_trip_gives_identical_logits(lora_run):
    model, tok = load_finetuned(lora_run.path)
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = [chat_template.render(tok, chat(i)[:-1], add_generation_prompt=True).text for i in range(3)]
    trained = _logits(lora_run.model, tok, texts)
    assert torch.equal(_logits(model, tok, texts), trained)
    # and the adapter did change the model
    base, _ = load_base(lora_run.base_model)
    assert not torch.allclose(_logits(base, tok, texts), trained)


def test_finished_run_is_returned_not_retrained(lora_run, tiny_model_dir):
    config = FinetuneConfig(method="lora", lora_rank=4, lora_alpha=8, **FAST)
    again = finetune(tiny_model_dir, examples(24), examples(8)[4:], config, lora_run.path, progress=False)
    assert again.manifest["finished_at"] == lora_run.manifest["finished_at"]


class Interrupt(Exception):
    pass


def test_resume_continues_from_checkpoint_without_repeating_steps(lora_run, tiny_model_dir, tmp_path):
    config = FinetuneConfig(method="lora", lora_rank=4, lora_alpha=8, checkpoint_every=2, **FAST)
    seen: list[int] = []

    def crash_at_5(record):
        seen.append(record["step"])
        if record["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(tiny_model_dir, examples(24), examples(8)[4:], config, tmp_path, progress=False, callback=crash_at_5)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4"]  # epoch 2, step 1 + every-2

    resumed: list[int] = []
    result = finetune(tiny_model_dir, examples(24), examples(8)[4:], config, tmp_path, progress=False,
                      callback=lambda r: resumed.append(r["step"]))
    assert resumed == [5, 6, 7, 8, 9]  # step 5 is redone (it was after the checkpoint), nothing else
    assert [r["step"] for r in result.manifest["step_losses"]] == list(range(1, 10))
    # Same batches, same dropout RNG: identical to the uninterrupted run (checkpoint_every aside).
    a = dict(lora_run.model.named_parameters())
    for n, p in result.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, a[n], atol=1e-6), n
    assert [r["loss"] for r in result.manifest["step_losses"]] == pytest.approx(
        [r["loss"] for r in lora_run.manifest["step_losses"]], abs=1e-6)


def test_resume_refuses_a_different_config(tiny_model_dir, tmp_path):
    def crash_at_3(record):
        if record["step"] == 3:
            raise Interrupt

    config = FinetuneConfig(method="lora", lora_rank=4, **{**FAST, "epochs": 2})
    with pytest.raises(Interrupt):
        finetune(tiny_model_dir, examples(16), None, config, tmp_path, progress=False, callback=crash_at_3)
    assert (tmp_path / "checkpoints" / "step-2").exists()  # end of epoch 1
    with pytest.raises(ValueError, match="another config"):
        finetune(tiny_model_dir, examples(16), None, FinetuneConfig(method="lora", lora_rank=8, **{**FAST, "epochs": 2}),
                 tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------
# The lower-layer cache


def _tiny(arch: str, tiny_model_dir):
    import transformers as T

    if arch == "llama":  # the shared fixture: tiny Llama with SmolLM2's vocabulary
        return T.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    common = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config = {"qwen2": lambda: T.Qwen2Config(**common),
              "qwen3": lambda: T.Qwen3Config(**common),
              "mistral": lambda: T.MistralConfig(**common, sliding_window=4),  # window shorter than the inputs
              "gemma2": lambda: T.Gemma2Config(**common, sliding_window=4),
              "gemma3": lambda: T.Gemma3TextConfig(**common, sliding_window=4)}[arch]()
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"])
def test_split_forward_reproduces_the_model(tiny_model_dir, arch):
    from peft import LoraConfig, get_peft_model

    model = _tiny(arch, tiny_model_dir).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 4:] = 0
    for m in (model, get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                      init_lora_weights=False)).eval()):
        with torch.no_grad():
            full = m(input_ids=ids, attention_mask=mask).logits
            split = top_logits(m, lower_hidden(m, ids, mask, 1), mask, 1)
        real = mask.bool()
        assert torch.allclose(full[real], split[real], atol=1e-5)


def test_a_split_that_does_not_reproduce_the_model_is_refused(tiny_model_dir):
    from selfinterp.decoder import check_split

    model = _tiny("llama", tiny_model_dir).eval()
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h = lower_hidden(model, ids, mask, 1)
        check_split(model, ids, mask, h, 1)
        with pytest.raises(NotImplementedError, match="does not support this architecture"):
            check_split(model, ids, mask, h + 1.0, 1)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_on_cached_lower_layers_matches_uncached(tiny_model_dir, tmp_path, method):
    # Dropout off so both runs are the same computation; fp32 throughout.
    common = dict(method=method, layers=1, lora_rank=4, lora_dropout=0.0, **{**FAST, "epochs": 2})
    runs = {}
    for cached in (False, True):
        cfg = FinetuneConfig(cache_lower_layers=cached, **common)
        runs[cached] = finetune(tiny_model_dir, examples(16), examples(4), cfg, tmp_path / str(cached), progress=False)
    losses = {c: [r["loss"] for r in runs[c].manifest["step_losses"]] for c in runs}
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][-1] < losses[True][0]
    # Only the top layer was trained, and the trained weights agree.
    a, b = dict(runs[False].model.named_parameters()), dict(runs[True].model.named_parameters())
    trained = [n for n, p in b.items() if p.requires_grad]
    assert trained and all(".layers.0." not in n for n in trained)
    # Adam divides by sqrt(v), so where a gradient is near zero the float-order differences of
    # two equal computations (~1e-7) grow to ~1e-5 in the weights (seen on an AMD EPYC); 1e-4 is
    # still 200x below one step's update at lr 2e-2.
    for n in trained:
        assert torch.allclose(a[n], b[n], atol=1e-4), n
    # ... and the saved result loads back to the same logits.
    model, tok = load_finetuned(runs[True].path)
    texts = [chat_template.render(tok, chat(i)[:-1], add_generation_prompt=True).text for i in range(2)]
    tok.pad_token = tok.pad_token or tok.eos_token
    assert torch.allclose(_logits(model, tok, texts), _logits(runs[False].model, tok, texts), atol=1e-5)


def test_bfloat16_cache_trains_close_to_float32(tiny_model_dir, tmp_path):
    common = dict(method="full", layers=1, cache_lower_layers=True, **{**FAST, "epochs": 1})
    losses = {}
    for dt in ("float32", "bfloat16"):
        r = finetune(tiny_model_dir, examples(16), None, FinetuneConfig(cache_dtype=dt, **common), tmp_path / dt,
                     progress=False)
        losses[dt] = [x["loss"] for x in r.manifest["step_losses"]]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=1e-2)


def test_cache_needs_a_layer_count():
    with pytest.raises(ValueError, match="layers"):
        FinetuneConfig(cache_lower_layers=True)


def test_unsupported_architecture_is_a_clear_error():
    from selfinterp.decoder import backbone

    with pytest.raises(NotImplementedError, match="Llama/Qwen2-style"):
        backbone(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# Distributed: 2 CPU processes over gloo


@pytest.mark.slow
def test_two_process_cpu_finetune(tiny_model_dir, tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(e) + "\n" for e in examples(16)))
    val.write_text("".join(json.dumps(e) + "\n" for e in examples(5)))
    cfg = dict(method="lora", layers=1, cache_lower_layers=True, lora_rank=4, epochs=2, batch_size=8,
               grad_accum=2, lr=5e-3, autocast=None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with socket.socket() as s:  # a free port, so parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # torchrun: `accelerate launch --cpu` would need MPI for more than one CPU process; the
    # Accelerator inside joins torchrun's process group with gloo all the same.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "selfinterp.training.finetune", "--base", str(tiny_model_dir), "--train", str(train), "--val", str(val),
           "--out", str(tmp_path / "out"), "--config", json.dumps(cfg), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["world_size"] == 2
    assert m["steps"] == 4  # 2 epochs x 16 examples / 8 per step
    assert [r["step"] for r in m["step_losses"]] == [1, 2, 3, 4]
    assert m["val_loss"] is not None
    assert m["step_losses"][-1]["loss"] < m["step_losses"][0]["loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    # The saved adapter loads and runs.
    model, tok = load_finetuned(tmp_path / "out")
    assert _logits(model, tok, ["hello"]).isfinite().all()


# ---------------------------------------------------------------------------------------------
# Batching of counterbalanced pairs, held-out evaluation during training


def paired_examples(n_pairs: int, n_groups: int = 3) -> list[dict]:
    """Counterbalanced pairs in design's layout: example 2i has options (x, y) and answer A,
    2i+1 the same options swapped and answer B; pair i belongs to question i % n_groups."""
    rows = []
    for i in range(n_pairs):
        q = f"Question {i % n_groups}: which is better?"
        x, y = f"{i} apples", f"{i + 1} pears"
        for a, b, ans in ((x, y, "A"), (y, x, "B")):
            rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": f"{q}\nOption A: {a}\nOption B: {b}"},
                                      {"role": "assistant", "content": ans}]})
    return rows


@pytest.mark.parametrize("batching", ["pairs", "grouped_pairs"])
def test_batch_plan_keeps_pairs_and_groups(batching):
    import numpy as np

    from selfinterp.training.finetune import batch_plan

    groups = [i % 3 for i in range(40)]  # 40 pairs, 3 groups
    plan = batch_plan(80, 8, batching, np.random.default_rng(0), groups, groups_per_batch=2)
    flat = [e for b in plan for e in b]
    assert sorted(flat) == list(range(80))  # every example once per epoch
    for b in plan:
        assert len(b) <= 8 and len(b) % 2 == 0
        assert all(b[j] // 2 == b[j + 1] // 2 and b[j] % 2 == 0 for j in range(0, len(b), 2))  # pair beside its copy
        if batching == "grouped_pairs":
            assert len({groups[e // 2] for e in b}) <= 2
    assert plan != batch_plan(80, 8, batching, np.random.default_rng(1), groups, groups_per_batch=2)  # shuffled


def test_pair_groups_are_the_question():
    from selfinterp import design, prompts, scenarios
    from selfinterp.training.finetune import pair_groups

    rows = paired_examples(6, n_groups=3)
    keys = pair_groups(rows)
    assert len(set(keys)) == 3 and keys[0] == keys[3] and keys[0] != keys[1]
    with pytest.raises(ValueError, match="pairs"):
        pair_groups(rows[:-1])
    # The design's own prompts: values that share leading digits, or equal first values, must not
    # split a scenario into several groups.
    bank = scenarios.load_bank()[:3]
    w = {s.id: design.draw_weights(s, 0) for s in bank}
    ex = design.instillation_examples(bank, w, 60, 0, counterbalance=True)
    assert len(set(pair_groups(ex))) == 3
    s = bank[0]
    same_first = [(tuple([1.0] + [2.0] * (s.k - 1)), tuple([1.0] + [3.0] * (s.k - 1))),
                  ((5.0,) * s.k, (6.0,) * s.k)]
    ex = [{"messages": prompts.decision_chat(s, a, b, "A")} for a, b in same_first for a, b in ((a, b), (b, a))]
    assert len(set(pair_groups(ex))) == 1


def test_paired_training_logs_heldout_accuracy(tiny_model_dir, tmp_path):
    cfg = FinetuneConfig(method="full", layers=1, cache_lower_layers=True, batching="grouped_pairs", eval_every=2,
                         **{**FAST, "epochs": 2})
    r = finetune(tiny_model_dir, paired_examples(16), paired_examples(4), cfg, tmp_path / "run", progress=False)
    m = r.manifest
    assert m["steps"] == 2 * m["steps_per_epoch"]
    assert [e["step"] for e in m["evals"]][:2] == [2, 4]
    assert all(0.0 <= e["val_accuracy"] <= 1.0 for e in m["evals"])
    assert m["val_accuracy"] == m["evals"][-1]["val_accuracy"]
    # The loss is on the one answer token: the first steps sit near ln 2 plus the untrained
    # model's spread over the vocabulary, far from an average with a learned end-of-turn token.
    assert m["step_losses"][0]["loss"] > 5.0
    with pytest.raises(ValueError, match="even"):
        FinetuneConfig(batching="pairs", batch_size=7)


def test_early_stopping_and_its_identity(tiny_model_dir, tmp_path):
    from selfinterp.training.finetune import _training_fields

    # lr ~0: the held-out accuracy never improves, so training stops after `patience` more evaluations.
    cfg = FinetuneConfig(method="full", layers=1, batching="pairs", eval_every=1, early_stop_patience=2,
                         **{**FAST, "lr": 1e-30, "epochs": 3})
    m = finetune(tiny_model_dir, paired_examples(16), paired_examples(4), cfg, tmp_path / "es", progress=False).manifest
    assert m["stopped_early_at"] == 3 and m["steps"] == 3 < 3 * m["steps_per_epoch"]
    assert "eval_every" in _training_fields(cfg.to_dict())
    assert "eval_every" not in _training_fields(FinetuneConfig(eval_every=5).to_dict())
    with pytest.raises(ValueError, match="eval_every"):
        FinetuneConfig(early_stop_patience=2)


def test_attribute_readout_trains_beside_the_answer_and_is_not_saved(tiny_model_dir, tmp_path):
    """attribute_loss > 0: a zero-initialised linear read-out of the answer position learns the rows'
    attribute_targets (its logged loss falls), the first step's answer loss is the plain run's, the
    saved model holds no read-out, an interrupted run resumes it; rows without targets are refused."""
    import numpy as np
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    rows = paired_examples(16)
    for i in range(0, len(rows), 2):  # a pair and its swap: opposite differences
        d = rng.uniform(-1, 1, 3).round(3).tolist()
        rows[i]["attribute_targets"], rows[i + 1]["attribute_targets"] = d, [-v for v in d]
    base = dict(method="full", layers=1, cache_lower_layers=True, batching="grouped_pairs", **{**FAST, "epochs": 6})
    plain = finetune(tiny_model_dir, rows, None, FinetuneConfig(**base), tmp_path / "plain", progress=False).manifest
    cfg = FinetuneConfig(**base, attribute_loss=1.0, checkpoint_every=3)
    m = finetune(tiny_model_dir, rows, None, cfg, tmp_path / "aux", progress=False).manifest
    aux = [r["attribute_loss"] for r in m["step_losses"]]
    assert abs(m["step_losses"][0]["loss"] - plain["step_losses"][0]["loss"]) < 1e-4
    assert "attribute_loss" not in plain["step_losses"][0]
    assert np.mean(aux[-3:]) < 0.7 * np.mean(aux[:3])
    saved = load_file(str(tmp_path / "aux" / "trained.safetensors"))
    assert not any("aux" in k for k in saved) and set(saved) == set(load_file(str(tmp_path / "plain" / "trained.safetensors")))

    def stop_at(step):
        def cb(record):
            if record["step"] == step:
                raise KeyboardInterrupt
        return cb

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model_dir, rows, None, cfg, tmp_path / "resumed", progress=False, callback=stop_at(4))
    r = finetune(tiny_model_dir, rows, None, cfg, tmp_path / "resumed", progress=False).manifest
    assert [x["attribute_loss"] for x in r["step_losses"]] == pytest.approx(aux, rel=1e-4, abs=1e-6)

    with pytest.raises(ValueError, match="attribute_targets"):
        finetune(tiny_model_dir, paired_examples(4), None, cfg, tmp_path / "none", progress=False)
    with pytest.raises(ValueError, match="attribute_targets"):
        finetune(tiny_model_dir, [{**rows[0], "attribute_targets": ["x"]}] + rows[1:], None, cfg, tmp_path / "bad",
                 progress=False)
    with pytest.raises(ValueError, match="attribute_loss"):
        FinetuneConfig(attribute_loss=-1.0)


def test_attribute_head_lr_sets_the_readouts_own_pace(tiny_model_dir, tmp_path):
    """attribute_head_lr: the read-out alone gets that learning rate, so its first step moves each of
    its weights by it (Adam's first step is the learning rate in size) while the model's answer loss
    starts the same; None keeps the trainer's lr."""
    from safetensors.torch import load_file

    rows = paired_examples(4, n_groups=1)
    for i in range(0, len(rows), 2):
        rows[i]["attribute_targets"], rows[i + 1]["attribute_targets"] = [0.5, -0.25], [-0.5, 0.25]
    base = dict(method="full", layers=1, cache_lower_layers=True, batching="grouped_pairs", attribute_loss=1.0,
                checkpoint_every=1, keep_checkpoints=1, **{**FAST, "epochs": 1, "lr": 1e-3})
    moved, losses = {}, {}
    for head_lr in (None, 5e-2):
        out = tmp_path / f"h{head_lr}"
        m = finetune(tiny_model_dir, rows, None, FinetuneConfig(**base, attribute_head_lr=head_lr), out,
                     progress=False).manifest
        assert m["steps"] == 1
        head = load_file(str(next((out / "checkpoints").glob("step-*")) / "aux_head.safetensors"))
        moved[head_lr] = max(float(t.abs().max()) for t in head.values())
        losses[head_lr] = m["step_losses"][0]["loss"]
    assert moved[None] == pytest.approx(1e-3, rel=0.05) and moved[5e-2] == pytest.approx(5e-2, rel=0.05)
    assert losses[5e-2] == pytest.approx(losses[None], abs=1e-5)
    with pytest.raises(ValueError, match="attribute_head_lr"):
        FinetuneConfig(attribute_head_lr=0.0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_cache_is_exact(tiny_model_dir, tmp_path, attn):
    """The lower-layer cache built once per shared prefix equals the plain one within 1e-5 (fp32),
    with prompts of three questions of different lengths, and a one-off prompt that shares nothing."""
    from transformers import AutoTokenizer

    from selfinterp.decoder import prefix_groups
    from selfinterp.training.finetune import _build_cache, _collate, _prompt, load_base

    model, _ = load_base(str(tiny_model_dir))
    model.config._attn_implementation = attn  # eager attention adds its mask to the scores, sdpa takes booleans
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = paired_examples(30, n_groups=3)
    for r in rows:  # one question longer than the others: prefixes of different lengths
        r["messages"][1]["content"] = r["messages"][1]["content"].replace("Question 0", "Question zero, a longer one")
    rows.append({"messages": [{"role": "user", "content": "Something else entirely"}, {"role": "assistant", "content": "A"}]})
    ex = [tokenize_example(tok, r["messages"]) for r in rows]
    groups = prefix_groups([_prompt(e) for e in ex], tok)
    shared = [p for p, members in groups if len(members) > 1]
    assert len(shared) >= 3 and len(set(shared)) >= 2 and sum(len(m) for _, m in groups) == len(ex)
    for p, members in groups:  # a group's length is a prefix every member really shares
        assert all(ex[i].input_ids[:p] == ex[members[0]].input_ids[:p] for i in members)
    device = torch.device("cpu")
    plain = _build_cache(model, ex, 1, FinetuneConfig(layers=1, cache_lower_layers=True, autocast=None, share_prefix=False), device)
    fast = _build_cache(model, ex, 1, FinetuneConfig(layers=1, cache_lower_layers=True, autocast=None, share_prefix=True), device, tokenizer=tok)
    assert any(isinstance(x, tuple) for x in fast) and not isinstance(fast[-1], tuple)
    x_p, m_p, y_p = _collate([(h, e.labels) for h, e in zip(plain, ex)], device)
    x_f, m_f, y_f = _collate([(h, e.labels) for h, e in zip(fast, ex)], device)
    assert torch.equal(m_p, m_f) and torch.equal(y_p, y_f)
    assert (x_p - x_f).abs().max().item() < 1e-5
    lp, lf = top_logits(model, x_p, m_p, 1), top_logits(model, x_f, m_f, 1)
    real = m_p.bool()
    assert (lp[real] - lf[real]).abs().max().item() < 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_training_is_exact(tiny_model_dir, attn):
    """The trained layers run each cached prefix once per batch and the suffixes after it: the
    loss, the answer logits and every trained parameter's gradient equal those of whole
    sequences within 1e-5 (fp32), with prefixes of different lengths in one batch, soft targets
    included."""
    from transformers import AutoTokenizer

    from selfinterp.training.finetune import (_build_cache, _collate, _collate_shared, _LossModule, _prepare_trainable,
                                     _shared_runs, _soft_targets, load_base, tokenize_row)

    model, _ = load_base(str(tiny_model_dir))
    model.config._attn_implementation = attn
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = paired_examples(12, n_groups=3)
    for r in rows:  # questions as long as a scenario's (a shared prefix worth a forward), one longer still
        r["messages"][1]["content"] = r["messages"][1]["content"].replace(
            ": which", ", " + "about the options below, " * 8 + "which").replace("Question 0", "Question zero, a longer one")
    for k, r in enumerate(rows[::3]):
        r["soft_answer"] = {"A": 0.2 + 0.1 * k, "B": 0.8 - 0.1 * k}
    ex = [tokenize_row(tok, r) for r in rows]
    model, first = _prepare_trainable(model, FinetuneConfig(method="full", layers=2))
    device = torch.device("cpu")
    loss = _LossModule(model, first, cached=True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    idx, runs = _shared_runs([0, 5, 1, 7, 2, 9, 10, 3], ex, tok)
    assert sorted(idx) == [0, 1, 2, 3, 5, 7, 9, 10] and len(runs) == 3 and len({p for p, _ in runs}) == 2
    soft = _soft_targets([ex[i] for i in idx], device)
    assert soft

    # The runs come from the batch's prompts, not from the cache: with a cache of whole prompts
    # (share_prefix off there) and with the shared one, the same exact result.
    for share_cache in (False, True):
        cfg = FinetuneConfig(method="full", layers=2, cache_lower_layers=True, autocast=None, share_prefix=share_cache)
        cache = dict(enumerate(_build_cache(model, ex, first, cfg, device, tokenizer=tok)))
        assert any(isinstance(x, tuple) for x in cache.values()) == share_cache

        def run(shared: bool):
            model.zero_grad()
            if shared:
                x, m, y, kw = _collate_shared([(cache[i], ex[i].labels) for i in idx], runs, device)
                assert len(kw["prefixes"]) == 3 and kw["sizes"] == [n for _, n in runs]
            else:
                x, m, y = _collate([(cache[i], ex[i].labels) for i in idx], device)
                kw = {}
            value = loss(x, m, y, *soft, **kw)
            value.backward()
            return value.item(), [p.grad.clone() for p in params]

        (l_plain, g_plain), (l_shared, g_shared) = run(False), run(True)
        assert abs(l_plain - l_shared) < 1e-5 * max(1.0, abs(l_plain))
        for a, b in zip(g_plain, g_shared):
            assert (a - b).abs().max().item() < 1e-5 * max(1.0, a.abs().max().item())
    lone = tokenize_row(tok, {"messages": [{"role": "user", "content": "Something else entirely"},
                                           {"role": "assistant", "content": "A"}]})
    assert _shared_runs([0, 1], [ex[0], lone], tok) is None  # a row that shares nothing: whole rows


def test_prefix_groups_use_the_prefix_all_members_share(smollm2_tokenizer_dir):
    """Two members that agree beyond their shared lines must not stretch the group's prefix over a
    third that does not (the length is the minimum over members, each compared from the lines on)."""
    from transformers import AutoTokenizer

    from selfinterp.decoder import prefix_groups
    from selfinterp.training.finetune import _prompt

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    head = "System line one.\nThe question is shared by all of us here.\n"
    tails = ["Option A: 12 apples and more", "Option A: 12 apples and less", "Option B: 7 pears"]
    ex = [tokenize_example(tok, [{"role": "user", "content": head + t}, {"role": "assistant", "content": "A"}])
          for t in tails * 3]
    for p, members in prefix_groups([_prompt(e) for e in ex], tok):
        assert all(ex[i].input_ids[:p] == ex[members[0]].input_ids[:p] for i in members)


def test_soft_targets_score_the_first_answer_token(tiny_model_dir):
    """soft_answer rows: one-hot soft targets give exactly the hard loss; 50/50 targets give the
    cross-entropy to the average of the two answers' log-probabilities; bad targets are refused."""
    from transformers import AutoTokenizer

    from selfinterp.training.finetune import _collate, _LossModule, _soft_targets, load_base, tokenize_row

    model, _ = load_base(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = paired_examples(2, n_groups=1)
    hard = [tokenize_row(tok, r) for r in rows]
    onehot = [tokenize_row(tok, {**r, "soft_answer": {"A": float(r["messages"][-1]["content"] == "A"),
                                                       "B": float(r["messages"][-1]["content"] == "B")}}) for r in rows]
    half = [tokenize_row(tok, {**r, "soft_answer": {"A": 0.5, "B": 0.5}}) for r in rows]
    a_id = next(t for t in hard[0].labels if t != IGNORE)
    b_id = next(t for t in hard[1].labels if t != IGNORE)
    assert onehot[0].soft == ((a_id, 1.0), (b_id, 0.0)) and not hard[0].soft
    loss = _LossModule(model, 0, cached=False).eval()
    dev = torch.device("cpu")
    with torch.no_grad():
        x, m, y = _collate([(torch.tensor(e.input_ids), e.labels) for e in hard], dev)
        plain = loss(x, m, y)
        assert torch.allclose(loss(x, m, y, *_soft_targets(onehot, dev)), plain, atol=1e-5)
        mixed = onehot[:1] + hard[1:]  # a row without soft targets keeps its hard loss
        assert torch.allclose(loss(x, m, y, *_soft_targets(mixed, dev)), plain, atol=1e-5)
        logits = model(input_ids=x, attention_mask=m).logits.float()
        first = [(y[i, 1:] != IGNORE).int().argmax().item() for i in range(len(y))]
        logp = torch.stack([torch.log_softmax(logits[i, first[i]], -1) for i in range(len(y))])
        want = -(0.5 * logp[:, a_id] + 0.5 * logp[:, b_id]).sum()
        assert torch.allclose(loss(x, m, y, *_soft_targets(half, dev)), want, atol=1e-4)
    for bad in ({"A": 0.7, "B": 0.7}, {"A": 1.0}, {"A": -0.5, "B": 1.5}, "A"):
        with pytest.raises(ValueError, match="soft_answer"):
            tokenize_row(tok, {**rows[0], "soft_answer": bad})


@pytest.mark.parametrize("cached", [False, True])
def test_gradient_checkpointing_changes_memory_not_results(tiny_model_dir, tmp_path, cached):
    """gradient_checkpointing = true recomputes activations in the backward pass: the same step
    losses as without (float32, within 1e-5), on the whole model and on the cached top layers;
    the manifest records it; auto (None) leaves it off on a CPU."""
    runs = {}
    for gc in (False, True, None):
        cfg = FinetuneConfig(method="full", layers=1, cache_lower_layers=cached, epochs=1, batch_size=4, lr=1e-2,
                             warmup_ratio=0.0, autocast=None, seed=3, gradient_checkpointing=gc)
        res = finetune(tiny_model_dir, examples(12), None, cfg, tmp_path / f"gc-{gc}", progress=False)
        runs[gc] = res.manifest
        if res.model is not None:  # the layers themselves were set to recompute
            layers = res.model.model.layers
            assert all(getattr(layer, "gradient_checkpointing", False) == bool(gc) for layer in layers)
    losses = {gc: [r["loss"] for r in m["step_losses"]] for gc, m in runs.items()}
    assert len(losses[True]) == 3 and losses[True] != losses[True][:1] * 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert runs[True]["gradient_checkpointing"] is True and runs[None]["gradient_checkpointing"] is False


def test_train_settings_are_the_trainers_settings():
    """One settings model: a run's [instill]/[introspection] blocks are the trainer's own settings
    (dtype, checkpointing, clipping and weight decay reachable from a config), and a cross-field rule
    fails when the file is read, not when the stage starts."""
    from selfinterp import config

    assert FinetuneConfig is config.TrainSettings and issubclass(config.InstillSettings, FinetuneConfig)
    cfg = config.build("cpu", overrides={"introspection": {"dtype": "bfloat16", "gradient_checkpointing": True,
                                                            "grad_clip": None, "weight_decay": 0.1}})
    fc = cfg.introspection
    assert (fc.dtype, fc.gradient_checkpointing, fc.grad_clip, fc.weight_decay) == ("bfloat16", True, None, 0.1)
    with pytest.raises(config.ConfigError, match="introspection.*cache_lower_layers needs layers"):
        config.build("smoke", overrides={"introspection": {"cache_lower_layers": True, "layers": None}})
    with pytest.raises(config.ConfigError, match="instill.seed: set by the run"):
        config.build("smoke", overrides={"instill": {"seed": 3}})


def test_release_memory_empties_the_device_cache(monkeypatch):
    from selfinterp.training.finetune import release_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    release_memory()
    assert calls == ["empty_cache"]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_only_where_the_cpu_has_it(monkeypatch, native):
    """bfloat16 autocast is kept on a CPU with avx512_bf16 (or AMX) and dropped (float32) on one that
    would emulate it; float16 and None pass through."""
    from selfinterp.training.finetune import resolve_autocast

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert resolve_autocast("bfloat16", cpu) == ("bfloat16" if native else None)
    assert resolve_autocast("float16", cpu) == "float16" and resolve_autocast(None, cpu) is None


def test_weights_dtype_auto_and_narrow_frozen_weights(tiny_model_dir, tmp_path, monkeypatch):
    """dtype "auto" is float32 on a CPU (bfloat16 on a GPU that has it), recorded as resolved; with
    frozen weights in bfloat16 the fully trained layers and the final norm are float32 (AdamW
    updates on bfloat16 weights would be lost to rounding), and training still learns."""
    from selfinterp.training.finetune import resolve_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # bf16 autocast kept on any CPU
    assert resolve_dtype("auto", torch.device("cpu")) == "float32" and resolve_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    common = dict(method="full", layers=1, **{**FAST, "epochs": 2, "autocast": "bfloat16"})
    auto = finetune(tiny_model_dir, examples(16), None, FinetuneConfig(**common), tmp_path / "auto", progress=False)
    assert FinetuneConfig().dtype == "auto" and auto.manifest["config"]["dtype"] == "float32"
    narrow = finetune(tiny_model_dir, examples(16), None, FinetuneConfig(dtype="bfloat16", **common), tmp_path / "bf16",
                      progress=False)
    dtypes = {n: p.dtype for n, p in narrow.model.named_parameters()}
    trained = [n for n, p in narrow.model.named_parameters() if p.requires_grad]
    assert trained and all(dtypes[n] == torch.float32 for n in trained)
    assert any(d == torch.bfloat16 for n, d in dtypes.items() if n not in trained)
    losses = [x["loss"] for x in narrow.manifest["step_losses"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_first_layer_places_the_trained_layers(tiny_model_dir, tmp_path, method):
    """first_layer = 0 trains the first k layers (early placement), nothing above them, not the final
    norm; with the cache on there is nothing below to cache, and training still learns."""
    cfg = FinetuneConfig(method=method, layers=1, first_layer=0, cache_lower_layers=True, lora_rank=4,
                         **{**FAST, "epochs": 2})
    res = finetune(tiny_model_dir, examples(16), None, cfg, tmp_path, progress=False)
    trained = [n for n, p in res.model.named_parameters() if p.requires_grad]
    assert trained and all(".layers.0." in n for n in trained), trained
    losses = [x["loss"] for x in res.manifest["step_losses"]]
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="beyond the model's 2 decoder layers"):
        finetune(tiny_model_dir, examples(4), None, FinetuneConfig(method=method, layers=2, first_layer=1, **FAST),
                 tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="first_layer needs"):
        FinetuneConfig(first_layer=0)


def test_evaluator_joins_the_evaluations_and_changes_nothing(tiny_model_dir, tmp_path):
    """An evaluator's numbers are recorded at every evaluation (eval_every and epoch ends) with the
    model in eval mode, and the training is the same computation as without it."""
    seen = []

    def evaluator(model, tok):
        seen.append(model.training)
        return {"probe": float(sum(p.sum() for p in model.parameters() if p.requires_grad))}

    cfg = FinetuneConfig(method="full", layers=1, eval_every=1, **{**FAST, "epochs": 1})
    runs = {name: finetune(tiny_model_dir, examples(16), examples(4), cfg, tmp_path / name, progress=False,
                           evaluator=ev) for name, ev in (("with", evaluator), ("without", None))}
    evals = runs["with"].manifest["evals"]
    assert len(evals) == len(seen) >= 2 and not any(seen)
    assert all("probe" in e for e in evals) and len({e["probe"] for e in evals}) == len(evals)
    losses = {n: [x["loss"] for x in r.manifest["step_losses"]] for n, r in runs.items()}
    assert losses["with"] == losses["without"]


def test_keep_best_returns_the_best_evaluations_weights(tiny_model_dir, tmp_path):
    """keep_best: the result is the model of the evaluation with the highest score (here the
    second of several), loaded back exactly; the manifest says which."""
    from selfinterp.modelref import load_finetuned

    calls = []

    def evaluator(model, tok):
        probe = float(sum(p.double().sum() for p in model.parameters() if p.requires_grad))
        calls.append(probe)
        return {"probe": probe, "score": -float((len(calls) - 2) ** 2)}

    cfg = FinetuneConfig(method="full", layers=1, eval_every=1, keep_best="score", **{**FAST, "epochs": 1})
    res = finetune(tiny_model_dir, examples(24), None, cfg, tmp_path, progress=False, evaluator=evaluator)
    evals = res.manifest["evals"]
    assert len(evals) >= 3 and res.manifest["kept"]["step"] == evals[1]["step"]
    model, _ = load_finetuned(res.path)
    trained = {n for n, p in res.model.named_parameters() if p.requires_grad}
    kept = float(sum(p.double().sum() for n, p in model.named_parameters() if n in trained))
    assert kept == pytest.approx(calls[1], rel=1e-9) and kept != pytest.approx(calls[-1], rel=1e-9)
    with pytest.raises(ValueError, match="evaluator"):
        finetune(tiny_model_dir, examples(4), None, cfg, tmp_path / "none", progress=False)
