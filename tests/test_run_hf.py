"""Every stage of a run on the transformers backend, with a tiny random model (seconds, not minutes).

The simulated backend (test_run.py) checks the statistics against known answers; this test checks
that the real model path, fine-tuning, merged and adapter models, constrained reports, the paper's
CSV layout and the report, fits together on a model small enough for CI.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from selfinterp import config
from selfinterp.pipeline import Run

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_run(tiny_model_dir, tmp_path_factory):
    train = dict(method="lora", layers=1, cache_lower_layers=True, lr=1e-3, epochs=1, batch_size=8)
    cfg = config.build("smoke", overrides=dict(
        model=str(tiny_model_dir), model_label="tiny", n_instilled=4, n_native=2, n_train=8, n_val=2,
        n_eval_trials=6, n_native_trials=6, eval_counterbalance=True, n_reports=2, n_introspection=2, batch_size=8,
        instill=train, introspection={**train, "method": "full"}, report_curves=True, introspection_stop="inner_r"))
    root = tmp_path_factory.mktemp("hf-run")
    results = Run(cfg, root, progress=False).execute()
    return root, results


def test_every_stage_finishes_with_its_artifacts(hf_run):
    root, results = hf_run
    states = {p.stem: json.loads(p.read_text()) for p in (root / "stages").glob("*.json")}
    expected = {"design", "instill", "validate", "reports_base", "reports_instilled", "itrain_first", "itrain_last",
                "itrain_all", "reports_itrained_first", "reports_itrained_last", "native_choices",
                "reports_native_instilled", "reports_native_itrained", "analysis", "report"}
    assert expected <= set(states)
    for name in expected:  # every output a stage registered exists
        for rel in states[name]["outputs"]:
            assert (root / rel).exists(), f"{name}: {rel}"
    # LoRA instillation wrote an adapter; full introspection training started from the merged model.
    assert (root / "models" / "instilled" / "adapter").is_dir()
    assert (root / "models" / "instilled" / "merged" / ".complete").exists()
    manifest = json.loads((root / "models" / "itrained_all" / "manifest.json").read_text())
    assert manifest["config"]["method"] == "full" and manifest["base_model"].endswith("merged")
    assert states["instill"]["summary"]["steps"] >= 1 and states["instill"]["summary"]["final_loss"] is not None
    assert (root / "report.html").read_text().count("<table") >= 3
    assert "tiny" in results["models"]


def test_report_curves_are_recorded_and_plotted(hf_run):
    """report_curves: each training's evaluations carry the r of expected-value reports (trained and
    held-out fold; instillation: against the instilled weights), and the report plots them."""
    root, _ = hf_run
    evals = {w: json.loads((root / "models" / w / "manifest.json").read_text())["evals"]
             for w in ("instilled", "itrained_first", "itrained_last", "itrained_all")}
    assert all("report_r_instilled" in e for e in evals["instilled"]) and evals["instilled"]
    for w in ("itrained_first", "itrained_last"):
        assert evals[w] and all({"report_r_trained", "report_r_heldout"} <= set(e) for e in evals[w])
        assert all(-1 <= e["report_r_heldout"] <= 1 for e in evals[w])
    assert (root / "analysis" / "report_curves.png").exists()
    # introspection_stop 'inner_r': one of each fold's 2 scenarios left out of its training and used
    # to choose the model kept.
    rows = (root / "datasets" / "introspection_first_half.inner_train.jsonl").read_text().splitlines()
    assert len(rows) == 2  # 1 scenario x n_introspection 2
    for w in ("itrained_first", "itrained_last", "itrained_all"):
        m = json.loads((root / "models" / w / "manifest.json").read_text())
        assert m["kept"]["key"] == "report_r_inner" and all("report_r_inner" in e for e in m["evals"])
        assert m["kept"]["value"] == max(e["report_r_inner"] for e in m["evals"])
    assert "report accuracy over training" in (root / "report.html").read_text()


def test_choices_are_probabilities_in_the_papers_layout(hf_run):
    root, _ = hf_run
    df = pd.read_csv(root / "tiny_instilled_selections.csv")
    assert len(df) == 4 * 6 * 2  # 4 scenarios x 6 pairs, each also swapped (eval_counterbalance)
    assert df["p_a"].between(0, 1).all() and df["mass"].between(0, 1.0001).all()
    assert set(df["selection"]) <= {"A", "B"}
    assert ((df["p_a"] >= 0.5) == (df["selection"] == "A")).all()


def test_constrained_reports_all_parse(hf_run):
    root, _ = hf_run
    for f in ("tiny_weight_reports.csv", "tiny_instilled_weight_reports.csv",
              "tiny_itrained_first_2_of_4_weight_reports.csv", "tiny_itrained_all_4_latent_weight_reports.csv"):
        raw = [json.loads(line) for line in (root / "raw" / f.replace(".csv", ".jsonl")).read_text().splitlines()]
        assert raw and all(r["ok"] and r["mode"] == "constrained" for r in raw), f
        df = pd.read_csv(root / f)
        assert len(df) == len(raw)
        assert df[[f"report_attr{j}" for j in range(1, 6)]].abs().le(100).all().all()


def test_a_finished_run_is_not_redone(hf_run, tiny_model_dir):
    root, results = hf_run
    cfg = config.RunConfig(**json.loads((root / "config.json").read_text()))
    before = {p.name: p.stat().st_mtime_ns for p in (root / "stages").glob("*.json")}
    again = Run(cfg, root, progress=False).execute()
    assert {p.name: p.stat().st_mtime_ns for p in (root / "stages").glob("*.json")} == before
    assert again == results


def test_estimate_before_and_timings_after(hf_run):
    """The run writes its estimate before the first stage; the report shows it beside the actual
    seconds; finished stages record the rates they achieved (here in the tests' own rates file)."""
    import os

    root, _ = hf_run
    est = json.loads((root / "estimate.json").read_text())
    assert est["stages"]["instill"]["seconds"] > 0 and est["stages"]["validate"]["device_gib"] > 0
    html = (root / "report.html").read_text()
    assert "estimated s" in html and "estimate.json" in html
    rates = json.loads(open(os.environ["SELFINTERP_RATES"]).read())
    mine = next(iter(rates.values()))
    assert any(k.startswith(("score:", "train:", "step:")) for model in mine.values() for k in model)


@pytest.mark.slow
def test_two_ranks_share_one_run(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m selfinterp run`: rank 0 runs every stage and writes every
    file; rank 1 joins the run's lock and each training stage, which then trains over both ranks."""
    import os
    import socket
    import subprocess
    import sys

    train = dict(method="lora", layers=1, cache_lower_layers=True, lr=1e-3, epochs=1, batch_size=8)
    cfg = config.build("smoke", overrides=dict(
        model=str(tiny_model_dir), model_label="tiny", n_instilled=4, n_native=2, n_train=8, n_val=2,
        n_eval_trials=6, n_native_trials=6, eval_counterbalance=True, n_reports=2, n_introspection=2, batch_size=8,
        instill=train, introspection={**train, "method": "full"}))
    (tmp_path / "run.json").write_text(cfg.model_dump_json())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "selfinterp", "run", str(tmp_path / "run.json"), "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    root = tmp_path / "run"
    assert json.loads((root / "analysis" / "results.json").read_text())["models"]["tiny"]
    for model in ("instilled", "itrained_first", "itrained_last", "itrained_all"):
        assert json.loads((root / "models" / model / "manifest.json").read_text())["world_size"] == 2, model
    assert "rank 1: done" in proc.stderr and (root / "report.html").exists()
