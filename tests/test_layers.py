"""The package's shape: no import cycles, and no module imports one from a layer above it.

Every ``import`` counts, also those inside functions (a lazy import is still a dependency); only
those under ``if TYPE_CHECKING:`` do not (they never run: annotations).
The layers, lowest first (ARCHITECTURE.md draws them):

- core: scenarios, design, prompts, the numeric core, analysis, figures, report, io, model files;
- backends (inference only, ``selfinterp.backends``) and training (``selfinterp.training``): each
  uses the core, neither uses the other;
- pipeline (``selfinterp.pipeline``): the stages, the runner, measurement, the plan, the server;
- interface: the CLI and the notebook API.
"""

from __future__ import annotations

import ast
from pathlib import Path

import selfinterp

ROOT = Path(selfinterp.__file__).parent

INTERFACE = {"selfinterp", "selfinterp.__main__", "selfinterp.api", "selfinterp.cli", "selfinterp.comparison"}


def is_training(module: str) -> bool:
    return module == "selfinterp.training" or module.startswith("selfinterp.training.")


def is_backend(module: str) -> bool:
    return module == "selfinterp.backends" or module.startswith("selfinterp.backends.")


def layer(module: str) -> int:
    """0 core, 1 backends and training, 2 pipeline, 3 interface."""
    if module in INTERFACE:
        return 3
    if module == "selfinterp.pipeline" or module.startswith("selfinterp.pipeline."):
        return 2
    if is_training(module) or is_backend(module):
        return 1
    return 0


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ("selfinterp",) + p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # type-only imports never run: not a dependency
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            found.update(subs or ([base] if base in known else []))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
    return found - {name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_the_import_parser_sees_lazy_and_relative_imports():
    g = graph()
    assert "selfinterp.modelref" in g["selfinterp.backends.hf"]  # `from .. import modelref`
    assert "selfinterp.training.local" in g["selfinterp.pipeline.runner"]  # inside a method
    assert "selfinterp.pipeline.runner" not in g["selfinterp.pipeline.stages"]  # under TYPE_CHECKING
    assert "selfinterp.backends.base" in g["selfinterp.backends.simulated"]  # `from .base import ...`


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_one_above_its_layer():
    bad = [f"{m} (layer {layer(m)}) imports {n} (layer {layer(n)})"
           for m, deps in graph().items() for n in deps if layer(n) > layer(m)]
    assert not bad, "\n".join(bad)


def test_backends_run_models_and_do_not_train_them():
    bad = [f"{m} imports {n}" for m, deps in graph().items() for n in deps
           if (is_backend(m) and is_training(n)) or (is_training(m) and is_backend(n))]
    assert not bad, "\n".join(bad)
    import selfinterp.backends.openai_api as openai_api
    import selfinterp.backends.simulated as simulated

    for cls in (simulated.SimulatedBackend, openai_api.OpenAIBackend):  # trainers train (selfinterp.training)
        assert not hasattr(cls, "finetune"), cls
