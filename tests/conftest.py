"""Shared fixtures. Engines are expensive (~30 s): share one per module, not per test.

Model files: ``tiny_llama_dir`` is a random tiny Llama (no tokenizer; pass token ids and
``skip_tokenizer_init=True``). ``smollm2_dir`` is the embedded SmolLM2-135M-Instruct, prepared
into ``$MESA_VLLM_CACHE`` (``make test`` prepares it first; otherwise the first use converts it,
about 20-30 s).
"""

from __future__ import annotations

import os

import pytest

# vLLM starts workers with spawn; keep the KV cache small and predictable on CPU.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama with T = 64 (fp32), built once per session."""
    from mesa_vllm.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model", trained_len=64)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder (bf16, T = 8192)."""
    from mesa_vllm.assets import smollm2_path

    return smollm2_path(verbose=True)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
