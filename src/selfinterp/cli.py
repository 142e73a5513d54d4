"""The ``selfinterp`` command line.

Every command validates its inputs at the boundary and reports problems as one clear message
naming the file and field (exit code 1), never as a traceback.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__

app = typer.Typer(help="Self-interpretability experiments on language models (Plunkett et al. 2025).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
scenarios_app = typer.Typer(help="The scenario bank and scenario files: list, show, validate.", no_args_is_help=True)
app.add_typer(scenarios_app, name="scenarios")

console = Console()
if not console.is_terminal:  # logs and pipes: rich would assume 80 columns and fold the tables
    console = Console(width=120)
err = Console(stderr=True, soft_wrap=True)  # error messages stay whole lines (greppable)


def fail(message: str) -> None:
    """Print ``message`` as an error on stderr and exit with code 1."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(1)


MAX_SEED = 2**32 - 1  # what every library seeded here takes (numpy, torch, random, the APIs)


def check_seed(seed: Optional[int]) -> None:
    """Exit with an error unless ``seed`` is None or a whole number from 0 to ``MAX_SEED``."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        fail(f"--seed must be a whole number from 0 to {MAX_SEED}, got {seed}")


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"selfinterp {__version__}")


def _print_version(value: bool) -> None:
    if value:
        console.print(f"selfinterp {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit."),
) -> None:
    """Self-interpretability experiments on language models (Plunkett et al. 2025)."""


# --------------------------------------------------------------------------------------------
# scenarios


def _load_scenarios(file: Optional[Path]):
    from .scenarios import ScenarioError, load, load_bank

    try:
        return load(file, k=None) if file is not None else load_bank()
    except ScenarioError as e:
        fail(str(e))


@scenarios_app.command("list")
def scenarios_list(
    file: Optional[Path] = typer.Argument(None, help="A scenario file (JSON, or the paper's scenarios.csv); default: the bundled bank."),
    domain: Optional[str] = typer.Option(None, help="Only this domain (bundled bank)."),
) -> None:
    """List scenarios: id, domain, question, attributes."""
    ss = _load_scenarios(file)
    if domain:
        ss = [s for s in ss if s.domain == domain]
        if not ss:
            fail(f"no scenarios in domain {domain!r}")
    t = Table(title=f"{len(ss)} scenarios", show_lines=False)
    for col in ("id", "domain", "question", "attributes"):
        t.add_column(col, overflow="fold")
    for s in ss:
        t.add_row(s.id, s.domain, s.prompt_question, ", ".join(s.attribute_names))
    console.print(t)


@scenarios_app.command("show")
def scenarios_show(
    scenario_id: str = typer.Argument(..., help="The scenario's id."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Scenario file; default: the bundled bank."),
    seed: int = typer.Option(0, help="Seed for the example weights and pair."),
) -> None:
    """Show one scenario: its attributes, example instilled weights, and the prompts it yields."""
    from . import design, prompts

    check_seed(seed)
    ss = {s.id: s for s in _load_scenarios(file)}
    if scenario_id not in ss:
        fail(f"no scenario {scenario_id!r}" + (f" in {file}" if file else " in the bundled bank"))
    s = ss[scenario_id]
    w = design.draw_weights(s, seed)
    t = Table(title=f"{s.id} ({s.domain or 'no domain'}): {s.prompt_question}")
    for col in ("attribute", "units", "min", "max", "decimals", f"weight (seed {seed})"):
        t.add_column(col)
    for a, wi in zip(s.attributes, w):
        t.add_row(a.name, a.units, f"{a.min:g}", f"{a.max:g}", str(a.decimals), str(wi))
    console.print(t)
    pair = design.sample_pairs(s, 1, seed, weights=w)[0]
    console.rule("decision prompt")
    console.print(prompts.decision_prompt(s, pair.a, pair.b), highlight=False, markup=False)
    console.print(f"-> simulated choice: {design.simulated_choice(s, w, pair)}")


@scenarios_app.command("validate")
def scenarios_validate(
    file: Path = typer.Argument(..., help="A scenario file: JSON list, or the paper's scenarios.csv."),
    k: int = typer.Option(5, help="Required number of attributes per scenario (0: any)."),
) -> None:
    """Check a scenario file and print every problem with its location (exit code 1 if any)."""
    from rich.markup import escape

    from .scenarios import validate_file

    scenarios, problems = validate_file(file, k=k or None)
    if problems:
        for p in problems:
            err.print(f"[red]{escape(p.location)}[/]: {escape(p.message)}", highlight=False)
        err.print(f"{len(problems)} problem(s) in {file}")
        raise typer.Exit(1)
    console.print(f"{file}: {len(scenarios)} scenarios, all valid")


# --------------------------------------------------------------------------------------------
# export


@app.command()
def export(
    out: Path = typer.Argument(..., help="Directory to write the datasets into."),
    scenarios_file: Optional[Path] = typer.Option(None, "--scenarios", help="Scenario file; default: the bundled bank."),
    roles_file: Optional[Path] = typer.Option(None, "--roles", help="Roles CSV (column 'role'); default: the bundled roles. Ignored for scenarios.csv, whose questions carry roles."),
    n_scenarios: int = typer.Option(100, help="How many scenarios to instil (drawn with the seed from the bank; the first N of a file)."),
    n_train: int = typer.Option(50, help="Preference examples per scenario."),
    n_val: int = typer.Option(10, help="Validation examples per scenario."),
    n_introspection: int = typer.Option(1, help="Introspection-training examples per scenario."),
    counterbalance: bool = typer.Option(False, help="Also show every pair with A and B swapped (the paper did not)."),
    seed: int = typer.Option(0, help="Seed of every draw."),
) -> None:
    """Write the fine-tuning datasets (OpenAI chat JSONL) of a study, for any trainer or service."""
    from . import design
    from .scenarios import ScenarioError, assign_roles, load_bundled_roles, load_roles

    check_seed(seed)
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a directory; give a directory to write the datasets into")
    ss = _load_scenarios(scenarios_file)
    if n_scenarios < 1 or n_train < 1 or n_val < 0 or n_introspection < 0:
        fail("--n-scenarios and --n-train must be >= 1, --n-val and --n-introspection >= 0")
    if n_scenarios > len(ss):
        fail(f"--n-scenarios {n_scenarios} is more than the {len(ss)} scenarios available")
    if scenarios_file is None:
        ss = random.Random(seed).sample(ss, n_scenarios)
    else:
        ss = ss[:n_scenarios]
    if scenarios_file is None or scenarios_file.suffix != ".csv":
        try:
            roles = load_roles(roles_file) if roles_file else load_bundled_roles()
        except ScenarioError as e:
            fail(str(e))
        ss = assign_roles(ss, roles, seed)
    counts = design.export(ss, out, seed=seed, n_train=n_train, n_val=n_val,
                           n_introspection=n_introspection, counterbalance=counterbalance)
    t = Table(title=f"datasets in {out}")
    t.add_column("file")
    t.add_column("examples", justify="right")
    for name, n in counts.items():
        t.add_row(name, str(n))
    console.print(t)


# --------------------------------------------------------------------------------------------
# analyze


@app.command()
def analyze(
    directory: Optional[Path] = typer.Argument(None, help="A results directory in the paper's layout (or a selfinterp run)."),
    paper: bool = typer.Option(False, "--paper", help="Analyse the paper's data from the cache (`selfinterp data paper` puts them there)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write results.json and figures (default: DIRECTORY/analysis; with --paper, results/paper)."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples for the CIs."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    figures: bool = typer.Option(True, help="Write PNG figures."),
    strict: bool = typer.Option(False, "--strict", help="Refuse what is otherwise kept and counted: report values outside [-100, 100], rows repeated exactly."),
) -> None:
    """Reproduce the paper's table: accuracy of self-reports per model and condition.

    Every cell is checked: a bad one is an error naming file, line and column; what is kept but
    counted, skipped or substituted is printed as a note."""
    from . import analysis
    from .journal import atomic_write_text
    from .layout import LayoutError

    if n_boot < 1:
        fail("--n-boot must be >= 1")
    check_seed(seed)
    directory, out = _analysis_source(directory, paper, out)
    try:
        a = analysis.analyze(directory, n_boot=n_boot, seed=seed, strict=strict)
    except LayoutError as e:
        fail(str(e))
    out = out or (directory / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    results = analysis.to_json(a)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    print_results(results)
    written = []
    if figures:
        from .figures import write_all

        written = write_all(a, out)
    console.print(f"wrote {out / 'results.json'}" + (f" and {len(written)} figures" if written else ""))


def _analysis_source(directory: Optional[Path], paper: bool, out: Optional[Path]) -> tuple[Path, Optional[Path]]:
    """DIRECTORY, or with --paper the cached paper data (whose results go to results/paper)."""
    if paper == (directory is not None):
        fail("give a results DIRECTORY or --paper (the paper's data, from `selfinterp data paper`), not both" if paper
             else "give a results DIRECTORY, or --paper for the paper's data")
    if not paper:
        return directory, out
    from .paperdata import PaperDataError, location

    try:
        return location(), out or Path("results") / "paper"
    except PaperDataError as e:
        fail(str(e))


_CAPTION = ("r: Pearson r over scenario x attribute cells (mean report vs learned weights; instillation: learned vs "
            "instilled); CI: 95% bootstrap over scenarios; sign: sign agreement; ceiling: sqrt of the reports' "
            "split-half reliability; p: permutation test (reports paired with other scenarios' weights, one-sided); "
            "*_effect: trained minus untrained r on the same scenarios.")


def _p_text(p: float | None) -> str:
    return "" if p is None else f"{p:.3f}" if p >= 0.001 else "<0.001"


def print_results(results: dict) -> None:
    """Print each model's table of conditions and effects; flags and notes go to stderr."""
    from rich.markup import escape

    for model, conds in results["models"].items():
        t = Table(title=model, title_justify="left", caption=_CAPTION, caption_justify="left")
        for col, just in (("condition", "left"), ("r", "right"), ("95% CI", "right"), ("scen.", "right"),
                          ("reports", "right"), ("sign", "right"), ("ceiling", "right"), ("p", "right")):
            t.add_column(col, justify=just, no_wrap=True)
        for name, c in conds.items():
            ceiling = c.get("noise_ceiling")
            t.add_row(name, f"{c['r']:.3f}", f"[{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]",
                      str(c["n_scenarios"]), str(c["n_reports"]) if c["n_reports"] else f"({c.get('n_choices', 0)} choices)",
                      f"{c['sign_agreement']:.2f}", "" if ceiling is None else f"{ceiling:.2f}",
                      _p_text(c.get("p_permutation")))
        for name, e in results["effects"].get(model, {}).items():
            t.add_row(f"[italic]{name}[/]", f"{e['diff']:+.3f}", f"[{e['ci'][0]:+.2f}, {e['ci'][1]:+.2f}]",
                      str(e["n_scenarios"]), "", "", "", "")
        console.print(t)
        flags = results["diagnostics"][model]
        for key in ("learned_weights", "native_learned_weights"):
            if flags.get(key, {}).get("not_identified"):
                err.print(f"[yellow]{model}: {len(flags[key]['not_identified'])} scenario(s) without identified "
                          f"{key.replace('_', ' ')} (left out): {escape(str(flags[key]['not_identified']))}[/]")
    for note in results.get("notes", []):  # kept but counted, skipped, substituted: never only in results.json
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


# --------------------------------------------------------------------------------------------
# data


data_app = typer.Typer(help="Data sets fetched on demand (the paper's data: `selfinterp data paper`).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("paper")
def data_paper(
    source: Optional[Path] = typer.Option(None, "--from", help="Fill the cache from a local copy of the files (offline machines), checked the same way."),
    base_url: Optional[str] = typer.Option(None, "--base-url", envvar="SELFINTERP_PAPER_DATA_URL",
                                           help="URL of a folder holding the files (default: the authors' repository on GitHub at the pinned commit)."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the server before giving up."),
) -> None:
    """Download the paper's data (the authors' data/ at a pinned commit) into the cache, each file's sha256 checked."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from .paperdata import PaperDataError, fetch, manifest

    m = manifest()
    where = str(source) if source else (base_url or m.default_url)
    err.print(f"the paper's data ({m.repository} at {m.commit[:7]}, {len(m.files)} files) from {where}", highlight=False)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=err, disable=not err.is_terminal)
    task = bar.add_task("paper data", total=sum(e.bytes for e in m.files))
    try:
        with bar:
            directory, done = fetch(base_url, source, timeout=timeout,
                                    on_file=lambda e: bar.update(task, description=e.name),
                                    on_bytes=lambda n: bar.advance(task, n))
    except PaperDataError as e:
        fail(str(e))
    counts = {how: sum(f.how == how for f in done) for how in ("downloaded", "copied", "cached", "absent")}
    summary = ", ".join(f"{n} {how}" for how, n in counts.items() if n)
    console.print(f"the paper's data are in {directory} ({summary}); next: selfinterp analyze --paper",
                  highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# compare


@app.command()
def compare(
    runs: Optional[list[Path]] = typer.Argument(None, help="Run directories, or any directories in the paper's layout."),
    paper: bool = typer.Option(False, "--paper", help="Add the paper's data from the cache (`selfinterp data paper`)."),
    out: Path = typer.Option(Path("comparison"), "--out", "-o", help="Where to write comparison.md, comparison.csv, settings.csv and comparison.png."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples for the CIs (the same for every source)."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
) -> None:
    """Compare runs: every condition's r with its CI across runs (seeds, models, settings), and the settings that differ."""
    from rich.markup import escape

    from .comparison import compare as make_comparison
    from .layout import LayoutError
    from .paperdata import PaperDataError

    if not runs and not paper:
        fail("give one or more run or results directories (and/or --paper)")
    if n_boot < 1:
        fail("--n-boot must be >= 1")
    try:
        c = make_comparison(runs or [], paper=paper, n_boot=n_boot, seed=seed)
    except (LayoutError, PaperDataError) as e:
        fail(str(e))
    wide = c.wide()
    t = Table(title=f"r [95% CI] across {len(c.sources)} sources", title_justify="left")
    t.add_column("condition", no_wrap=True)
    for col in wide.columns:
        t.add_column(escape(str(col)), justify="right")
    for name, row in wide.iterrows():
        t.add_row(name, *(escape(v) for v in row.tolist()))
    console.print(t)
    st = c.settings()
    if len(st):
        s = Table(title="settings that differ", title_justify="left")
        s.add_column("setting", no_wrap=True)
        for col in st.columns:
            s.add_column(escape(str(col)))
        for name, row in st.iterrows():
            s.add_row(escape(name), *(escape(str(v)) for v in row.tolist()))
        console.print(s)
    paths = c.write(out)
    console.print(f"wrote {', '.join(str(p) for p in paths)}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# run, plan


@app.command("run")
def run_cmd(
    config_file: Optional[Path] = typer.Argument(None, help="A run configuration (TOML, YAML or JSON)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="smoke, cpu, paper or simulated."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<name>)."),
    backend: Optional[str] = typer.Option(None, help="Override the backend, the inference engine (hf, simulated, openai, vllm)."),
    trainer: Optional[str] = typer.Option(None, help="Override who fine-tunes (hf, simulated, openai, external; default: the backend)."),
    model: Optional[str] = typer.Option(None, help="Override the model (registry name, directory or hub id)."),
    seed: Optional[int] = typer.Option(None, help="Override the seed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (stages, model calls, training, time) and stop."),
    device: Optional[str] = typer.Option(None, "--device", help="With --dry-run: estimate for this device "
                                         "(cpu, cpu:<cores>, h100-80gb, a100-80gb, h200, l40s, a10g, l4, rtx4090; "
                                         "default: this machine)."),
    force: bool = typer.Option(False, help="Continue past a failed instillation gate."),
) -> None:
    """Run the paper's whole protocol, resumably: a re-run finishes what is left, redoes what changed.

    `selfinterp run --preset smoke --dry-run` lists the stages, model calls and time first."""
    from . import config as cfgmod

    if config_file is None and preset is None:
        fail("give a configuration file or --preset (smoke, cpu, paper, simulated)")
    overrides = {k: v for k, v in (("backend", backend), ("trainer", trainer), ("model", model), ("seed", seed))
                 if v is not None}
    try:
        cfg = cfgmod.build(preset, config_file, overrides)
    except cfgmod.ConfigError as e:
        fail(str(e))
    out = out or Path("runs") / cfg.name
    if dry_run:
        print_plan(cfg, out, device)
        return
    if device is not None:
        fail("--device sets the device of a --dry-run estimate; a run uses the device it runs on")
    from .backends.openai_api import OpenAIAPIError
    from .backends.vllm import VLLMUnavailable
    from .journal import JournalBusy
    from .layout import LayoutError
    from .lock import RunLocked
    from .models import ModelError
    from .pipeline import GateFailed, Run
    from .scenarios import ScenarioError

    from rich.markup import escape

    from .lock import process_group

    group = process_group()
    if group is not None and group[1] != 0:  # a rank > 0 joins the training stages; rank 0 reports
        err.print(f"rank {group[1]}: joining the training stages of run [bold]{cfg.name}[/] in {out.resolve()}")
    else:
        err.print(f"run [bold]{cfg.name}[/] ({cfg.backend}: {escape(cfg.model) if cfg.backend != 'simulated' else 'simulated'}) "
                  f"in {out.resolve()}")
    try:
        results = Run(cfg, out, force=force, console=err).execute()
    except (GateFailed, ModelError, ScenarioError, OpenAIAPIError, VLLMUnavailable, RunLocked, LayoutError,
            JournalBusy) as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted: finished work is kept in {out}; run the same command again to resume[/]")
        raise typer.Exit(130)
    if group is not None and group[1] != 0:
        err.print(f"rank {group[1]}: done (rank 0 writes the results)")
        return
    print_results(results)
    if cfg.backend == "openai" or cfg.trainer_name == "openai":
        print_spent(cfg, out)
    console.print(f"report: {(out / 'report.html').resolve()}")


def print_spent(cfg, out: Path) -> None:
    """Tokens and cost the run used on the API, from its own records."""
    from .pipeline.costs import spent

    s = spent(out, cfg)
    t = Table(title=f"used on the API ({s['model']})", title_justify="left")
    for col in ("stage", "requests", "input tok.", "output tok.", "train tok.", "USD"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for stage, r in s["stages"].items():
        t.add_row(stage, f"{r['requests']:,}", f"{r['input_tokens']:,}", f"{r['output_tokens']:,}",
                  f"{r['training_tokens']:,}", "" if r["cost"] is None else f"{r['cost']:,.2f}")
    t.add_row("[bold]total[/]", "", "", "", "", "n/a" if s["cost"] is None else f"[bold]{s['cost']:,.2f}[/]")
    console.print(t)


def print_plan(cfg, out: Path, device: Optional[str] = None) -> None:
    """Print a run's plan per stage (calls, examples, epochs), with time and memory estimates if made."""
    from . import estimate as est
    from .pipeline import estimate_run

    try:
        dev = est.parse_device(device) if device else None
    except ValueError as e:
        fail(str(e))
    if cfg.backend == "openai":
        from .pipeline import dry_run_rows

        return print_api_plan(cfg, out, dry_run_rows(cfg))
    rows, e = estimate_run(cfg, dev, calibrate=device is None or device.strip().lower() == "cpu")
    where = f" on {e.device.name}" if e is not None else ""
    console.print(f"plan for {cfg.name} ({cfg.backend}: {cfg.model if cfg.backend != 'simulated' else 'simulated'})"
                  f"{where} -> {out}", soft_wrap=True, highlight=False, markup=False)
    t = Table()
    cols = [("stage", "left"), ("model calls", "right"), ("kind", "left"), ("training examples", "right"),
            ("epochs", "right")] + ([("est. time", "right"), ("peak GiB", "right")] if e is not None else [])
    for col, just in cols:
        t.add_column(col, justify=just)
    for r in rows:
        cells = [r["stage"], str(r["model_calls"] or ""), r["call_kind"], str(r["training_examples"] or ""),
                 str(r["epochs"] or "")]
        if e is not None:
            cells += [_minutes(r["est_seconds"]) if r["est_seconds"] else "",
                      f"{r['est_gib']:.1f}" if r["est_gib"] else ""]
        t.add_row(*cells)
    total = [str(sum(r["model_calls"] for r in rows)), "", str(sum(r["training_examples"] for r in rows)), ""]
    if e is not None:
        total += [f"[bold]{_minutes(e.seconds)}[/]", f"[bold]{e.peak_gib:.1f}[/]"]
    t.add_row("[bold]total[/]", *total)
    console.print(t)
    if e is None:
        return
    console.print("Estimate rests on:", highlight=False)
    for line in e.basis:
        console.print(f"  - {line}", highlight=False, markup=False)
    if e.device.kind == "cuda" and any(r["est_gib"] for r in rows):
        console.print("  - the lower-layer cache, where used, lives in host memory (not counted as GPU memory)",
                      highlight=False)
    if e.fits:
        mem = "RAM" if e.device.kind == "cpu" else "GPU memory"
        console.print(f"Fits: peak ~{e.peak_gib:.1f} GiB of {e.device.memory_gib:.0f} GiB {mem}.", highlight=False)
    else:
        console.print("[red]Does not fit:[/]")
        for p in e.problems:
            console.print(f"  - {p}", highlight=False, markup=False)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5940 else f"{seconds / 3600:.1f} h"


def print_api_plan(cfg, out: Path, rows: list) -> None:
    """The plan of a run on an OpenAI(-compatible) API: calls, tokens and estimated cost per stage."""
    from .openai_client import public_url
    from .pipeline.costs import estimate_plan

    est = estimate_plan(cfg, rows)
    t = Table(title=f"plan for {cfg.name} (openai: {est['model']} at {public_url(cfg.openai.base_url)}, "
                    f"trainer {cfg.trainer_name}) -> {out}")
    for col in ("stage", "calls", "kind", "input tok.", "output tok.", "train ex.", "epochs", "train tok.", "USD"):
        t.add_column(col, justify="left" if col in ("stage", "kind") else "right", no_wrap=True)

    def money(x):
        return "" if x is None else f"{x:,.2f}"

    for r in rows:
        t.add_row(r["stage"], f"{r['model_calls']:,}" if r["model_calls"] else "", r["call_kind"],
                  f"{r['input_tokens']:,}" if r["input_tokens"] else "", f"{r['output_tokens']:,}" if r["output_tokens"] else "",
                  f"{r['training_examples']:,}" if r["training_examples"] else "", str(r["epochs"] or ""),
                  f"{r['training_tokens']:,}" if r["training_tokens"] else "", money(r["cost"]) if r["cost"] else "")
    tot = est["totals"]
    t.add_row("[bold]total[/]", f"{sum(r['model_calls'] for r in rows):,}", "", f"{tot['input_tokens']:,}",
              f"{tot['output_tokens']:,}", f"{sum(r['training_examples'] for r in rows):,}", "",
              f"{tot['training_tokens']:,}", f"[bold]{money(tot['cost']) or 'n/a'}[/]")
    console.print(t)
    for note in est["notes"]:
        console.print(f"- {note}", highlight=False, markup=False)


@app.command()
def plan(
    target_r: float = typer.Option(0.5, help="The true accuracy r of the self-reports to detect."),
    baseline_r: float = typer.Option(0.0, help="The r to distinguish it from (0: no accuracy)."),
    scenarios: str = typer.Option("20,50,100", help="Comma-separated numbers of scenarios to try."),
    reports: str = typer.Option("1,5,10", help="Comma-separated reports per scenario to try."),
    trials: int = typer.Option(50, help="Choices per scenario for the learned weights."),
    n_sim: int = typer.Option(200, help="Simulated studies per design."),
    seed: int = typer.Option(0),
    effect_from: Optional[float] = typer.Option(
        None, help="The r before introspection training: also simulate the training effect (target-r minus this, "
        "paired on the same scenarios) and print its CI half-width and power."),
) -> None:
    """Power analysis: how many scenarios, reports and trials a study needs, by simulation."""
    from .power import DesignError, check_design, power_table

    check_seed(seed)
    try:
        ns = [int(x) for x in scenarios.split(",")]
        rs = [int(x) for x in reports.split(",")]
    except ValueError:
        fail("--scenarios and --reports take comma-separated whole numbers, e.g. 20,50,100")
    if not -1 < target_r < 1 or not -1 < baseline_r < 1:
        fail("--target-r and --baseline-r must be between -1 and 1")
    try:
        check_design(ns, rs, trials, n_sim)
    except DesignError as e:
        fail(f"--{e}")
    try:
        rows = power_table(target_r, baseline_r, ns, rs, trials, n_sim, seed, effect_from=effect_from)
    except DesignError as e:
        fail(f"--{e}")
    t = Table(title=f"detecting r = {target_r} (vs {baseline_r}) with {trials} choices per scenario, {n_sim} simulated studies each")
    cols = ["scenarios", "reports", "mean r", "mean CI width", "power"]
    if effect_from is not None:
        cols += [f"effect {target_r - effect_from:+.2f}: CI half-width", "effect power"]
    for col in cols:
        t.add_column(col, justify="right")
    for r in rows:
        cells = [str(r["n_scenarios"]), str(r["n_reports"]), f"{r['mean_r']:.3f}", f"{r['ci_width']:.3f}",
                 f"{r['power']:.2f}"]
        if effect_from is not None:
            cells += [f"{r['effect_ci_half_width']:.3f}", f"{r['effect_power']:.2f}"]
        t.add_row(*cells)
    console.print(t)
    console.print("power: share of simulated studies whose 95% CI excludes the baseline r"
                  + ("; effect power: whose paired CI of the training effect excludes 0." if effect_from is not None else "."))


@app.command()
def serve(
    target: str = typer.Argument(..., help="A run directory, a fine-tuned model's directory (runs/X/models/Y), or a model."),
    port: int = typer.Option(8000, help="Port on 127.0.0.1."),
    name: Optional[str] = typer.Option(None, help="Served name of the (base) model (default: the run's label or the model's name)."),
    dtype: Optional[str] = typer.Option(None, help="auto, float32, bfloat16, float16 (default: the run's vllm.dtype, else auto)."),
    max_model_len: int = typer.Option(4096, help="Context length."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the server command and stop."),
    extra: Optional[list[str]] = typer.Argument(None, help="More vLLM server arguments, after --."),
) -> None:
    """Start vLLM's OpenAI-compatible server on 127.0.0.1 for a run's models (LoRA adapters unmerged)."""
    import os
    import shlex

    from .models import ModelError
    from .backends.vllm import RUNTIME_ENV  # the server runs offline and quiet, like the in-process engine
    from .pipeline.serve import ServeError, command, serve_plan, vllm_python

    try:
        p = serve_plan(target, name)
        cmd = command(p, vllm_python() if not dry_run else (os.environ.get("SELFINTERP_VLLM_PYTHON") or "python"),
                      port=port, dtype=dtype, max_model_len=max_model_len, extra=extra)
    except (ServeError, ModelError, FileNotFoundError) as e:
        fail(str(e))
    err.print(f"serving {p.name}" + "".join(f", {k}" for k in p.loras) + f" at http://127.0.0.1:{port}/v1", highlight=False)
    for which, why in p.skipped.items():
        err.print(f"[yellow]not served: {which}: {why}[/]", highlight=False)
    console.print(" ".join(shlex.quote(c) for c in cmd), highlight=False, markup=False, soft_wrap=True)
    if dry_run:
        return
    os.execve(cmd[0], cmd, {**os.environ, **RUNTIME_ENV})


# Model commands live with the models (they import torch lazily, when run).
try:
    from .models import app as models_app

    app.add_typer(models_app, name="models")
except ImportError:  # pragma: no cover - the models module is part of the package
    pass


def main(argv: Optional[list[str]] = None) -> None:
    """The `selfinterp` command: the typer app, with click's usage errors (a flag's value that
    does not parse, an unknown option) as one `error:` line instead of click's boxed form."""
    import sys

    # click's UsageError, wherever this typer keeps click (typer >= 0.2x vendors its own copy)
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="selfinterp", standalone_mode=False)
    except usage_error as e:
        where = e.ctx.command_path if e.ctx is not None else "selfinterp"
        err.print(f"[bold red]error:[/] {escape_markup(where)}: {escape_markup(e.format_message())} "
                  f"(see {escape_markup(where)} --help)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("aborted", highlight=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def escape_markup(text: str) -> str:
    """``text`` with rich markup escaped, to print as it is."""
    from rich.markup import escape

    return escape(text)
