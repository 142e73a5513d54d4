"""Model backends: one small interface (:mod:`.base`), several implementations.

- :mod:`.hf`: transformers (+ peft), CPU-first, CUDA when present. Imported lazily: importing
  ``selfinterp.backends`` never imports torch.
"""

from __future__ import annotations

from .base import Backend, ChoiceProbs, ConstrainedReporter, ExpectedReporter, ModelRef, SelfReport, json_object_end

__all__ = ["Backend", "ChoiceProbs", "ConstrainedReporter", "ExpectedReporter", "ModelRef", "SelfReport", "json_object_end",
           "load"]


def load(model: str, adapter: str | None = None, **kwargs):
    """An :class:`~selfinterp.backends.hf.HFBackend` (the only local backend so far), imported on demand."""
    from .hf import HFBackend

    return HFBackend(model, adapter=adapter, **kwargs)
