"""Tiny randomly initialised models for fast, exact tests (no download, seconds to build)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VOCAB = 256


def make_tiny_llama(
    path: str | Path,
    *,
    trained_len: int = 64,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    rope_theta: float = 10000.0,
    init_std: float = 0.25,
    extra_config: dict | None = None,
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` (fp32 safetensors) to ``path``.

    ``init_std`` is large on purpose: random models with the usual 0.02 give nearly flat
    next-token distributions, where greedy decoding flips on rounding noise. With a
    larger scale the top token usually wins by a clear margin, so token-for-token
    comparisons test the attention rule rather than float luck.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=trained_len,
        rope_theta=rope_theta,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
        **(extra_config or {}),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    # Record how it was made, for humans reading a temp dir.
    (path / "mesa_tiny.json").write_text(json.dumps({"seed": seed, "init_std": init_std}))
    return path


def random_prompt(length: int, seed: int, vocab: int = TINY_VOCAB) -> list[int]:
    """Token ids in ``[3, vocab)`` (skipping bos/eos/pad) for tiny-model tests."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()
