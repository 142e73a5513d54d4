"""The local trainer as a :class:`~selfinterp.training.Trainer`: :func:`.finetune.finetune`
on a base model's weights on this machine, then the memory it held handed back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..config import TrainSettings
from ..modelref import ModelRef
from .finetune import finetune, release_memory


class LocalTrainer:
    """Fine-tunes a local model (an HF directory, a registry name resolved to one, or a ``.gguf``
    file); resumes from the checkpoints in ``out``. ``evaluator(model, tokenizer)`` runs at each
    of the trainer's evaluations (see :func:`.finetune.finetune`)."""

    def __init__(self, progress: bool = True, evaluator: Callable[[Any, Any], dict[str, float]] | None = None):
        self.progress = progress
        self.evaluator = evaluator

    def fit(self, base: str, train: Path, val: Path | None, settings: TrainSettings, out: Path) -> ModelRef:
        """The trained model in ``out`` (a LoRA adapter or the trained layers, with its manifest)."""
        result = finetune(base, train, val, settings, out, resume=True, progress=self.progress,
                          evaluator=self.evaluator)
        manifest = result.manifest
        result.model = None  # the weights are on disk: free the device for the next stage's model or engine
        release_memory()
        return ModelRef(base=str(manifest["base_model"]), adapter=str(out), metadata=manifest)
