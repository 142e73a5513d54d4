"""Stages 2-3 of the protocol: instilled weights, option pairs, simulated choices, and the
fine-tuning datasets built from them.

Everything is seeded. Each scenario draws from its own random stream, derived from the seed,
the scenario's id and the purpose of the draw, so adding or removing a scenario never changes
another scenario's weights or pairs.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import prompts
from .journal import atomic_write, atomic_write_text
from .scenarios import Problem, Scenario, ScenarioError, assign_roles, load, load_bank, load_bundled_roles

MAX_WEIGHT = 100


def choose_scenarios(source: str, n_instilled: int, n_native: int, seed: int) -> tuple[list[Scenario], list[Scenario]]:
    """The run's (instilled, native) scenarios from ``source`` ("bank" or a scenario file): from the
    bank a seeded sample, from a file its first rows; roles assigned unless a CSV carries its own."""
    n = n_instilled + n_native
    pool = load_bank() if source == "bank" else load(source)
    if len(pool) < n:
        where = "the bundled bank" if source == "bank" else source
        raise ScenarioError([Problem("scenarios", f"{where} has {len(pool)} scenarios; the run needs n_instilled + "
                                     f"n_native = {n_instilled} + {n_native} = {n}")])
    if source == "bank":
        pool = random.Random(seed).sample(pool, n)
        pool = assign_roles(pool, load_bundled_roles(), seed)
    else:
        pool = pool[:n]
        if not source.endswith(".csv"):
            pool = assign_roles(pool, load_bundled_roles(), seed)
    return pool[:n_instilled], pool[n_instilled:]


def rng_for(seed: int, scenario_id: str, purpose: str) -> np.random.Generator:
    """An independent, reproducible random stream per (seed, scenario, purpose)."""
    digest = hashlib.sha256(f"{scenario_id}\0{purpose}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def rescale(weights: np.ndarray, target: float = MAX_WEIGHT) -> np.ndarray:
    """Scale each row so that its largest absolute value is ``target`` (signs kept).

    Rows that are all zero stay zero (there is nothing to scale).
    """
    w = np.asarray(weights, dtype=float)
    m = np.max(np.abs(w), axis=-1, keepdims=True)
    return np.divide(w * target, m, out=np.zeros_like(w), where=m > 0)


def draw_weights(scenario: Scenario, seed: int) -> np.ndarray:
    """k draws from U(-100, 100), rescaled so that max |w| = 100, rounded to integers."""
    w = rng_for(seed, scenario.id, "weights").uniform(-MAX_WEIGHT, MAX_WEIGHT, scenario.k)
    return np.round(rescale(w)).astype(int)


def sample_values(scenario: Scenario, n: int, rng: np.random.Generator) -> np.ndarray:
    """n options: each attribute uniform in its range, rounded by the range's size."""
    lo = np.array([a.min for a in scenario.attributes])
    hi = np.array([a.max for a in scenario.attributes])
    v = rng.uniform(lo, hi, size=(n, scenario.k))
    for j, a in enumerate(scenario.attributes):
        v[:, j] = np.round(v[:, j], a.decimals)
    return v


def normalise(scenario: Scenario, values: np.ndarray) -> np.ndarray:
    """Min-max normalise option values to [0, 1] per attribute."""
    lo = np.array([a.min for a in scenario.attributes])
    span = np.array([a.span for a in scenario.attributes])
    return (np.asarray(values, dtype=float) - lo) / span


def utility(scenario: Scenario, weights: Sequence[float], values: np.ndarray) -> np.ndarray:
    """Sum of w_i times the min-max normalised value of attribute i (per option)."""
    return normalise(scenario, values) @ np.asarray(weights, dtype=float)


@dataclass(frozen=True)
class Pair:
    """Two options of one scenario, as shown: A first, B second."""

    scenario_id: str
    a: tuple[float, ...]
    b: tuple[float, ...]
    swapped: bool = False  # True for the counterbalanced copy of a pair (A and B exchanged)

    def swap(self) -> "Pair":
        """The same pair with A and B exchanged (``swapped`` flipped)."""
        return Pair(self.scenario_id, self.b, self.a, not self.swapped)


def sample_pairs(scenario: Scenario, n: int, seed: int, purpose: str = "pairs",
                 counterbalance: bool = False, weights: Sequence[float] | None = None) -> list[Pair]:
    """n option pairs for a scenario (2n with ``counterbalance``: each also with A and B swapped).

    When ``weights`` are given, pairs whose options have equal utility (no right answer) are
    redrawn, so every training label is defined.
    """
    rng = rng_for(seed, scenario.id, purpose)
    pairs: list[Pair] = []
    while len(pairs) < n:
        a, b = sample_values(scenario, 2 * (n - len(pairs)), rng).reshape(2, -1, scenario.k)
        for va, vb in zip(a, b):
            if np.array_equal(va, vb):
                continue
            if weights is not None and np.isclose(utility(scenario, weights, va), utility(scenario, weights, vb)):
                continue
            pairs.append(Pair(scenario.id, tuple(va.tolist()), tuple(vb.tolist())))
    pairs = pairs[:n]
    if counterbalance:
        pairs = [q for p in pairs for q in (p, p.swap())]
    return pairs


def simulated_choice(scenario: Scenario, weights: Sequence[float], pair: Pair) -> str:
    """The choice of a decision-maker with these weights: the option of higher utility."""
    ua = float(utility(scenario, weights, np.array(pair.a)))
    ub = float(utility(scenario, weights, np.array(pair.b)))
    return "A" if ua > ub else "B"


def differences(scenario: Scenario, pairs: Sequence[Pair]) -> np.ndarray:
    """Range-normalised attribute differences A - B, shape (n_pairs, k): the regression's inputs."""
    a = normalise(scenario, np.array([p.a for p in pairs]))
    b = normalise(scenario, np.array([p.b for p in pairs]))
    return a - b


# --------------------------------------------------------------------------------------------
# Fine-tuning datasets (OpenAI chat JSONL)


def instillation_examples(scenarios: Sequence[Scenario], weights: dict[str, np.ndarray], n: int,
                          seed: int, purpose: str = "instill-train", counterbalance: bool = False,
                          label_temperature: float | None = None, attribute_targets: bool = False) -> list[dict]:
    """Decision examples labelled with the simulated choice: n per scenario (2n counterbalanced).

    With ``label_temperature`` T each example also carries soft targets, ``"soft_answer":
    {"A": P(A), "B": 1 - P(A)}`` with P(A) = sigmoid((u_A - u_B) / T) (utilities in weight units,
    max |w| = 100): a near-tie is taught as one, a clear choice as nearly certain. The answer
    written in the chat stays the simulated (hard) choice. With ``attribute_targets`` each example
    also carries its range-normalised attribute differences A - B (``"attribute_targets"``, the
    targets of the trainer's auxiliary read-out, ``FinetuneConfig.attribute_loss``)."""
    if label_temperature is not None and not label_temperature > 0:
        raise ValueError(f"label_temperature must be > 0, not {label_temperature}")
    out = []
    for s in scenarios:
        w = weights[s.id]
        pairs = sample_pairs(s, n, seed, purpose, counterbalance, w)
        diffs = differences(s, pairs) if attribute_targets else None
        for j, p in enumerate(pairs):
            row = {"messages": prompts.decision_chat(s, p.a, p.b, simulated_choice(s, w, p))}
            if label_temperature is not None:
                du = float(utility(s, w, np.array(p.a)) - utility(s, w, np.array(p.b)))
                p_a = float(1.0 / (1.0 + np.exp(-np.clip(du / label_temperature, -50, 50))))
                row["soft_answer"] = {"A": round(p_a, 6), "B": round(1.0 - p_a, 6)}
            if attribute_targets:
                row["attribute_targets"] = [round(float(d), 6) for d in diffs[j]]
            out.append(row)
    return out


def introspection_examples(scenarios: Sequence[Scenario], weights: dict[str, np.ndarray], n: int,
                           seed: int, purpose: str = "introspection") -> list[dict]:
    """Introspection examples whose answer is the scenario's weights as JSON: n per scenario."""
    out = []
    for s in scenarios:
        for p in sample_pairs(s, n, seed, purpose):
            out.append({"messages": prompts.introspection_chat(s, p.a, p.b, weights[s.id])})
    return out


def halves(scenarios: Sequence[Scenario]) -> tuple[list[Scenario], list[Scenario]]:
    """The deterministic split by scenario used for introspection training: first and second half."""
    mid = (len(scenarios) + 1) // 2
    return list(scenarios[:mid]), list(scenarios[mid:])


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines atomically (temp file, then rename); return the number written."""
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1

    atomic_write(path, write)
    return n


def write_weights_csv(path: Path, scenarios: Sequence[Scenario], weights: dict[str, np.ndarray]) -> None:
    """Weights in the paper's layout: ``scenario, attr1..attrk``."""
    k = max(s.k for s in scenarios)
    lines = ["scenario," + ",".join(f"attr{j}" for j in range(1, k + 1))]
    lines += [s.id + "," + ",".join(str(int(w)) for w in weights[s.id]) for s in scenarios]
    atomic_write_text(path, "\n".join(lines) + "\n")


def export(scenarios: Sequence[Scenario], out: Path, seed: int = 0, n_train: int = 50, n_val: int = 10,
           n_introspection: int = 1, counterbalance: bool = False) -> dict[str, int]:
    """Write the fine-tuning datasets of a study into ``out``; return {file name: rows}.

    - ``instill_train.jsonl`` / ``instill_val.jsonl``: preference instillation;
    - ``introspection_{all,first_half,second_half}.jsonl``: introspection training on the
      instilled weights (train on one half, test on the other, or train on all);
    - ``instilled_weights.csv`` and ``scenarios.json``: what was instilled, in which scenarios.
    """
    out = Path(out)
    weights = {s.id: draw_weights(s, seed) for s in scenarios}
    first, second = halves(scenarios)
    counts = {
        "instill_train.jsonl": write_jsonl(out / "instill_train.jsonl",
                                           instillation_examples(scenarios, weights, n_train, seed, "instill-train", counterbalance)),
        "instill_val.jsonl": write_jsonl(out / "instill_val.jsonl",
                                         instillation_examples(scenarios, weights, n_val, seed, "instill-val", counterbalance)),
    }
    for name, part in (("all", scenarios), ("first_half", first), ("second_half", second)):
        fname = f"introspection_{name}.jsonl"
        counts[fname] = write_jsonl(out / fname, introspection_examples(part, weights, n_introspection, seed))
    write_weights_csv(out / "instilled_weights.csv", scenarios, weights)
    (out / "scenarios.json").write_text(json.dumps([s.to_dict() for s in scenarios], indent=1) + "\n", encoding="utf-8")
    return counts
