"""Model-side support: hand each attention layer's rotary embedding to the backend.

A Mesa model is the stock vLLM model with one change: the attention module no longer
rotates q and k itself. Its ``rotary_emb`` becomes :class:`DeferredRotary` (returns q and
k untouched, so the model's forward and its compiled graph stay the same), and the
original rotary module moves to the ``Attention`` layer as ``mesa_rotary``, where the
MESA backend uses the model's own cos/sin table (extended to ``max_model_len`` by
``mesa_vllm.engine``) to rotate keys once and queries per pass.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention


class DeferredRotary(nn.Module):
    """Stands in for a rotary embedding: q and k go on to attention unrotated."""

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
        return query, key


def _rotary_classes():
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    from vllm.model_executor.layers.rotary_embedding.linear_scaling_rope import (
        LinearScalingRotaryEmbedding,
    )
    from vllm.model_executor.layers.rotary_embedding.llama3_rope import Llama3RotaryEmbedding
    from vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope import (
        YaRNScalingRotaryEmbedding,
    )

    # Rotations that are a fixed angle per position: mesa may rotate at any position
    # with them. Length-dependent variants (dynamic NTK, LongRoPE, M-RoPE) are not.
    return (RotaryEmbedding, Llama3RotaryEmbedding, LinearScalingRotaryEmbedding,
            YaRNScalingRotaryEmbedding)


def hand_rotary_to_backend(model: nn.Module, vllm_config: VllmConfig) -> int:
    """Move every attention module's rotary embedding onto its ``Attention`` layer."""
    from mesa_vllm.attention.backend import MesaAttentionImpl

    max_len = vllm_config.model_config.max_model_len
    allowed = _rotary_classes()
    moved = 0
    for name, module in model.named_modules():
        attn = getattr(module, "attn", None)
        rotary = getattr(module, "rotary_emb", None)
        if not isinstance(attn, Attention) or rotary is None or isinstance(rotary, DeferredRotary):
            continue
        if type(rotary) not in allowed:
            raise NotImplementedError(
                f"{name}: rotary embedding {type(rotary).__name__} is not supported by "
                "mesa (supported: " + ", ".join(c.__name__ for c in allowed) + ")."
            )
        if rotary.cos_sin_cache.shape[0] < max_len:
            raise RuntimeError(
                f"{name}: rotary table has {rotary.cos_sin_cache.shape[0]} positions, fewer "
                f"than max_model_len={max_len}; mesa_vllm.engine should have extended it."
            )
        if not isinstance(attn.impl, MesaAttentionImpl):
            raise RuntimeError(
                f"{name}: attention runs on {type(attn.impl).__name__}, not the MESA backend; "
                "the platform did not select it (is mesa-vllm's vLLM plugin loaded?)."
            )
        attn.mesa_rotary = rotary
        module.rotary_emb = DeferredRotary()
        moved += 1
    if moved == 0:
        raise RuntimeError(
            f"{type(model).__name__}: found no attention module with a rotary embedding to "
            "hand to the MESA backend."
        )
    return moved
