"""selfinterp: self-interpretability experiments on language models.

Teach a model hidden preferences, measure what it learned, ask it to describe its own
decision process, train it to describe itself more accurately, and analyse how faithful
those descriptions are (Plunkett, Morris, Reddy & Morales, arXiv 2505.17120).

The package is laid out like the protocol: ``scenarios`` -> ``design`` (weights, pairs,
datasets; texts in ``prompts``) -> fine-tuning and measurement (model backends) ->
``reports`` (parsing self-reports) -> ``regression`` and ``stats`` (the numeric core) ->
``analysis`` (the paper's table) -> figures.
"""

__version__ = "0.1.0"
