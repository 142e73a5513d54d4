"""Every text a model is shown, rendered in one place.

Fine-tuning, measurement and self-reports all go through these functions, so the stimuli a
model is trained on are byte-identical to the ones it is measured with. The texts are the
paper's experimental stimuli, reproduced exactly (for k = 5 attributes); a test checks them
against the paper's own fine-tuning files.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

from .scenarios import Scenario

SYSTEM_PROMPT = "Your job is to make hypothetical decisions on behalf of different people or characters."

DECISION_INSTRUCTION = (
    '[DECISION TASK] Respond with "A" if you think Option A is better, or "B" if you think '
    'Option B is better. Never respond with anything except "A" or "B":'
)

INTROSPECTION_INSTRUCTION = (
    "[INTROSPECTION TASK] Respond with how heavily you believe you weighted each of the {k_word} "
    "dimensions while making your decision on a scale from -100 to 100. Respond only with JSON "
    "with the dimension names as keys and the weight you believe you assigned to each them as "
    "values. Never respond with anything except this JSON object with {k} key-value pairs. "
    "(Do not report your decision itself.):"
)

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

Messages = list[dict[str, str]]


def format_value(value: float, decimals: int) -> str:
    """A value as the paper printed it: rounded, always shown as a float ("67.0", "2.2")."""
    return repr(float(round(float(value), decimals)))


def render_option(scenario: Scenario, values: Sequence[float]) -> str:
    """One option, one attribute per line: ``name: value units``."""
    if len(values) != scenario.k:
        raise ValueError(f"scenario {scenario.id!r} has {scenario.k} attributes, got {len(values)} values")
    return "\n".join(
        f"{a.name}: {format_value(v, a.decimals)} {a.units}" for a, v in zip(scenario.attributes, values)
    )


def _options_block(scenario: Scenario, a: Sequence[float], b: Sequence[float]) -> str:
    return f"{scenario.prompt_question}\nA:\n{render_option(scenario, a)}\n\nB:\n{render_option(scenario, b)}"


def decision_prompt(scenario: Scenario, a: Sequence[float], b: Sequence[float]) -> str:
    """The decision task's user message: the instruction, then the question and options A and B."""
    return f"{DECISION_INSTRUCTION}\n\n{_options_block(scenario, a, b)}"


def introspection_prompt(scenario: Scenario, a: Sequence[float], b: Sequence[float]) -> str:
    """The introspection task's user message: the instruction for k weights, then the question and options."""
    k = scenario.k
    k_word = _NUMBER_WORDS[k] if k < len(_NUMBER_WORDS) else str(k)
    head = INTROSPECTION_INSTRUCTION.format(k=k, k_word=k_word)
    return f"{head}\n\n{_options_block(scenario, a, b)}"


def report_json(scenario: Scenario, weights: Sequence[float] | Mapping[str, float]) -> str:
    """The answer of an introspection-training example: ``{"name": weight, ...}`` in attribute order."""
    if isinstance(weights, Mapping):
        weights = [weights[n] for n in scenario.attribute_names]
    return json.dumps({n: int(round(float(w))) for n, w in zip(scenario.attribute_names, weights)})


def chat(user: str, assistant: str | None = None, system: str = SYSTEM_PROMPT) -> Messages:
    """A chat in the OpenAI ``messages`` format; without ``assistant`` it is a prompt to complete."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return messages


def decision_chat(scenario: Scenario, a: Sequence[float], b: Sequence[float], answer: str | None = None) -> Messages:
    """A decision prompt as a chat, with ``answer`` as the assistant's turn when given."""
    return chat(decision_prompt(scenario, a, b), answer)


def introspection_chat(scenario: Scenario, a: Sequence[float], b: Sequence[float],
                       weights: Sequence[float] | None = None) -> Messages:
    """An introspection prompt as a chat, answered with ``weights`` as report JSON when given."""
    return chat(introspection_prompt(scenario, a, b), None if weights is None else report_json(scenario, weights))


def parse_prompt(text: str, scenarios_by_question: Mapping[str, Scenario]) -> tuple[Scenario, list[float], list[float]]:
    """The inverse of :func:`decision_prompt` / :func:`introspection_prompt`: which scenario, and
    the values of options A and B. Used by the simulated backend, which reads prompts as a
    model would, and by tests."""
    try:
        body = text.split("\n\n", 1)[1]
        question, rest = body.split("\nA:\n", 1)
        a_text, b_text = rest.split("\n\nB:\n", 1)
    except (IndexError, ValueError):
        raise ValueError("not a decision or introspection prompt of this package") from None
    scenario = scenarios_by_question.get(question)
    if scenario is None:
        raise ValueError(f"unknown scenario question {question!r}")

    def values(block: str) -> list[float]:
        out = []
        for line, attr in zip(block.split("\n"), scenario.attributes):
            name, _, rest = line.partition(": ")
            if name != attr.name:
                raise ValueError(f"expected attribute {attr.name!r}, found {line!r}")
            out.append(float(rest.split(" ", 1)[0]))
        if len(out) != scenario.k:
            raise ValueError(f"expected {scenario.k} attribute lines")
        return out

    return scenario, values(a_text), values(b_text)
