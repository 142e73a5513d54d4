"""The notebook API: selfinterp.analyze / run_experiment / compare, and the README's example."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import selfinterp
from selfinterp import api
from selfinterp.analysis import CONDITIONS as ALL_CONDITIONS, EFFECTS as ALL_EFFECTS

# A run without cross_model_control computes every condition but the control's.
CONDITIONS = [c for c in ALL_CONDITIONS if not c.name.startswith("control_")]
EFFECTS = [e for e in ALL_EFFECTS if not e[1].startswith("control_")]

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    m = re.search(r"<!-- notebook example -->\n```python\n(.*?)\n```", README.read_text(encoding="utf-8"), re.S)
    assert m, "README.md: no python block after <!-- notebook example -->"
    return m.group(1)


def test_readme_example_runs_as_written(synthetic_data, tmp_path, monkeypatch):
    (tmp_path / "tests" / "data").mkdir(parents=True)
    shutil.copytree(synthetic_data, tmp_path / "tests" / "data" / "synthetic")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md (notebook example)", "exec"), scope)
    assert isinstance(scope["res"], api.Results) and isinstance(scope["sim"], api.Results)
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "comparison").iterdir()) == [
        "comparison.csv", "comparison.md", "comparison.png", "settings.csv"]
    assert (tmp_path / "runs" / "sim" / "report.html").exists()
    st = scope["cmp"].settings()
    assert list(st.columns) == ["synthetic", "sim"] and "n_instilled" in st.index


def test_import_is_light():
    code = ("import sys, selfinterp; heavy = [m for m in ('torch', 'transformers', 'pandas', 'numpy', 'matplotlib') "
            "if m in sys.modules]; print(heavy); assert not heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_table_effects_plot(synthetic_data):
    res = selfinterp.analyze(synthetic_data, n_boot=200)
    assert res.models == ["simulated"] and "simulated" in repr(res)
    t = res.table()
    assert isinstance(t, pd.DataFrame)
    assert list(t.columns[:12]) == api.TABLE_COLUMNS
    assert list(t["condition"]) == [c.name for c in CONDITIONS]
    assert (t["ci_low"] <= t["r"]).all() and (t["r"] <= t["ci_high"]).all()
    row = t.set_index("condition").loc["instilled_reports"]
    j = res.results["models"]["simulated"]["instilled_reports"]
    assert row["r"] == j["r"] and row["n_reports"] == j["n_reports"] == 48 and row["label"] == "instilled model's reports"
    e = res.effects()
    assert list(e.columns) == api.EFFECT_COLUMNS
    assert list(e["effect"]) == [name for name, _, _ in EFFECTS]
    assert e.set_index("effect").loc["itrained_effect", "baseline"] == "instilled_reports"
    fig = res.plot()
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [c.label for c in CONDITIONS]
    assert "<table" in res._repr_html_()
    assert res.notes == res.results.get("notes", [])
    with pytest.raises(KeyError, match="no model 'gpt-4o'"):
        res.table("gpt-4o")
    # Seeded: the same call gives the same numbers.
    assert selfinterp.analyze(synthetic_data, n_boot=200).results == res.results


def test_extra_statistics_become_columns(synthetic_data):
    """A statistic the results hold for a condition (e.g. a p-value) is a column of the table."""
    res = selfinterp.analyze(synthetic_data, n_boot=50)
    res.results["models"]["simulated"]["instilled_reports"]["p_value"] = 0.001
    t = res.table().set_index("condition")
    assert t.loc["instilled_reports", "p_value"] == 0.001 and pd.isna(t.loc["base_reports", "p_value"])


def test_paper_data(paper_table_data):
    res = selfinterp.analyze(paper_table_data, n_boot=100)
    t = res.table("gpt-4o-mini-2024-07-18").set_index("condition")
    assert t.loc["itrained_heldout", "r"] == pytest.approx(0.752, abs=0.01)
    assert set(res.table()["model"]) == {"gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18"}
    fig = res.plot()
    assert len(fig.axes[0].get_legend().get_texts()) == 2


def test_paper_true_uses_the_cache(paper_data, tmp_path, monkeypatch):
    from selfinterp.paperdata import PaperDataError, fetch

    monkeypatch.setenv("SELFINTERP_CACHE", str(tmp_path))
    with pytest.raises(PaperDataError, match="selfinterp data paper"):
        selfinterp.analyze(paper=True)
    fetch(source=paper_data)
    assert selfinterp.paper_data() == tmp_path / "paper-data" / selfinterp.paperdata.manifest().commit
    assert selfinterp.analyze(paper=True, n_boot=20).models == ["gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18"]


def test_run_experiment_is_the_cli_run(tmp_path):
    from typer.testing import CliRunner

    from selfinterp.cli import app

    over = dict(n_instilled=6, n_native=4, n_train=20, n_val=4, n_eval_trials=20, n_native_trials=20, n_reports=3)
    res = selfinterp.run_experiment(preset="simulated", out=tmp_path / "api", progress=False, **over)
    cfg = tmp_path / "c.json"
    cfg.write_text(__import__("json").dumps({"preset": "simulated", **over}))
    cli = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "cli")])
    assert cli.exit_code == 0, cli.output
    again = selfinterp.analyze(tmp_path / "cli", n_boot=2000)
    assert res.results["models"] == again.results["models"]


def test_errors():
    from selfinterp.config import ConfigError
    from selfinterp.layout import LayoutError

    with pytest.raises(ValueError, match="give a directory, or paper=True"):
        selfinterp.analyze()
    with pytest.raises(LayoutError, match="not a directory"):
        selfinterp.analyze("/nonexistent/dir")
    with pytest.raises(ValueError, match="preset="):
        selfinterp.run_experiment()
    with pytest.raises(ConfigError, match="n_reports"):
        selfinterp.run_experiment(preset="simulated", n_reports=-1)
