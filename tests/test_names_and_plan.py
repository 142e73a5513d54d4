"""Issue 12: run names stay inside runs/; `plan` refuses designs too small to estimate."""

import numpy as np
import pytest
from typer.testing import CliRunner

from selfinterp import config, power, stats
from selfinterp.cli import app


@pytest.mark.parametrize("name", ["../../escape", "..", ".", "/tmp/abs", "a/b", "a\\b", "C:run", "x\ny", " pad"])
def test_run_names_that_leave_the_runs_folder_are_refused(name):
    with pytest.raises(config.ConfigError) as e:
        config.build("simulated", overrides={"name": name})
    assert "name:" in str(e.value) and "one plain name" in str(e.value)


@pytest.mark.parametrize("name", ["my-run", "run_2", "paper.v1", "Smoke"])
def test_plain_run_names_are_kept(name):
    assert config.build("simulated", overrides={"name": name}).name == name


def test_model_label_is_a_plain_name_too():
    with pytest.raises(config.ConfigError, match="model_label"):
        config.build("simulated", overrides={"model_label": "../x"})


def test_cli_refuses_an_escaping_name_before_writing(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    f = tmp_path / "work" / "bad.toml"
    f.write_text('preset = "simulated"\nname = "../../escape"\n')
    res = CliRunner().invoke(app, ["run", str(f)])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    assert res.output.startswith("error:") and "name:" in res.output
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    assert not (tmp_path / "work" / "runs").exists()


@pytest.mark.parametrize("args,needle", [
    (["--scenarios", "1"], "at least 3 scenarios"),
    (["--scenarios", "0"], "at least 3 scenarios"),
    (["--scenarios", "20,2"], "at least 3 scenarios"),
    (["--reports", "0"], "--reports"),
    (["--reports", "5,0"], "--reports"),
    (["--trials", "0"], "--trials"),
    (["--n-sim", "0"], "--n-sim"),
])
def test_plan_refuses_designs_too_small(args, needle):
    res = CliRunner().invoke(app, ["plan", *args])
    assert res.exit_code == 1, res.output
    assert needle in res.output and "power" not in res.output.lower().split("error")[0]
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("error:")
    assert isinstance(res.exception, SystemExit)  # a clean exit, not an exception


def test_power_table_refuses_them_too():
    with pytest.raises(power.DesignError):
        power.power_table(0.5, 0.0, [2], [5], 50, n_sim=3)
    with pytest.raises(power.DesignError):
        power.power_table(0.5, 0.0, [10], [5], 50, n_sim=0)


def test_a_study_whose_r_is_not_estimable_detects_nothing(monkeypatch):
    nan = stats.correlate(np.zeros((3, 5)), np.zeros((3, 5)), n_boot=10, seed=0)
    assert np.isnan(nan.ci).any()
    monkeypatch.setattr(stats, "correlate", lambda *a, **k: nan)
    row = power.power_table(0.5, 0.0, [3], [1], 5, n_sim=4, n_boot=10)[0]
    assert row["power"] == 0.0


def test_plan_smallest_design_runs():
    res = CliRunner().invoke(app, ["plan", "--scenarios", "3", "--reports", "1", "--trials", "5", "--n-sim", "3"])
    assert res.exit_code == 0, res.output
    assert "power" in res.output


def test_the_training_effects_ci_narrows_with_scenarios():
    """--effect-from: the paired CI of trained minus untrained r narrows as scenarios are added,
    and a large effect is found more often with more of them."""
    rows = power.power_table(0.55, 0.0, [10, 80], [5], 30, n_sim=20, n_boot=200, effect_from=0.25)
    small, large = rows
    assert large["effect_ci_half_width"] < 0.7 * small["effect_ci_half_width"]
    assert large["effect_power"] >= small["effect_power"] and large["effect_power"] > 0.5
    res = CliRunner().invoke(app, ["plan", "--scenarios", "3", "--reports", "1", "--trials", "5", "--n-sim", "3",
                                   "--target-r", "0.5", "--effect-from", "0.2"])
    assert res.exit_code == 0, res.output
    assert "CI half-width" in res.output
    bad = CliRunner().invoke(app, ["plan", "--scenarios", "3", "--reports", "1", "--trials", "5", "--n-sim", "3",
                                   "--effect-from", "1.5"])
    assert bad.exit_code != 0 and "effect-from" in bad.output
