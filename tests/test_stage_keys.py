"""Stage keys hold only what a stage reads (issue 12, item 7): a backend's settings block only in
that backend's stages, batch_size only in the measuring stages of the backends where it can change
a result (hf, vllm), never in training or design; stages recorded under the older, broader keys
are still recognised."""

import io
import json

import pytest
from rich.console import Console

from selfinterp import config
from selfinterp.pipeline import STAGES as ALL_STAGES, Run

STAGES = [s for s in ALL_STAGES if not s.control]  # runs without cross_model_control

MEASURING = {"validate", "native_choices"} | {s.name for s in STAGES if s.name.startswith("reports_")}
TRAINING = {"instill", "itrain_first", "itrain_last", "itrain_all"}


def keys(cfg) -> dict[str, str]:
    from selfinterp.journal import sha256_json

    return {s.name: sha256_json(cfg.hash_fields(*s.fields)) for s in STAGES}


def changed(a, b) -> set[str]:
    ka, kb = keys(a), keys(b)
    return {n for n in ka if ka[n] != kb[n]}


HF = dict(backend="hf")
VLLM = dict(backend="vllm")
API = dict(backend="openai", model="gpt-4o-mini")
SIM = dict(backend="simulated", report_mode="free")


@pytest.mark.parametrize("base, change, expect", [
    # [simulated] is read by the simulated backend only
    (HF, {"simulated": {"fidelity": 0.5, "report_noise": 3.0}}, set()),
    (VLLM, {"simulated": {"choice_noise": 2.0}}, set()),
    (API, {"simulated": {"position_bias": 0.3}}, set()),
    (SIM, {"simulated": {"fidelity": 0.5}}, MEASURING | TRAINING),
    # [vllm] by vllm only; [openai] by the openai backend or trainer only
    (HF, {"vllm": {"max_num_seqs": 7}}, set()),
    (SIM, {"openai": {"base_url": "http://127.0.0.1:1/v1"}}, set()),
    (VLLM, {"vllm": {"max_num_seqs": 7}}, set()),  # an engine limit: operational, not a result
    # batch_size: hf and vllm pad or batch prompts into one forward (float rounding), so measuring
    # stages are keyed by it; training stages never read it (the [instill] block has its own)
    (HF, {"batch_size": 8}, MEASURING),
    (VLLM, {"batch_size": 8}, MEASURING),
    (SIM, {"batch_size": 3}, set()),
    (API, {"batch_size": 3}, set()),
    # what a stage does read still counts
    (HF, {"n_reports": 3}, {s for s in MEASURING if s.startswith("reports_")}),
    (HF, {"instill": {"lr": 1e-4}}, {"instill"}),
    (SIM, {"seed": 1}, {"design", "analysis"}),  # every other stage follows through the design's checksums
    # soft instillation labels make other datasets (the design's), not another trainer; with hard
    # labels their temperature is read by nothing
    (HF, {"instill": {"labels": "soft"}}, {"design"}),
    (HF, {"instill": {"label_temperature": 5.0}}, set()),
    # the auxiliary read-out: its targets go into the design's training set, its weight to the trainer
    (HF, {"instill": {"attribute_loss": 1.0}}, {"design", "instill"}),
    (HF, {"instill": {"attribute_loss": 0.0}}, set()),
])
def test_stage_keys_hold_what_the_stage_reads(base, change, expect):
    a = config.build("smoke", overrides=base)
    b = config.build("smoke", overrides={**base, **change})
    got = changed(a, b)
    # Downstream stages follow through their inputs' checksums ("needs"), not through these fields.
    assert got == expect, (base, change, sorted(got))


def _small(**over):
    return config.build("simulated", overrides={"n_instilled": 8, "n_native": 4, "n_reports": 3, "n_eval_trials": 20,
                                                 "n_native_trials": 20, **over})


def _run(cfg, root):
    out = io.StringIO()
    res = Run(cfg, root, progress=False, console=Console(file=out, width=200)).execute()
    return res, out.getvalue()


def test_a_simulated_run_with_another_batch_size_is_done_and_equal(tmp_path):
    first, _ = _run(_small(), tmp_path / "a")
    again, log = _run(_small(batch_size=3), tmp_path / "a")
    assert "finished in" not in log and log.count(": done") == len(STAGES)  # nothing redone
    fresh, _ = _run(_small(batch_size=3), tmp_path / "b")  # and it would not have changed anything
    assert json.dumps(fresh["models"], sort_keys=True) == json.dumps(first["models"], sort_keys=True)


def test_a_simulated_field_change_redoes_the_model_stages(tmp_path):
    _run(_small(), tmp_path)
    _, log = _run(_small(simulated={"report_noise": 1.0}), tmp_path)
    assert "- design: done" in log and "> reports_base" in log and "> instill" in log


def test_stages_recorded_under_the_older_keys_are_still_done(tmp_path):
    cfg = _small()
    _run(cfg, tmp_path)
    run = Run(cfg, tmp_path, progress=False, console=Console(file=io.StringIO()))
    for stage in STAGES:
        f = tmp_path / "stages" / f"{stage.name}.json"
        st = json.loads(f.read_text())
        if run.legacy_key(stage) is not None:
            assert run.legacy_key(stage) != st["key"]
            st["key"] = run.legacy_key(stage)  # as a run made before the narrower keys recorded it
        f.write_text(json.dumps(st))
    _, log = _run(cfg, tmp_path)
    assert "finished in" not in log and log.count(": done") == len(STAGES)


def test_soft_labels_go_into_the_training_set_only(tmp_path):
    from selfinterp.pipeline.stages import stage_design

    def rows(cfg, name):
        run = Run(cfg, tmp_path / cfg.instill.labels, progress=False, console=Console(file=io.StringIO()))
        stage_design(run)
        return [json.loads(line) for line in (run.path("datasets") / name).read_text().splitlines()]

    hard = config.build("smoke", overrides=HF)
    soft = config.build("smoke", overrides={**HF, "instill": {"labels": "soft", "label_temperature": 10.0}})
    train, val = rows(soft, "instill_train.jsonl"), rows(soft, "instill_val.jsonl")
    assert [r["messages"] for r in train] == [r["messages"] for r in rows(hard, "instill_train.jsonl")]
    assert all("soft_answer" not in r for r in val) and all(len(r["soft_answer"]) == 2 for r in train)
    for r in train:  # the soft target agrees with the hard answer it sits beside, and is a distribution
        p_a, answer = r["soft_answer"]["A"], r["messages"][-1]["content"]
        assert abs(p_a + r["soft_answer"]["B"] - 1) < 1e-5 and (p_a >= 0.5) == (answer == "A")
    assert len({r["soft_answer"]["A"] for r in train}) > len(train) // 4  # graded, not two values


def test_attribute_targets_reach_the_training_set(tmp_path):
    cfg = config.build("smoke", overrides={**HF, "n_train": 4, "instill": {"attribute_loss": 1.0}})
    run = Run(cfg, tmp_path, progress=False, console=Console(file=io.StringIO()))
    from selfinterp.pipeline.stages import stage_design

    stage_design(run)
    rows = [json.loads(x) for x in (tmp_path / "datasets" / "instill_train.jsonl").read_text().splitlines()]
    assert all(len(r["attribute_targets"]) == 5 and all(-1 <= v <= 1 for v in r["attribute_targets"]) for r in rows)
    assert rows[0]["attribute_targets"] == [-v for v in rows[1]["attribute_targets"]]  # a pair and its swap
    val = (tmp_path / "datasets" / "instill_val.jsonl").read_text()
    assert "attribute_targets" not in val
    with pytest.raises(ValueError, match="attribute_loss needs the hf trainer"):
        config.build(overrides={**API, "instill": {"attribute_loss": 1.0}})


def test_soft_labels_need_a_trainer_that_reads_them():
    with pytest.raises(ValueError, match="instill.labels 'soft' needs the hf trainer"):
        config.build(overrides={**API, "instill": {"labels": "soft"}})


def test_training_dtype_auto_keys_as_float32():
    """dtype 'auto' (the default since it was added) keys as the float32 it replaced, so runs made
    before keep their training stages; another dtype is another key."""
    auto = config.build("cpu")
    assert auto.instill.dtype == "auto"
    same = config.build("cpu", overrides={"instill": {"dtype": "float32"}})
    other = config.build("cpu", overrides={"instill": {"dtype": "bfloat16"}})
    assert auto.hash_fields("instill") == same.hash_fields("instill") != other.hash_fields("instill")
