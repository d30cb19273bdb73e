"""Shared fixtures. Engines are expensive (~30 s): share one per module, not per test."""

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
