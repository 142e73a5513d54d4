"""The whole protocol on the simulated backend: known answers, seconds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from selfinterp import config
from selfinterp.backends.simulated import expected_report_r, report_noise_for_r
from selfinterp.cli import app
from selfinterp.pipeline import Run

PAPER_FILES = [
    "{m}_instilled_selections.csv", "{m}_instilled_latent_selections.csv", "{m}_weight_reports.csv",
    "{m}_instilled_weight_reports.csv", "{m}_itrained_first_5_of_10_weight_reports.csv",
    "{m}_itrained_last_5_of_10_weight_reports.csv", "{m}_instilled_latent_weight_reports.csv",
    "{m}_itrained_all_10_latent_weight_reports.csv",
]


def small(**over):
    base = dict(n_instilled=10, n_native=6, n_train=40, n_val=5, n_eval_trials=40, n_native_trials=40,
                n_reports=4, n_introspection=2)
    return config.build("simulated", overrides={**base, **over})


def journal_lines(root: Path) -> list[str]:
    return [line for p in sorted((root / "journal").glob("*.jsonl")) for line in p.read_text().splitlines()]


def test_every_stage_and_artifact(tmp_path):
    res = Run(small(), tmp_path, progress=False).execute()
    for f in PAPER_FILES:
        assert (tmp_path / f.format(m="simulated")).exists(), f
    for f in ("config.json", "design.json", "scenarios.json", "instilled_weights.csv", "report.html",
              "analysis/results.json", "datasets/instill_train.jsonl", "datasets/introspection_all.jsonl"):
        assert (tmp_path / f).exists(), f
    assert len(list((tmp_path / "raw").glob("*.jsonl"))) == 6
    conds = res["models"]["simulated"]
    assert set(conds) == {"instillation", "base_reports", "instilled_reports", "itrained_heldout",
                          "itrained_first_half_trained", "itrained_second_half_trained",
                          "native_instilled_reports", "native_itrained_reports"}
    assert conds["instillation"]["r"] > 0.8
    # The simulated model reports better after introspection training, as configured.
    assert conds["itrained_heldout"]["r"] > conds["instilled_reports"]["r"]
    # `selfinterp analyze` reads a run directory exactly like the paper's data.
    out = CliRunner().invoke(app, ["analyze", str(tmp_path), "--out", str(tmp_path / "again"), "--no-figures"])
    assert out.exit_code == 0, out.output
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["models"]["simulated"]["instilled_reports"]["r"] == pytest.approx(conds["instilled_reports"]["r"])
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "Self-report parsing" in html


def test_rerun_does_nothing_and_changes_rerun_only_downstream(tmp_path):
    cfg = small()
    Run(cfg, tmp_path, progress=False).execute()
    states = {p.name: json.loads(p.read_text()) for p in (tmp_path / "stages").glob("*.json")}
    lines = journal_lines(tmp_path)
    Run(cfg, tmp_path, progress=False).execute()
    assert journal_lines(tmp_path) == lines
    assert {p.name: json.loads(p.read_text()) for p in (tmp_path / "stages").glob("*.json")} == states
    # More reports: report stages re-run, fine-tuning and choices do not.
    Run(small(n_reports=5), tmp_path, progress=False).execute()
    after = {p.name: json.loads(p.read_text()) for p in (tmp_path / "stages").glob("*.json")}
    for name in ("design.json", "instill.json", "validate.json", "itrain_first.json", "native_choices.json"):
        assert after[name]["finished"] == states[name]["finished"], name
    for name in ("reports_base.json", "reports_instilled.json", "analysis.json"):
        assert after[name]["key"] != states[name]["key"], name


def test_corrupt_artifact_is_redone(tmp_path):
    cfg = small()
    Run(cfg, tmp_path, progress=False).execute()
    target = tmp_path / "simulated_instilled_weight_reports.csv"
    good = target.read_text()
    target.write_text(good[: len(good) // 2])  # truncated
    Run(cfg, tmp_path, progress=False).execute()
    assert target.read_text() == good


def test_gate_stops_a_failed_instillation(tmp_path):
    cfg = small(simulated={"fidelity": 0.0}, gate={"min_agreement": 0.9, "min_r": 0.5})
    from selfinterp.pipeline import GateFailed

    with pytest.raises(GateFailed, match="held-out agreement"):
        Run(cfg, tmp_path, progress=False).execute()
    assert not (tmp_path / "report.html").exists()
    Run(cfg, tmp_path, progress=False, force=True).execute()
    assert (tmp_path / "report.html").exists()


def test_recovers_a_known_accuracy():
    """Report noise set so the true r is 0.5: the run's CI must contain 0.5."""
    noise = report_noise_for_r(0.5, n_reports=10)
    assert expected_report_r(noise, 10) == pytest.approx(0.5, abs=0.01)
    cfg = config.build("simulated", overrides=dict(
        n_instilled=100, n_native=0, n_train=100, n_eval_trials=200, n_reports=10, n_introspection=1,
        simulated={"report_noise": noise, "fidelity": 1.0, "choice_noise": 5.0}))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = Run(cfg, d, progress=False).execute()
    c = res["models"]["simulated"]["instilled_reports"]
    assert c["ci"][0] <= 0.5 <= c["ci"][1], c
    assert c["p_permutation"] < 0.01 and c["null_quantiles"][0] < 0 < c["null_quantiles"][2]


def test_clipped_normal_moments_match_sampling():
    from selfinterp.backends.simulated import _clipped_normal_moments

    rng = np.random.default_rng(0)
    mu = np.array([-150.0, -40.0, 0.0, 60.0, 100.0])
    x = np.clip(mu + rng.normal(scale=120.0, size=(400_000, 5)), -100, 100)
    m, sd = _clipped_normal_moments(mu, 120.0, -100, 100)
    assert m == pytest.approx(x.mean(axis=0), abs=0.5) and sd == pytest.approx(x.std(axis=0), abs=0.5)
    assert _clipped_normal_moments(mu, 0.0, -100, 100)[0].tolist() == [-100, -40, 0, 60, 100]


def test_expected_reports_recover_a_known_accuracy():
    """report_mode 'expected' on the simulated model: each report is the exact mean of its sampled
    reports, so the run's r is the population r of those means (computed here in closed form),
    and two reports of a scenario agree exactly."""
    from selfinterp import design
    from selfinterp.backends.simulated import _clipped_normal_moments

    access, noise = 0.6, 150.0
    rng = np.random.default_rng(0)
    w, decoy = (design.rescale(rng.uniform(-100, 100, (20_000, 5))) for _ in range(2))
    known = np.corrcoef(_clipped_normal_moments(access * w + (1 - access) * decoy, noise, -100, 100)[0].ravel(),
                        w.ravel())[0, 1]
    cfg = config.build("simulated", overrides=dict(
        n_instilled=100, n_native=0, n_train=100, n_eval_trials=200, n_reports=2, n_introspection=1,
        report_mode="expected",
        simulated={"report_noise": noise, "fidelity": 1.0, "choice_noise": 5.0, "report_access": access}))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = Run(cfg, d, progress=False).execute()
        raw = [json.loads(line) for line in (Path(d) / "raw" / "simulated_instilled_weight_reports.jsonl").read_text().splitlines()]
    c = res["models"]["simulated"]["instilled_reports"]
    assert 0.5 < known < 0.9 and c["ci"][0] <= known <= c["ci"][1], (known, c)
    assert c["reliability"] == pytest.approx(1.0)
    assert all(r["mode"] == "expected" and len(r["sd"]) == 5 for r in raw)


def test_cross_model_control_separates_introspection_from_the_text(tmp_path):
    """The base model, given the same introspection training, reports its own (native) weights:
    against the instilled model's learned weights it scores ~0, so the trained model's reports
    beat it; the control's files follow the paper's naming with a control_ prefix."""
    cfg = small(n_instilled=40, n_native=20, n_eval_trials=100, n_native_trials=100, cross_model_control=True,
                simulated={"report_noise": 60.0, "fidelity": 1.0, "choice_noise": 5.0})
    run = Run(cfg, tmp_path, progress=False)
    assert {"itrain_control_first", "reports_control_native"} <= {s.name for s in run.stages()}
    res = run.execute()
    assert sorted(p.name for p in tmp_path.glob("simulated_control_*.csv")) == [
        "simulated_control_itrained_all_40_latent_weight_reports.csv",
        "simulated_control_itrained_first_20_of_40_weight_reports.csv",
        "simulated_control_itrained_last_20_of_40_weight_reports.csv"]
    conds, effects = res["models"]["simulated"], res["effects"]["simulated"]
    control, trained = conds["control_itrained_heldout"], conds["itrained_heldout"]
    assert control["ci"][0] < 0 < control["ci"][1] and control["p_permutation"] > 0.01
    assert trained["r"] > 0.5 and effects["itrained_over_control"]["ci"][0] > 0.2
    assert "control_native_itrained" in conds and "native_itrained_over_control" in effects
    assert not any(s.control for s in Run(small(), tmp_path / "plain", progress=False).stages())


def test_a_model_without_access_is_not_called_introspective():
    """report_access 0: the reports centre on weights unrelated to the model's choices, so the
    permutation test finds nothing, while the same model with access is found at once. (Under the
    null p is uniform: p > 0.05 fails 5% of seeds, p > 0.01 1%; test_stats checks the 5% size.)"""
    import tempfile

    ps = {}
    for access in (0.0, 1.0):
        cfg = config.build("simulated", overrides=dict(
            n_instilled=40, n_native=0, n_train=100, n_eval_trials=200, n_reports=10, n_introspection=1,
            simulated={"report_noise": 100.0, "fidelity": 1.0, "choice_noise": 5.0, "report_access": access}))
        with tempfile.TemporaryDirectory() as d:
            conds = Run(cfg, d, progress=False).execute()["models"]["simulated"]
        assert conds["instillation"]["p_permutation"] < 0.01  # the choices carry the weights either way
        ps[access] = conds["instilled_reports"]["p_permutation"]
    assert ps[0.0] > 0.01 and ps[1.0] < 0.001, ps


def test_sigkill_mid_stage_then_resume_repeats_no_call(tmp_path):
    """kill -9 during a stage; the re-run completes, and no model call is made twice."""
    out = tmp_path / "run"
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('preset = "simulated"\nn_instilled = 10\nn_native = 4\nn_train = 20\nn_eval_trials = 60\n'
                        'n_native_trials = 20\nn_reports = 3\nbatch_size = 4\n[simulated]\ncall_delay = 0.01\n')
    cmd = [sys.executable, "-m", "selfinterp", "run", str(cfg_file), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the validate stage has journaled some calls
        lines = journal_lines(out) if (out / "journal").exists() else []
        if len(lines) >= 40:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.html").exists()
    killed_at = len(journal_lines(out))
    assert 0 < killed_at < 600
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = journal_lines(out)
    keys = [(p.name, json.loads(line)["key"]) for p in sorted((out / "journal").glob("*.jsonl"))
            for line in p.read_text().splitlines()]
    assert len(keys) == len(set(keys)), "a model call was made twice"
    assert len(lines) == 10 * 60 + 4 * 20 + 3 * (10 + 10 + 5 + 5 + 4 + 4)
    assert (out / "report.html").exists()


def test_config_errors_name_the_field(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('preset = "smoke"\nn_reports = 0\n[instill]\nlr = -1\n')
    res = CliRunner().invoke(app, ["run", str(f), "--dry-run"])
    assert res.exit_code == 1
    assert "n_reports: Input should be greater than or equal to 1" in res.output
    assert "instill.lr: Input should be greater than 0" in res.output
    f.write_text("n_report = 3\n")
    res = CliRunner().invoke(app, ["run", str(f), "--dry-run"])
    assert res.exit_code == 1 and "n_report: Extra inputs are not permitted" in res.output
    res = CliRunner().invoke(app, ["run", "--preset", "nope"])
    assert res.exit_code == 1 and "unknown preset 'nope'" in res.output


def test_dry_run_plan():
    res = CliRunner().invoke(app, ["run", "--preset", "paper", "--dry-run"])
    assert res.exit_code == 0
    # 100 x 50 choices + 100 x 100 native choices + 10 reports x (100 + 100 + 50 + 50 + 100 + 100)
    assert "20000" in res.output and "15000" in res.output


def test_plan_power_analysis():
    res = CliRunner().invoke(app, ["plan", "--target-r", "0.5", "--scenarios", "20", "--reports", "2",
                                   "--n-sim", "10"])
    assert res.exit_code == 0 and "power" in res.output


def test_checkpoint_frequency_is_not_part_of_a_stage_key():
    a = config.build("cpu")
    b = config.build("cpu", overrides={"instill": {"checkpoint_every": 7}})
    c = config.build("cpu", overrides={"instill": {"lr": 1e-4}})
    assert a.hash_fields("instill") == b.hash_fields("instill") != c.hash_fields("instill")


def test_report_html_escapes_what_it_shows(tmp_path):
    """report.html is a jinja2 template with autoescaping: a run name with markup in it is shown,
    not interpreted, and every section is there."""
    Run(small(name="<b>x&co", n_instilled=4, n_native=2), tmp_path, progress=False).execute()
    page = (tmp_path / "report.html").read_text()
    assert "<b>x" not in page and "&lt;b&gt;x&amp;co" in page
    for section in ("Accuracy of self-reports", "Figures", "Instillation", "Self-report parsing", "Fine-tuning",
                    "Stages and timings", "Provenance"):
        assert f"<h2>{section}</h2>" in page
    assert '<span class="ok">passed</span>' in page or '<span class="bad">failed</span>' in page
