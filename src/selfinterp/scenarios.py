"""Stage 1 of the protocol: the scenarios a model makes choices in, and the roles it plays.

A scenario is an everyday choice ("Which condo would you prefer?") between two options that
differ on k numeric attributes (k = 5 in the paper), each with a name, units and a range.
The question given to the model carries a role ("Imagine you are Zeus. Which condo ...").

Formats read here:
- this project's bank: ``data/bank/<domain>.json`` (a list of scenarios with ``id``) and
  ``data/roles.csv``;
- the paper's ``candidate_scenarios.json`` (``short_name`` instead of ``id``) with ``roles.csv``;
- the paper's ``scenarios.csv`` (``scenario, question, attr1..k, attr1..k_min, attr1..k_max``),
  where the role is already part of the question.

Validation collects *every* problem with its location (file and field), so that a user can fix
a file in one pass: ``selfinterp scenarios validate FILE``.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

DEFAULT_K = 5
ROLE_PREFIX = "Imagine you are {role}. "


@dataclass(frozen=True)
class Attribute:
    """One attribute of a scenario: its name, units and range of values."""

    name: str
    units: str
    min: float
    max: float

    @property
    def span(self) -> float:
        """The width of the attribute's range (max - min)."""
        return self.max - self.min

    @property
    def decimals(self) -> int:
        """Decimals that option values are rounded to, from the size of the range.

        The paper's rule: 0 decimals for ranges >= 5, 1 for ranges in [1, 5), and for smaller
        ranges one decimal more than the range's first significant digit (0.2 -> 2, 0.04 -> 3),
        so that values drawn from the range stay distinct.
        """
        span = round(self.span, 9)  # 2.8 - 1.8 is 0.9999999999999998 in floating point
        if span >= 5:
            return 0
        if span >= 1:
            return 1
        return math.ceil(-math.log10(span)) + 1


@dataclass(frozen=True)
class Scenario:
    """A decision scenario: id, question and attributes, with an optional domain and role."""

    id: str
    question: str
    attributes: tuple[Attribute, ...]
    domain: str = ""
    role: str | None = None

    @property
    def k(self) -> int:
        """The number of attributes."""
        return len(self.attributes)

    @property
    def attribute_names(self) -> list[str]:
        """The attributes' names, in order."""
        return [a.name for a in self.attributes]

    @property
    def prompt_question(self) -> str:
        """The question as the model sees it: with the role in front when there is one."""
        if self.role is None:
            return self.question
        return ROLE_PREFIX.format(role=self.role) + self.question

    def with_role(self, role: str | None) -> "Scenario":
        """The same scenario with ``role`` (None: without one)."""
        return replace(self, role=role)

    def to_dict(self) -> dict[str, Any]:
        """The scenario in the scenario files' JSON form (each range as ``[min, max]``)."""
        d: dict[str, Any] = {"id": self.id, "question": self.question}
        if self.domain:
            d["domain"] = self.domain
        if self.role is not None:
            d["role"] = self.role
        d["attributes"] = [
            {"name": a.name, "units": a.units, "range": [a.min, a.max]} for a in self.attributes
        ]
        return d


# --------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class Problem:
    """One problem found in scenario data, and where (``location: message``)."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class ScenarioError(ValueError):
    """Raised with every problem found in a scenario file; ``str()`` lists them one per line (one
    problem: a single line)."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in scenario data:"
        if n == 1:  # one problem, one line
            super().__init__(f"{head} {self.problems[0]}")
        else:
            super().__init__("\n".join([head] + [f"  {p}" for p in self.problems]))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float (JSON allows 1 followed by 400 zeros)
            return None
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            v = float(value)
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return None


def _check_attribute(raw: Any, where: str, problems: list[Problem]) -> Attribute | None:
    if not isinstance(raw, dict):
        problems.append(Problem(where, f"must be an object with name, units and range, got {raw!r}"))
        return None
    name = raw.get("name")
    units = raw.get("units")
    rng = raw.get("range")
    ok = True
    if not isinstance(name, str) or not name.strip():
        problems.append(Problem(f"{where}.name", "must be a non-empty string"))
        ok = False
    if not isinstance(units, str) or not units.strip():
        problems.append(Problem(f"{where}.units", "must be a non-empty string"))
        ok = False
    if not isinstance(rng, (list, tuple)) or len(rng) != 2:
        problems.append(Problem(f"{where}.range", f"must be [min, max], got {rng!r}"))
        return None
    lo, hi = _number(rng[0]), _number(rng[1])
    if lo is None or hi is None:
        problems.append(Problem(f"{where}.range", f"min and max must be finite numbers, got {rng!r}"))
        return None
    if not lo < hi:
        problems.append(Problem(f"{where}.range", f"min ({rng[0]}) must be less than max ({rng[1]})"))
        return None
    if not ok:
        return None
    return Attribute(name=name.strip(), units=units.strip(), min=lo, max=hi)


def _check_scenario(raw: Any, where: str, k: int | None, problems: list[Problem]) -> Scenario | None:
    if not isinstance(raw, dict):
        problems.append(Problem(where, "must be an object with id, question and attributes"))
        return None
    sid = raw.get("id", raw.get("short_name"))
    question = raw.get("question")
    attrs = raw.get("attributes")
    ok = True
    if not isinstance(sid, str) or not sid.strip():
        problems.append(Problem(f"{where}.id", "must be a non-empty string"))
        ok = False
    if not isinstance(question, str) or not question.strip():
        problems.append(Problem(f"{where}.question", "must be a non-empty string"))
        ok = False
    if not isinstance(attrs, list):
        problems.append(Problem(f"{where}.attributes", "must be a list of attributes"))
        return None
    if k is not None and len(attrs) != k:
        problems.append(Problem(f"{where}.attributes", f"must have exactly {k} attributes, found {len(attrs)}"))
        ok = False
    parsed = [_check_attribute(a, f"{where}.attributes[{j}]", problems) for j, a in enumerate(attrs)]
    names = [a.name for a in parsed if a is not None]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(Problem(f"{where}.attributes", f"attribute name {dup!r} appears more than once"))
        ok = False
    if not ok or any(a is None for a in parsed) or not parsed:
        return None
    role = raw.get("role")
    return Scenario(
        id=sid.strip(),
        question=question.strip(),
        attributes=tuple(parsed),  # type: ignore[arg-type]
        domain=str(raw.get("domain", "") or ""),
        role=role if isinstance(role, str) and role.strip() else None,
    )


def validate(raw: Any, source: str = "<data>", k: int | None = DEFAULT_K) -> tuple[list[Scenario], list[Problem]]:
    """Check a list of raw scenario dicts; return the valid scenarios and every problem found.

    ``k`` is the required number of attributes (None: any number >= 1).
    """
    problems: list[Problem] = []
    if not isinstance(raw, list):
        return [], [Problem(source, "must hold a JSON list of scenarios")]
    scenarios: list[Scenario] = []
    first_seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        where = f"{source}[{i}]"
        s = _check_scenario(item, where, k, problems)
        if s is None:
            continue
        if s.id in first_seen:
            problems.append(Problem(f"{where}.id", f"id {s.id!r} already used by {source}[{first_seen[s.id]}]"))
            continue
        first_seen[s.id] = i
        scenarios.append(s)
    return scenarios, problems


def parse(raw: Any, source: str = "<data>", k: int | None = DEFAULT_K) -> list[Scenario]:
    """Validated scenarios from raw (JSON-like) data; ScenarioError listing every problem found."""
    scenarios, problems = validate(raw, source, k)
    if problems:
        raise ScenarioError(problems)
    return scenarios


# --------------------------------------------------------------------------------------------
# Loaders


def _not_text(path: Path, e: OSError | UnicodeDecodeError) -> ScenarioError:
    """A file that cannot be read as text, as a problem that says why."""
    from .journal import unreadable

    return ScenarioError([Problem(str(path), unreadable(e, "scenario", "JSON or CSV"))])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise _not_text(path, e) from None
    except json.JSONDecodeError as e:
        raise ScenarioError([Problem(f"{path}:{e.lineno}:{e.colno}", f"invalid JSON: {e.msg}")]) from None


def _scenarios_csv_rows(path: Path, k: int | None) -> tuple[list[dict], list[Problem]]:
    """Turn the paper's scenarios.csv into raw scenario dicts (with problems for bad cells)."""
    problems: list[Problem] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        n_attr = k or sum(1 for c in cols if c.startswith("attr") and c[4:].isdigit())
        needed = ["scenario", "question"] + [f"attr{j}{s}" for j in range(1, n_attr + 1) for s in ("", "_min", "_max")]
        missing = [c for c in needed if c not in cols]
        if missing:
            return [], [Problem(str(path), f"missing column(s): {', '.join(missing)}")]
        raw = []
        for line, row in enumerate(reader, start=2):
            raw.append({
                "id": row["scenario"],
                "question": row["question"],
                "attributes": [
                    {"name": row[f"attr{j}"], "units": "", "range": [row[f"attr{j}_min"], row[f"attr{j}_max"]]}
                    for j in range(1, n_attr + 1)
                ],
                "_line": line,
            })
    return raw, problems


def _is_paper_scenarios_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def validate_file(path: str | Path, k: int | None = DEFAULT_K) -> tuple[list[Scenario], list[Problem]]:
    """Validate a scenario file of any supported format: JSON list, or the paper's scenarios.csv.

    For scenarios.csv (which has no units) the units are filled in from a
    ``candidate_scenarios.json`` in the same folder when there is one.
    """
    path = Path(path)
    if not path.exists():
        return [], [Problem(str(path), "file not found")]
    if _is_paper_scenarios_csv(path):
        try:
            raw, problems = _scenarios_csv_rows(path, k)
        except (OSError, UnicodeDecodeError) as e:
            return [], _not_text(path, e).problems
        except csv.Error as e:
            return [], [Problem(str(path), f"not a readable CSV file ({e})")]
        if problems:
            return [], problems
        # scenarios.csv has no units: take them from the paper's candidate file beside it.
        units = _units_from_candidates(path.parent / "candidate_scenarios.json")
        for r in raw:
            for a in r["attributes"]:
                a["units"] = units.get((r["id"], a["name"]), "")
                if not a["units"]:
                    problems.append(Problem(
                        f"{path}:line {r['_line']}",
                        f"no units for attribute {a['name']!r}: scenarios.csv has none, and no "
                        "candidate_scenarios.json beside it names them",
                    ))
        if problems:
            return [], problems
        scenarios, problems = validate([{k_: v for k_, v in r.items() if k_ != "_line"} for r in raw], str(path), k)
        # Point problems at CSV lines instead of list indices.
        fixed = []
        for p in problems:
            loc = p.location
            if loc.startswith(f"{path}["):
                idx = int(loc[len(str(path)) + 1 : loc.index("]")])
                loc = f"{path}:line {raw[idx]['_line']}{loc[loc.index(']') + 1:]}"
            fixed.append(Problem(loc, p.message))
        return scenarios, fixed
    try:
        data = _read_json(path)
    except ScenarioError as e:
        return [], e.problems
    return validate(data, str(path), k)


def load(path: str | Path, k: int | None = DEFAULT_K) -> list[Scenario]:
    """Load a scenario file (JSON list or the paper's scenarios.csv); raise ScenarioError on problems."""
    scenarios, problems = validate_file(path, k)
    if problems:
        raise ScenarioError(problems)
    return scenarios


def _units_from_candidates(path: Path) -> dict[tuple[str, str], str]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    out = {}
    for s in data if isinstance(data, list) else []:
        for a in s.get("attributes", []) if isinstance(s, dict) else []:
            if isinstance(a, dict):
                out[(s.get("short_name", s.get("id")), a.get("name"))] = a.get("units", "")
    return out


def load_roles(path: str | Path) -> list[str]:
    """Read a roles CSV with a ``role`` column (the paper's roles.csv, or this project's)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "role" not in (reader.fieldnames or []):
                raise ScenarioError([Problem(str(path), "missing column 'role'")])
            roles = [(row["role"] or "").strip() for row in reader]
    except (OSError, UnicodeDecodeError) as e:
        raise _not_text(path, e) from None
    except csv.Error as e:
        raise ScenarioError([Problem(str(path), f"not a readable CSV file ({e})")]) from None
    if not roles:
        raise ScenarioError([Problem(str(path), "no roles (a header only, or empty)")])
    empty = [i + 2 for i, r in enumerate(roles) if not r]
    if empty:
        raise ScenarioError([Problem(f"{path}:line {i}", "empty role") for i in empty])
    return roles


def assign_roles(scenarios: Sequence[Scenario], roles: Sequence[str], seed: int = 0) -> list[Scenario]:
    """Give each scenario a role from a seeded shuffle; every role is used once before any repeats."""
    if not roles:
        raise ValueError("no roles to assign")
    rng = random.Random(seed)
    chosen: list[str] = []
    while len(chosen) < len(scenarios):
        pool = list(roles)
        rng.shuffle(pool)
        chosen.extend(pool)
    return [s.with_role(r) for s, r in zip(scenarios, chosen)]


def load_paper_candidates(scenarios_json: str | Path, roles_csv: str | Path | None = None,
                          seed: int = 0) -> list[Scenario]:
    """The paper's ``candidate_scenarios.json`` (+ ``roles.csv``, assigned with ``seed``)."""
    scenarios = load(scenarios_json)
    if roles_csv is not None:
        scenarios = assign_roles(scenarios, load_roles(roles_csv), seed)
    return scenarios


# --------------------------------------------------------------------------------------------
# The bundled bank


def _data_dir():
    return resources.files("selfinterp") / "data"


def bank_files() -> list:
    """The bundled bank's JSON files, one per domain, sorted by name."""
    bank = _data_dir() / "bank"
    return sorted((p for p in bank.iterdir() if p.name.endswith(".json")), key=lambda p: p.name)


def load_bank(domains: Iterable[str] | None = None) -> list[Scenario]:
    """Every scenario of the bundled bank (one JSON file per domain), in a stable order."""
    wanted = set(domains) if domains is not None else None
    raw: list[dict] = []
    for p in bank_files():
        domain = p.name[: -len(".json")]
        if wanted is not None and domain not in wanted:
            continue
        items = json.loads(p.read_text(encoding="utf-8"))
        for item in items:
            item.setdefault("domain", domain)
        raw.extend(items)
    return parse(raw, "selfinterp/data/bank")


def load_bundled_roles() -> list[str]:
    """The roles bundled with the package (``data/roles.csv``)."""
    with resources.as_file(_data_dir() / "roles.csv") as p:
        return load_roles(p)
