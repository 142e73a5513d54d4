"""Turning the protocol's chat messages into a model's own prompt text.

Every local backend (measurement, generation, fine-tuning) goes through :func:`render` and
:func:`encode`, so training and measurement see identical tokens, and finds its answer tokens with
:func:`answer_token_ids`. Some templates (Gemma's) have no system role:
the system prompt is then folded into the first user turn, and the caller is told so, to
record it with the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Rendered:
    """A chat as the template wrote it, and whether the system prompt had to be folded in."""

    text: str
    folded_system: bool  # True when the template had no system role and the system prompt was folded


def fold_system(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Put the system prompt in front of the first user turn (for templates without a system role)."""
    msgs = [dict(m) for m in messages]
    if not msgs or msgs[0]["role"] != "system":
        return msgs
    system, rest = msgs[0]["content"], msgs[1:]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    return rest


def supports_system(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a system turn (rather than raising or dropping it)."""
    probe = "SYSTEM-PROBE-7f3a"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
            tokenize=False, add_generation_prompt=True,
        )
    except Exception:  # jinja raises TemplateError("System role not supported") for Gemma 2
        return False
    return probe in text and text.index(probe) < text.index("hi")


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False,
           system_role: bool | None = None) -> Rendered:
    """The chat as the model's template writes it.

    With ``add_generation_prompt`` the text ends where the assistant's answer begins (for
    measurement and generation); without, the last message (the answer) is included (for
    training). ``system_role`` may be passed to skip probing the template each call.
    """
    if system_role is None:
        system_role = supports_system(tokenizer)
    msgs = list(messages) if system_role else fold_system(messages)
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    return Rendered(text=text, folded_system=not system_role and bool(messages) and messages[0]["role"] == "system")


def prompt_and_answer(tokenizer: Any, messages: Sequence[dict[str, str]],
                      system_role: bool | None = None) -> tuple[str, str]:
    """Split a training chat into (prompt text up to the answer, answer text with the turn's end).

    The prompt is rendered with the generation prompt, exactly as at measurement time; the
    answer is whatever the full rendering adds after it (the answer and the end-of-turn
    marker), so completion-only loss trains precisely what measurement reads.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training chat must end with the assistant's answer")
    if system_role is None:
        system_role = supports_system(tokenizer)
    prompt = render(tokenizer, messages[:-1], add_generation_prompt=True, system_role=system_role).text
    full = render(tokenizer, messages, add_generation_prompt=False, system_role=system_role).text
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template does not render the prompt as a prefix of the full chat; "
            "completion-only loss cannot be masked for this template"
        )
    return prompt, full[len(prompt):]


# --------------------------------------------------------------------------------------------
# Tokens

ANSWER_LETTERS = ("A", "B")


class AnswerTokenError(ValueError):
    """The answer letters are not single, distinct tokens after the generation prompt."""


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered chats. No special tokens are added: chat templates already write
    their BOS where the model expects one, and a second BOS would change the model's input."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def answer_token_ids(tokenizer: Any, prompt_text: str, letters: Sequence[str] = ANSWER_LETTERS) -> tuple[int, ...]:
    """The token id of each answer letter as the model would write it right after ``prompt_text``.

    The letter must add exactly one token to the prompt's tokens without changing them (so the
    probability of that token is the probability of the answer), and letters must differ.
    """
    base = encode(tokenizer, [prompt_text])[0]
    ids = []
    for letter in letters:
        full = encode(tokenizer, [prompt_text + letter])[0]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            added = tokenizer.convert_ids_to_tokens(full[len(base) - 1:])
            raise AnswerTokenError(
                f"answer {letter!r} is not a single token after the generation prompt "
                f"(tokenised as {added}); choice probabilities cannot be read from one position"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise AnswerTokenError(f"answers {list(letters)} map to the same token ids {ids}")
    return tuple(ids)
