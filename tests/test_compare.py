"""`selfinterp compare`: every condition's r with CIs across runs, and the settings that differ."""

import csv
import json

import pytest
from typer.testing import CliRunner

from selfinterp import comparison, config
from selfinterp.analysis import CONDITIONS as ALL_CONDITIONS, EFFECTS as ALL_EFFECTS

# A run without cross_model_control computes every condition but the control's.
CONDITIONS = [c for c in ALL_CONDITIONS if not c.name.startswith("control_")]
EFFECTS = [e for e in ALL_EFFECTS if not e[1].startswith("control_")]
from selfinterp.cli import app
from selfinterp.pipeline import Run

run = CliRunner().invoke
N_ROWS = len(CONDITIONS) + len(EFFECTS)


def small(**over):
    base = dict(n_instilled=8, n_native=6, n_train=30, n_val=5, n_eval_trials=30, n_native_trials=30,
                n_reports=3, n_introspection=2)
    return config.build("simulated", overrides={**base, **over})


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("seed0", 0), ("seed1", 1)):
        Run(small(seed=seed), root / name, progress=False).execute()
    return root / "seed0", root / "seed1"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_runs(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "cmp"
    res = run(app, ["compare", str(a), str(b), "--out", str(out), "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    assert "settings that differ" in res.output and "seed0" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "comparison.md", "comparison.png", "settings.csv"]
    rows = read_csv(out / "comparison.csv")
    assert len(rows) == 2 * N_ROWS
    assert {r["run"] for r in rows} == {"seed0", "seed1"} and {r["model"] for r in rows} == {"simulated"}
    # The table's numbers are each run's own analysis (same bootstrap settings).
    for name, path in (("seed0", a), ("seed1", b)):
        own = run(app, ["analyze", str(path), "--out", str(tmp_path / name), "--n-boot", "200", "--no-figures"])
        assert own.exit_code == 0, own.output
        j = json.loads((tmp_path / name / "results.json").read_text())
        for r in rows:
            if r["run"] == name and r["kind"] == "condition":
                c = j["models"]["simulated"][r["name"]]
                assert float(r["r"]) == pytest.approx(c["r"]) and float(r["ci_low"]) == pytest.approx(c["ci"][0])
            elif r["run"] == name:
                assert float(r["r"]) == pytest.approx(j["effects"]["simulated"][r["name"]]["diff"])
    # Only the seed differs between the two configurations.
    settings = read_csv(out / "settings.csv")
    assert settings == [{"setting": "seed", "seed0": "0", "seed1": "1"}]
    md = (out / "comparison.md").read_text()
    assert "| condition | seed0 | seed1 |" in md and "| seed | 0 | 1 |" in md
    for c in CONDITIONS:
        assert f"| {c.name} |" in md
    assert (out / "comparison.png").stat().st_size > 10_000
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_data_and_a_run(paper_table_data, two_runs, tmp_path):
    out = tmp_path / "cmp"
    res = run(app, ["compare", str(paper_table_data), str(two_runs[0]), "--out", str(out), "--n-boot", "100"])
    assert res.exit_code == 0, res.output
    rows = read_csv(out / "comparison.csv")
    series = list(dict.fromkeys(r["series"] for r in rows))
    paper = "paper" if paper_table_data.name != "paper-data" else "paper-data"
    assert series == [f"{paper}: gpt-4o-2024-08-06", f"{paper}: gpt-4o-mini-2024-07-18", "seed0"]
    r = {(x["series"], x["name"]): float(x["r"]) for x in rows}
    assert r[(f"{paper}: gpt-4o-2024-08-06", "instilled_reports")] == pytest.approx(0.543, abs=0.01)
    md = (out / "comparison.md").read_text()
    assert "Not comparable: 1 of the sources has a config.json." in md
    assert read_csv(out / "settings.csv") == []


def test_paper_from_the_cache(paper_data, two_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFINTERP_CACHE", str(tmp_path / "cache"))
    res = run(app, ["compare", str(two_runs[0]), "--paper", "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 1 and "selfinterp data paper" in res.output and "Traceback" not in res.output
    assert run(app, ["data", "paper", "--from", str(paper_data)]).exit_code == 0
    c = comparison.compare([two_runs[0]], paper=True, n_boot=50)
    assert [s.label for s in c.sources] == ["seed0", "paper"]
    assert c.settings()["paper"].eq("(no config.json)").all()


def test_same_names_are_told_apart(two_runs, tmp_path):
    import shutil

    for d in ("x", "y"):
        shutil.copytree(two_runs[0], tmp_path / d / "run")
    c = comparison.compare([tmp_path / "x" / "run", tmp_path / "y" / "run"], n_boot=50)
    assert [s.label for s in c.sources] == [str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]
    assert c.settings().empty
    assert "None." in c.markdown()


def test_errors_are_one_line(tmp_path, two_runs):
    res = run(app, ["compare"])
    assert res.exit_code == 1 and "give one or more run" in res.output
    res = run(app, ["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and f"{tmp_path / 'nope'}: not a directory" in res.output
    (tmp_path / "empty").mkdir()
    res = run(app, ["compare", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "no results files found" in res.output
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(two_runs[0], bad)
    (bad / "config.json").write_text("{not json")
    res = run(app, ["compare", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and f"{bad / 'config.json'}: not a readable JSON file" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()
