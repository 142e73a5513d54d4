"""The README's command synopsis keeps up with --help (issue 12, item 9): every command is in it,
with every option its --help lists; and `selfinterp --version`."""

import re
from pathlib import Path

import typer
from typer.testing import CliRunner

from selfinterp import __version__
from selfinterp.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def synopsis() -> list[str]:
    """The README's "Command line" block, one entry per command (continuation lines joined)."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Command line\n\n```\n(.*?)```", text, re.S).group(1)
    entries: list[str] = []
    for line in block.splitlines():
        if line.startswith("selfinterp "):
            entries.append(line.split("#")[0])
        elif line.strip() and entries:
            entries[-1] += " " + line.split("#")[0].strip()
    return entries


def commands(group, path: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click: no isinstance)
            yield from commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


def test_every_option_of_every_command_is_in_the_synopsis():
    root = typer.main.get_command(app)
    entries = synopsis()
    missing = []
    for path, cmd in commands(root):
        # "selfinterp models list | install NAME": a line may hold several sub-commands of a group.
        lines = [e for e in entries if re.match(rf"selfinterp {' '.join(path[:-1])}\s*(\S+ \| )*{path[-1]}\b".replace("  ", " "), e)
                 or (len(path) > 1 and e.startswith(f"selfinterp {path[0]} ") and re.search(rf"\| {path[-1]}\b", e))]
        if not lines:
            missing.append(f"selfinterp {' '.join(path)} (the command)")
            continue
        text = " ".join(lines)
        for p in cmd.params:
            if p.param_type_name != "option" or p.name == "help" or p.hidden:
                continue
            names = [n for n in p.opts + p.secondary_opts if n.startswith("--")]
            if not any(re.search(rf"{re.escape(n)}(?![\w-])", text) for n in names):
                missing.append(f"selfinterp {' '.join(path)} {'/'.join(names)}")
    assert not missing, "README synopsis lacks:\n" + "\n".join(missing)
    top = [p for p in root.params if p.param_type_name == "option" and p.name != "help"]
    for p in top:
        assert any(p.opts[0] in e for e in entries), p.opts


def test_version_flag():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"selfinterp {__version__}"
    assert CliRunner().invoke(app, ["version"]).output.strip() == f"selfinterp {__version__}"
