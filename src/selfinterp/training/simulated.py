"""The simulated model's trainer (:meth:`selfinterp.simulated_model.SimulatedModel.learn`) as a
:class:`~selfinterp.training.Trainer`: ground truth for the pipeline's training stages."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..config import SimulatedSettings, TrainSettings
from ..modelref import ModelRef
from ..scenarios import Scenario
from ..simulated_model import SimulatedModel


class SimulatedTrainer:
    """Fine-tunes a simulated model of these scenarios; ``base`` is "simulated" (the native
    model) or the directory of a fine-tuned one. The training settings do not apply (the
    simulated model learns by ``settings.fidelity``) and are accepted for the protocol."""

    def __init__(self, scenarios: Sequence[Scenario], settings: SimulatedSettings, seed: int):
        self.scenarios = scenarios
        self.settings = settings
        self.seed = seed

    def fit(self, base: str, train: Path, val: Path | None, settings: TrainSettings | None, out: Path) -> ModelRef:
        """The fine-tuned state (``simulated.json``) in ``out``."""
        ref = None if base == "simulated" else ModelRef("simulated", str(base))
        return SimulatedModel(self.scenarios, self.settings, self.seed, ref).learn(train, out)
