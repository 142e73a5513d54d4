"""Reading a model's self-report of its attribute weights (the introspection step of the protocol).

The introspection prompt asks for a JSON object mapping each of the scenario's k attributes to
the weight (-100..100) the model believes it gave it, e.g.
``{"capacity": 92, "spout_size": 15, "handle_length": 100, "spill_resistance": -10,
"grip_texture": -52}``. Models wrap that object in code fences or prose, misspell keys and
quote numbers, so the parser is tolerant where the intended answer is unambiguous and strict
everywhere else. Nothing is dropped silently: a rejected reply keeps its raw text, one reason
from ``REASONS`` and a human-readable detail, and ``ParseSummary`` counts a batch by reason.

What is tolerated:
- code fences (```json ... ```), prose before and after the object; the first ``{...}`` that
  parses is used (braces inside strings are skipped when finding where an object ends);
- after a failed first attempt, light repairs: trailing commas, single-quoted or typographic
  (curly) quotes, unquoted keys and ``//`` comments;
- keys that differ from an attribute name in case, surrounding whitespace or separators
  (``"Spout Size"``, ``"spout-size"``, ``"spoutSize"`` all match ``spout_size``), and small typos
  (``"spout_sise"``) when one attribute is clearly the closest (see ``TYPO_MIN_SIMILARITY``);
- values that are JSON numbers or numeric strings (``"45"``, ``" -20 "``, ``"+30"``, ``"45.5"``);
  a trailing percent sign is ignored (``"45%"`` reads as 45, since the scale is already -100..100).

An accepted reply's ``detail`` notes any repair or typo match, so that they can be audited.

Rejection reasons, in priority order (when several apply the first listed is reported, and the
detail mentions the others):

- ``empty``: the reply is blank;
- ``no_json``: there is no ``{`` (nor a JSON list) in the reply;
- ``invalid_json``: there are braces, but no ``{...}`` parses, even after repairs (a reply cut
  off inside the object ends up here);
- ``not_an_object``: the reply is JSON, but a list, string or number rather than an object;
- ``unknown_key``: a key matches no attribute;
- ``ambiguous_key``: a key is a near-miss for two or more attributes equally;
- ``duplicate_attribute``: two keys match the same attribute;
- ``missing_attribute``: an attribute has no key;
- ``not_a_number``: a value is a boolean, null, list, object, non-numeric string, NaN or infinite;
- ``out_of_range``: a value is outside [low, high].

Key problems come before value problems because a misnamed key is the root cause of the
"missing" attribute it leaves behind, and values are only read for keys that were matched.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

REASONS: tuple[str, ...] = (
    "empty",
    "no_json",
    "invalid_json",
    "not_an_object",
    "unknown_key",
    "ambiguous_key",
    "duplicate_attribute",
    "missing_attribute",
    "not_a_number",
    "out_of_range",
)
_PRIORITY = {reason: i for i, reason in enumerate(REASONS)}

# A key that matches no attribute after normalisation is read as a typo of the most similar
# attribute only if that similarity (difflib ratio of the normalised names) is at least this and
# beats the second most similar attribute by at least the margin; otherwise it is rejected.
TYPO_MIN_SIMILARITY = 0.8
TYPO_MARGIN = 0.1

# Replies with pathological numbers of braces should not make parsing slow.
_MAX_CANDIDATES = 20
_SNIPPET = 60


@dataclass(frozen=True)
class ParsedReport:
    """One reply as parsed: its weights in attribute order, or why it was rejected."""

    raw: str
    weights: tuple[float, ...] | None
    reason: str | None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason is not None and self.reason not in _PRIORITY:
            raise ValueError(f"unknown rejection reason {self.reason!r} (reasons: {', '.join(REASONS)})")
        if (self.weights is None) == (self.reason is None):
            raise ValueError("a report has either weights or a rejection reason, not both or neither")

    @property
    def ok(self) -> bool:
        """Whether the reply parsed (has no rejection reason)."""
        return self.reason is None


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 3] + "..."


def _snippet(text: str) -> str:
    return repr(_shorten(text))


# --------------------------------------------------------------------------------------------
# Finding the JSON object


class _Pairs(list):
    """A JSON object as its list of (key, value) pairs, so that repeated keys are not lost."""


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_Pairs)


_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\r?\n?(.*?)(?:```|\Z)", re.DOTALL)
_SCAN = {"{": re.compile(r"[{}\"'\\]"), "[": re.compile(r"[\[\]\"'\\]")}
_CLOSE = {"{": "}", "[": "]"}


def _defence(text: str) -> str:
    """The inside of the first code fence (an unclosed one runs to the end), or the text itself."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def _span_end(text: str, start: int) -> int | None:
    """The index just past the bracket that closes the one at ``start``; None if it never closes.

    Brackets inside double- or single-quoted strings do not count. A single quote opens a
    string only where JSON could start one (after ``{ [ , :``), so that an apostrophe in prose
    ("{it's}") does not hide the rest of the reply.
    """
    open_ch = text[start]
    close_ch = _CLOSE[open_ch]
    depth = 0
    quote: str | None = None
    escaped_at = -1
    for m in _SCAN[open_ch].finditer(text, start):
        i = m.start()
        if i == escaped_at:
            continue
        ch = m.group()
        if quote is not None:
            if ch == "\\":
                escaped_at = i + 1
            elif ch == quote:
                quote = None
        elif ch == '"' or (ch == "'" and _previous_char(text, i) in "{[,:"):
            quote = ch
        elif ch == open_ch:
            depth += 1
        elif ch == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def json_object_end(text: str) -> int | None:
    """Index just after the first balanced top-level object in ``text`` (None if not closed yet):
    where generation of a JSON report can stop, by the same scan the parser uses. Text before the
    first ``{`` (e.g. a code fence) is skipped; braces inside strings do not count."""
    start = text.find("{")
    return None if start < 0 else _span_end(text, start)


def _previous_char(text: str, i: int) -> str:
    """The last non-blank character before ``text[i]``."""
    i -= 1
    while i >= 0 and text[i].isspace():
        i -= 1
    return text[i] if i >= 0 else ""


_SMART_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})
_BARE_KEY = re.compile(r"[A-Za-z_][\w \-]*(?=\s*:)")
_TRAILING_COMMA = re.compile(r",\s*[}\]]")


def _repair(text: str) -> tuple[str, list[str]]:
    """Rewrite near-JSON as JSON: one pass that knows whether it is inside a string.

    Returns the rewritten text and the names of the repairs made.
    """
    fixes: set[str] = set()
    translated = text.translate(_SMART_QUOTES)
    if translated != text:
        fixes.add("curly quotes")
        text = translated
    out: list[str] = []
    i, n = 0, len(text)
    last = ""  # the last non-blank character written outside strings
    while i < n:
        ch = text[i]
        if ch == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            last, i = '"', j + 1
        elif ch == "'":
            # A single-quoted string becomes a double-quoted one: \' needs no escape any more,
            # and a bare " inside it now does.
            fixes.add("single quotes")
            out.append('"')
            j = i + 1
            while j < n and text[j] != "'":
                if text[j] == "\\" and j + 1 < n:
                    out.append("'" if text[j + 1] == "'" else text[j : j + 2])
                    j += 2
                    continue
                out.append('\\"' if text[j] == '"' else text[j])
                j += 1
            out.append('"')
            last, i = '"', j + 1
        elif ch == "," and _TRAILING_COMMA.match(text, i):
            fixes.add("trailing comma")
            i += 1
        elif ch == "/" and text.startswith("//", i):
            fixes.add("comment")
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif last in ("{", ",") and (m := _BARE_KEY.match(text, i)):
            fixes.add("unquoted key")
            out.append(json.dumps(m.group().strip()))
            last, i = '"', m.end()
        else:
            out.append(ch)
            if not ch.isspace():
                last = ch
            i += 1
    return "".join(out), sorted(fixes)


def _parse_candidate(candidate: str) -> tuple[Any, list[str]]:
    """Parse as JSON, then as repaired JSON; raises the first attempt's error if both fail."""
    try:
        return _loads(candidate), []
    except json.JSONDecodeError as first:
        repaired, fixes = _repair(candidate)
        if not fixes:
            raise
        try:
            return _loads(repaired), fixes
        except json.JSONDecodeError:
            raise first from None


def _kind(value: Any) -> str:
    if isinstance(value, _Pairs):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _scan(text: str, open_ch: str) -> tuple[Any, list[str], str | None]:
    """The first bracketed span of ``text`` that parses: (value, repairs, None).

    When none parses: (None, [], why the first candidate failed), or (None, [], None) when there
    is no ``open_ch`` at all.
    """
    first_error: str | None = None
    i = text.find(open_ch)
    for _ in range(_MAX_CANDIDATES):
        if i < 0:
            break
        end = _span_end(text, i)
        if end is None:
            first_error = first_error or (
                f"the {open_ch!r} at character {i} is never closed (reply cut off?): {_snippet(text[i:])}"
            )
            i = text.find(open_ch, i + 1)
            continue
        candidate = text[i:end]
        try:
            value, fixes = _parse_candidate(candidate)
            return value, fixes, None
        except json.JSONDecodeError as e:
            first_error = first_error or f"{e.msg} at character {e.pos} of {_snippet(candidate)}"
        i = text.find(open_ch, end)
    return None, [], first_error


def _find_object(text: str) -> tuple[_Pairs, list[str]]:
    """The reply's JSON object as pairs, with the repairs needed; raises _Reject."""
    body = _defence(text).strip()
    # Fast path for a clean reply; also the only way to see that a whole reply is a non-object.
    try:
        value = _loads(body)
    except json.JSONDecodeError:
        pass
    else:
        if isinstance(value, _Pairs):
            return value, []
        raise _Reject("not_an_object", f"the reply is {_kind(value)}, not a JSON object: {_snippet(body)}")

    error: str | None = None
    for where in (body, text) if body != text.strip() else (body,):
        value, fixes, why = _scan(where, "{")
        if isinstance(value, _Pairs):
            return value, fixes
        error = error or why
    if error is not None:
        raise _Reject("invalid_json", error)
    # No braces at all: a JSON list (say, bare weights) is a different mistake from plain prose.
    value, _, _ = _scan(body, "[")
    if isinstance(value, list):
        raise _Reject("not_an_object", f"the reply holds {_kind(value)}, not a JSON object: {_snippet(body)}")
    raise _Reject("no_json", f"no JSON object in the reply: {_snippet(text)}")


# --------------------------------------------------------------------------------------------
# Matching keys to attributes

_SEPARATORS = re.compile(r"[\s_\-]+")


def _norm(name: str) -> str:
    """Case and separators removed: "Spout Size", "spout-size" and "spoutSize" -> "spoutsize"."""
    return _SEPARATORS.sub("", name.lower())


@dataclass(frozen=True)
class _Matcher:
    names: tuple[str, ...]
    norms: tuple[str, ...]
    exact: dict[str, int]
    by_norm: dict[str, tuple[int, ...]]

    def match(self, key: str) -> tuple[int | None, str, tuple[int, ...]]:
        """(attribute index, how, candidates) for a key.

        ``how`` is "" for a match up to case and separators, "typo" for a near-miss, and the
        rejection reason when the index is None; ``candidates`` are the tied attributes then.
        """
        stripped = key.strip()
        if stripped in self.exact:
            return self.exact[stripped], "", ()
        norm = _norm(key)
        hits = self.by_norm.get(norm, ())
        if len(hits) == 1:
            return hits[0], "", ()
        if len(hits) > 1:
            return None, "ambiguous_key", hits
        return _typo_match(norm, self.norms)


@lru_cache(maxsize=64)
def _matcher(names: tuple[str, ...]) -> _Matcher:
    if not names:
        raise ValueError("a scenario needs at least one attribute name")
    if len(set(names)) != len(names):
        raise ValueError(f"attribute names repeat: {list(names)}")
    norms = tuple(_norm(n) for n in names)
    by_norm: dict[str, tuple[int, ...]] = {}
    for i, norm in enumerate(norms):
        by_norm[norm] = by_norm.get(norm, ()) + (i,)
    return _Matcher(names, norms, {n.strip(): i for i, n in enumerate(names)}, by_norm)


@lru_cache(maxsize=4096)
def _typo_match(norm: str, norms: tuple[str, ...]) -> tuple[int | None, str, tuple[int, ...]]:
    if not norm:
        return None, "unknown_key", ()
    scores = sorted(
        ((difflib.SequenceMatcher(None, norm, a).ratio(), i) for i, a in enumerate(norms)), reverse=True
    )
    best, index = scores[0]
    if best < TYPO_MIN_SIMILARITY:
        return None, "unknown_key", ()
    tied = tuple(i for score, i in scores if best - score < TYPO_MARGIN)
    if len(tied) > 1:
        return None, "ambiguous_key", tied
    return index, "typo", ()


# --------------------------------------------------------------------------------------------
# Values

_NUMERIC = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*%?\s*")


def _number(value: Any) -> tuple[float | None, str]:
    """(value, "") for a number or numeric string, else (None, what the value is)."""
    if isinstance(value, bool) or value is None or isinstance(value, list):
        return None, _kind(value)
    if isinstance(value, int):
        try:
            return float(value), ""
        except OverflowError:  # an integer beyond float range is a number, just out of range
            return (math.inf if value > 0 else -math.inf), ""
    if isinstance(value, float):
        return (value, "") if math.isfinite(value) else (None, "not a finite number")
    if isinstance(value, str):
        m = _NUMERIC.fullmatch(value.replace("\u2212", "-"))
        if m:
            number = float(m.group(1))
            return (number, "") if math.isfinite(number) else (None, "not a finite number")
        return None, "a non-numeric string"
    return None, type(value).__name__


def _fmt(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


# --------------------------------------------------------------------------------------------
# Parsing


def parse_report(text: str, attribute_names: Sequence[str], low: float = -100, high: float = 100) -> ParsedReport:
    """Read one self-report as weights in ``attribute_names`` order, or reject it with a reason.

    On success ``detail`` notes any repairs and typo matches made, so that they can be audited.
    """
    if low > high:
        raise ValueError(f"low ({low}) is above high ({high})")
    matcher = _matcher(tuple(attribute_names))
    if not text or not text.strip():
        return ParsedReport(text, None, "empty", "the reply is blank")
    try:
        pairs, fixes = _find_object(text)
    except _Reject as r:
        return ParsedReport(text, None, r.reason, r.detail)

    names = matcher.names
    notes = [f"repaired JSON ({', '.join(fixes)})"] if fixes else []
    problems: list[tuple[str, str]] = []  # (reason, message), in the order found
    key_of: list[str | None] = [None] * len(names)
    values: list[float | None] = [None] * len(names)
    for key, raw_value in pairs:
        index, how, tied = matcher.match(key)
        if index is None:
            if how == "ambiguous_key":
                candidates = ", ".join(names[i] for i in tied)
                problems.append((how, f"key {key!r} is equally close to attributes {candidates}"))
            else:
                problems.append((how, f"key {key!r} matches no attribute (attributes: {', '.join(names)})"))
            continue
        name = names[index]
        if key_of[index] is not None:
            message = f"keys {key_of[index]!r} and {key!r} both match attribute {name!r}"
            problems.append(("duplicate_attribute", message))
            continue
        key_of[index] = key
        if how == "typo":
            notes.append(f"key {key!r} read as {name!r}")
        number, what = _number(raw_value)
        if number is None:
            shown = _shorten(json.dumps(_plain(raw_value), ensure_ascii=False))
            problems.append(("not_a_number", f"{key!r}: {shown} is {what}"))
        elif not low <= number <= high:
            problems.append(("out_of_range", f"{key!r}: {_fmt(number)} is outside [{_fmt(low)}, {_fmt(high)}]"))
        else:
            values[index] = number
    for index, key in enumerate(key_of):
        if key is None:
            problems.append(("missing_attribute", f"no key for attribute {names[index]!r}"))

    if problems:
        reason = min((r for r, _ in problems), key=_PRIORITY.__getitem__)
        main = [m for r, m in problems if r == reason]
        others = [m for r, m in problems if r != reason]
        detail = "; ".join(main) + (f" (also: {'; '.join(others)})" if others else "")
        return ParsedReport(text, None, reason, detail)
    return ParsedReport(text, tuple(values), None, "; ".join(notes))  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    """A parsed value with objects turned back into dicts, for showing in a detail."""
    if isinstance(value, _Pairs):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass
class ParseSummary:
    """What happened to a batch of replies: counts by reason, and every rejected reply."""

    n_total: int = 0
    n_ok: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    rejected: list[tuple[str, ParsedReport]] = field(default_factory=list)

    @property
    def n_rejected(self) -> int:
        """How many replies were rejected."""
        return self.n_total - self.n_ok

    @property
    def ok_rate(self) -> float:
        """The share of replies that parsed (NaN when there are none)."""
        return self.n_ok / self.n_total if self.n_total else math.nan

    def add(self, label: str, report: ParsedReport) -> None:
        """Count one parsed reply, keeping it with its label if it was rejected."""
        self.n_total += 1
        if report.ok:
            self.n_ok += 1
        else:
            self.by_reason[report.reason] += 1  # type: ignore[index]
            self.rejected.append((label, report))

    def table(self) -> list[tuple[str, int]]:
        """(reason, count), most frequent first; ties in ``REASONS`` order."""
        return sorted(self.by_reason.items(), key=lambda rc: (-rc[1], _PRIORITY[rc[0]]))

    def __str__(self) -> str:
        head = f"{self.n_ok}/{self.n_total} replies parsed"
        if not self.by_reason:
            return head
        return head + "; rejected: " + ", ".join(f"{r} {c}" for r, c in self.table())


def parse_reports(
    texts: Sequence[str],
    attribute_names: Sequence[Sequence[str]] | Sequence[str],
    labels: Sequence[str] | None = None,
    low: float = -100,
    high: float = 100,
) -> tuple[list[ParsedReport], ParseSummary]:
    """Parse a batch of replies, in order, and summarise them.

    ``attribute_names`` is either one list of names shared by every reply or one list per reply.
    ``labels`` name the replies in ``ParseSummary.rejected`` (default: their index as a string).
    """
    n = len(texts)
    if attribute_names and isinstance(attribute_names[0], str):
        per_text: Sequence[Sequence[str]] = [attribute_names] * n  # type: ignore[list-item]
    else:
        per_text = attribute_names  # type: ignore[assignment]
        if len(per_text) != n:
            raise ValueError(f"{n} replies but {len(per_text)} lists of attribute names")
    if labels is None:
        labels = [str(i) for i in range(n)]
    elif len(labels) != n:
        raise ValueError(f"{n} replies but {len(labels)} labels")

    summary = ParseSummary()
    reports = []
    for text, names, label in zip(texts, per_text, labels):
        report = parse_report(text, names, low, high)
        summary.add(label, report)
        reports.append(report)
    return reports, summary
