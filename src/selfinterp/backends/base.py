"""What every model backend does, whatever runs the model (transformers, vLLM, an
OpenAI-compatible API, or a simulated chooser).

The protocol needs two things from a model:

- ``choice_probs(chats)``: P("A") for decision prompts, renormalised over {"A", "B"}, plus the
  raw P(A) + P(B) mass (how much the model answers in the format at all);
- ``generate(chats, ...)``: free text, e.g. a self-report in JSON.

Backends run models; they do not train them. Models are trained by :mod:`selfinterp.training`
(the local trainer, OpenAI fine-tuning jobs, the simulated model's) and read back through
:mod:`selfinterp.modelref` or, for the simulated model, its state file.

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

from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from ..report_parser import json_object_end  # noqa: F401  (the stop criterion of JSON generation)

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


@runtime_checkable
class Backend(Protocol):
    """The interface of every backend. ``info`` describes the model as run (for the results)."""

    info: dict[str, Any]

    def choice_probs(self, chats: Sequence[Messages]) -> ChoiceProbs:
        """P(A) per decision prompt, renormalised over {A, B}, and the raw P(A) + P(B) mass."""

    def generate(self, chats: Sequence[Messages], max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int | Sequence[int] = 0) -> list[str]:
        """One free-text reply per chat (up to ``max_new_tokens``): greedy at temperature 0, else seeded sampling."""


@runtime_checkable
class ConstrainedReporter(Protocol):
    """Optional: backends that can restrict decoding to fill a JSON template with numbers."""

    def constrained_reports(self, chats: Sequence[Messages],
                            attribute_names_per_chat: Sequence[Sequence[str]]) -> list[SelfReport]:
        """One self-report per chat: the JSON skeleton of its attribute names, the numbers chosen by the model."""


@runtime_checkable
class ExpectedReporter(Protocol):
    """Optional: backends that can give, per number slot, the mean (and SD) of the model's
    distribution over the valid numbers instead of one drawn number."""

    def expected_reports(self, chats: Sequence[Messages],
                         attribute_names_per_chat: Sequence[Sequence[str]]) -> list[SelfReport]:
        """One self-report per chat, each number the mean (and SD) of the model's distribution over -100..100."""


def call_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One sampling seed per chat of a call: a sequence is taken as is (one per chat, so that a
    chat's sample depends on its own seed, not on the batch it is in); an int gives seed + index."""
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(n)]
    seeds = [int(x) for x in seed]
    if len(seeds) != n:
        raise ValueError(f"{n} chats but {len(seeds)} seeds")
    return seeds
