"""The simulated model: a decision-maker with known weights, and what fine-tuning does to it.

Before any fine-tuning its weights are its "native" preferences, drawn per scenario from the
seed. Fine-tuning on decision examples (:meth:`SimulatedModel.learn`): per scenario, it fits the
preferences the examples show (the package's own regression) and moves its weights that far
towards them (``fidelity``); on introspection examples, its reports get less noisy (the
backend's ``introspection_gain``). Its state after fine-tuning is a small JSON file, so a
fine-tuned simulated model is a :class:`~selfinterp.modelref.ModelRef` like any other.

The backend that answers prompts as this model is :mod:`selfinterp.backends.simulated`; the
trainer that fine-tunes it, :mod:`selfinterp.training.simulated`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import design, prompts, regression
from .config import SimulatedSettings
from .journal import atomic_write_text
from .modelref import ModelRef
from .scenarios import Scenario

STATE = "simulated.json"


class SimulatedModel:
    """A simulated decision-maker with known weights: its native ones, or those of its state file
    (``ref.adapter``, written by :meth:`learn`)."""

    def __init__(self, scenarios: Sequence[Scenario], settings: SimulatedSettings | dict[str, float] | None = None,
                 seed: int = 0, ref: ModelRef | None = None):
        self.by_question = {s.prompt_question: s for s in scenarios}
        self.scenarios = {s.id: s for s in scenarios}
        if not isinstance(settings, SimulatedSettings):  # a config's [simulated] block, validated
            settings = SimulatedSettings.model_validate(settings or {})
        self.settings = settings.model_dump()
        self.seed = seed
        self.weights: dict[str, np.ndarray] = {}  # fine-tuned weights; native ones otherwise
        self.introspection_trained = False
        if ref is not None and ref.adapter is not None:
            state = json.loads((Path(ref.adapter) / STATE).read_text())
            self.weights = {k: np.array(v) for k, v in state["weights"].items()}
            self.introspection_trained = state["introspection_trained"]
        self.info = {"backend": "simulated", "settings": self.settings, "seed": seed,
                     "introspection_trained": self.introspection_trained}

    # -- the decision-maker

    def native_weights(self, scenario: Scenario) -> np.ndarray:
        """Its native weights for a scenario: drawn from the seed, rescaled to max |w| = 100."""
        w = design.rng_for(self.seed, scenario.id, "simulated-native").uniform(-100, 100, scenario.k)
        return design.rescale(w)

    def true_weights(self, scenario: Scenario) -> np.ndarray:
        """The weights it chooses by: its fine-tuned ones for the scenario, else its native ones."""
        return self.weights.get(scenario.id, self.native_weights(scenario))

    def reported_centre(self, scenario: Scenario) -> np.ndarray:
        """What its reports centre on: its true weights, as far as ``report_access`` lets it see them."""
        access = self.settings["report_access"]
        if access == 1.0:
            return self.true_weights(scenario)
        decoy = design.rescale(design.rng_for(self.seed, scenario.id, "simulated-decoy").uniform(-100, 100, scenario.k))
        return access * self.true_weights(scenario) + (1 - access) * decoy

    def _read(self, chat: Sequence[dict]):
        user = next(m["content"] for m in chat if m["role"] == "user")
        return user, *prompts.parse_prompt(user, self.by_question)

    # -- "fine-tuning"

    def learn(self, train: Any, out_dir: str | Path) -> ModelRef:
        """Its fine-tuned state in ``out_dir``: the preferences shown by the decision examples of
        ``train`` (a chat JSONL file or its rows) adopted, reports learnt from introspection examples."""
        rows = _read_examples(train)
        by_scenario: dict[str, list[tuple[np.ndarray, float]]] = {}
        introspection = 0
        for row in rows:
            chat = row["messages"]
            answer = chat[-1]["content"].strip()
            _, s, a, b = self._read(chat[:-1])
            if answer in ("A", "B"):
                diff = design.normalise(s, np.array(a)) - design.normalise(s, np.array(b))
                by_scenario.setdefault(s.id, []).append((diff, 1.0 if answer == "A" else 0.0))
            else:
                introspection += 1
        weights = {k: v.tolist() for k, v in self.weights.items()}
        if by_scenario:
            ids = list(by_scenario)
            fit = regression.fit_preferences(*regression.pad(
                [(np.array([d for d, _ in by_scenario[i]]), np.array([y for _, y in by_scenario[i]])) for i in ids]))
            f = self.settings["fidelity"]
            for i, sid in enumerate(ids):
                if fit.flags[i] == "":
                    mixed = (1 - f) * self.true_weights(self.scenarios[sid]) + f * fit.weights[i]
                    weights[sid] = design.rescale(mixed).tolist()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {"weights": weights, "introspection_trained": self.introspection_trained or introspection > 0,
                 "trained_on": {"decision_examples": sum(len(v) for v in by_scenario.values()),
                                "introspection_examples": introspection}}
        atomic_write_text(out / STATE, json.dumps(state))
        return ModelRef(base="simulated", adapter=str(out), metadata=state["trained_on"])



def _read_examples(data: Any) -> list[dict]:
    if isinstance(data, (str, Path)):
        return [json.loads(line) for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
    return list(data)
