"""What every model backend does, whatever runs the model (transformers here; later a
simulated chooser, vLLM, or an API).

The protocol needs three things from a model:

- ``choice_probs(chats)``: P("A") for decision prompts, renormalised over {"A", "B"}, plus the
  raw P(A) + P(B) mass (how much the model answers in the format at all);
- ``generate(chats, ...)``: free text, e.g. a self-report in JSON;
- ``finetune(train, val, config)``: a new model, returned as a :class:`ModelRef`.

Inputs are chats in the OpenAI ``messages`` format (from :mod:`selfinterp.prompts`) *without*
the assistant's answer; each backend renders them with the model's own chat template.

Self-reports come in three modes that are different experimental conditions and must never be
mixed silently: ``free`` (the model writes the JSON itself; parsing may fail), ``constrained``
(the backend writes the JSON skeleton with the scenario's attribute names and the model only
chooses the numbers, so every reply parses) and ``expected`` (the constrained skeleton, each
number the mean of the model's distribution over the valid numbers: no sampling noise). Backends
that can constrain decoding offer ``constrained_reports``, those that can read the distribution
``expected_reports``.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

Messages = list[dict[str, str]]
ReportMode = Literal["free", "constrained", "expected"]

# The range the paper asks weights to be reported in; constrained reports stay inside it.
WEIGHT_MIN, WEIGHT_MAX = -100, 100


@dataclass(frozen=True)
class ChoiceProbs:
    """Per prompt: ``p_a`` = P(A) / (P(A) + P(B)) and ``mass`` = P(A) + P(B) under the model."""

    p_a: np.ndarray
    mass: np.ndarray

    def __len__(self) -> int:
        return len(self.p_a)

    @property
    def choices(self) -> list[str]:
        """The more probable answer per prompt (ties go to "A")."""
        return ["A" if p >= 0.5 else "B" for p in self.p_a]


@dataclass(frozen=True)
class SelfReport:
    """One self-report: the text the model produced, the weights read from it, and how it was produced."""

    text: str
    weights: dict[str, float] | None  # None when a free-mode reply did not parse
    mode: ReportMode
    sd: dict[str, float] | None = None  # "expected" mode: the SD of each slot's distribution


@dataclass(frozen=True)
class ModelRef:
    """A model a backend can load: a base model (registry name, directory or hub id), optionally
    with a fine-tuned adapter directory, and metadata about how it was made."""

    base: str
    adapter: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """The interface of every backend. ``info`` describes the model as run (for the results)."""

    info: dict[str, Any]

    def choice_probs(self, chats: Sequence[Messages]) -> ChoiceProbs: ...

    def generate(self, chats: Sequence[Messages], max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int | Sequence[int] = 0) -> list[str]: ...

    def finetune(self, train: Any, val: Any, config: Any, **kwargs: Any) -> ModelRef: ...


@runtime_checkable
class ConstrainedReporter(Protocol):
    """Optional: backends that can restrict decoding to fill a JSON template with numbers."""

    def constrained_reports(self, chats: Sequence[Messages],
                            attribute_names_per_chat: Sequence[Sequence[str]]) -> list[SelfReport]: ...


@runtime_checkable
class ExpectedReporter(Protocol):
    """Optional: backends that can give, per number slot, the mean (and SD) of the model's
    distribution over the valid numbers instead of one drawn number."""

    def expected_reports(self, chats: Sequence[Messages],
                         attribute_names_per_chat: Sequence[Sequence[str]]) -> list[SelfReport]: ...


def call_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One sampling seed per chat of a call: a sequence is taken as is (one per chat, so that a
    chat's sample depends on its own seed, not on the batch it is in); an int gives seed + index."""
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(n)]
    seeds = [int(x) for x in seed]
    if len(seeds) != n:
        raise ValueError(f"{n} chats but {len(seeds)} seeds")
    return seeds


def json_object_end(text: str) -> int | None:
    """Index just after the first balanced top-level JSON object in ``text`` (None if not closed yet).

    Braces inside JSON strings (with escapes) do not count, so a key like ``"a}b"`` is safe.
    Text before the first ``{`` (e.g. a code fence) is skipped.
    """
    start = text.find("{")
    if start < 0:
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None
