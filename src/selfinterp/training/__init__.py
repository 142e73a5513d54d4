"""Training: a base model and a chat dataset in, a model directory out.

Every trainer has one verb, ``fit(base, train, val, settings, out) -> ModelRef``: ``base`` is
the model to start from, as the trainer names it (a local model directory, a served model's
name, a simulated model's state directory); ``train`` / ``val`` are chat JSONL files
(:mod:`selfinterp.design` writes them); ``settings`` is a run's ``[instill]`` or
``[introspection]`` block (:class:`selfinterp.config.TrainSettings`); ``out`` is the model
directory the trainer fills, resumably, and that :mod:`selfinterp.modelref` (or the backend
the trainer serves) reads back. The returned ref's ``metadata`` is what was recorded about
the training (the manifest).

- :mod:`.local`: the local trainer (:mod:`.finetune`: LoRA or the top layers of a transformers model);
- :mod:`.openai_jobs`: fine-tuning jobs on an OpenAI(-compatible) server;
- :mod:`.simulated`: the simulated model's "fine-tuning".

Trainers never import a backend (tests/test_layers.py): what both need lives in the core
(``modelref``, ``simulated_model``, ``openai_client``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..config import TrainSettings
from ..modelref import ModelRef


class Trainer(Protocol):
    """What the pipeline trains models with."""

    def fit(self, base: str, train: Path, val: Path | None, settings: TrainSettings, out: Path) -> ModelRef:
        """Fine-tune ``base`` on ``train`` (validated on ``val``) into the model directory ``out``."""
        ...
