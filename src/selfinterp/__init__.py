"""selfinterp: self-interpretability experiments on language models.

Teach a model hidden preferences, measure what it learned, ask it to describe its own
decision process, train it to describe itself more accurately, and analyse how faithful
those descriptions are (Plunkett, Morris, Reddy & Morales, arXiv 2505.17120).

The package is laid out like the protocol: ``scenarios`` -> ``design`` (weights, pairs,
datasets; texts in ``prompts``) -> fine-tuning and measurement (model backends) ->
``report_parser`` (parsing self-reports) -> ``regression`` and ``stats`` (the numeric core) ->
``analysis`` (the paper's table) -> figures.
"""

__version__ = "0.1.0"

__all__ = ["analyze", "compare", "paper_data", "run_experiment", "__version__"]


# The notebook API (selfinterp.api), imported on first call so that `import selfinterp` stays light.


def analyze(path=None, *, paper=False, n_boot=2000, seed=0, strict=False):
    """Analyse a run or a directory in the paper's layout -> Results (.table(), .effects(), .plot())."""
    from .api import analyze as _analyze

    return _analyze(path, paper=paper, n_boot=n_boot, seed=seed, strict=strict)


def run_experiment(config=None, *, preset=None, out=None, force=False, progress=True, **overrides):
    """What `selfinterp run` does: run or resume the whole protocol -> Results."""
    from .api import run_experiment as _run

    return _run(config, preset=preset, out=out, force=force, progress=progress, **overrides)


def compare(*paths, paper=False, n_boot=2000, seed=0):
    """Every condition's r with CIs across runs -> Comparison (.table(), .settings(), .plot(), .write(out))."""
    from .api import compare as _compare

    return _compare(*paths, paper=paper, n_boot=n_boot, seed=seed)


def paper_data():
    """The cached paper data's directory (`selfinterp data paper` fills the cache)."""
    from .api import paper_data as _paper_data

    return _paper_data()
