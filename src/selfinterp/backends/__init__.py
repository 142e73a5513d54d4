"""Model backends: one small interface (:mod:`.base`), several implementations.

- :mod:`.hf`: transformers (+ peft), CPU-first, CUDA when present;
- :mod:`.vllm`: the vLLM engine, in process;
- :mod:`.openai_api`: OpenAI-compatible APIs (OpenAI itself, or a vLLM server);
- :mod:`.simulated`: a chooser with known weights, for tests and power analysis.

Each is imported on demand: importing ``selfinterp.backends`` never imports torch.
"""

from __future__ import annotations

from ..modelref import ModelRef
from .base import Backend, ChoiceProbs, ConstrainedReporter, ExpectedReporter, SelfReport, json_object_end

__all__ = ["Backend", "ChoiceProbs", "ConstrainedReporter", "ExpectedReporter", "ModelRef", "SelfReport", "json_object_end"]

