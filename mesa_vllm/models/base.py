"""Model-side support: hand each attention layer's rotary embedding to the backend.

A Mesa model is the stock vLLM model with one change: the model no longer rotates q and k
itself; the MESA backend does, with the model's own cos/sin table (reaching
``max_model_len``), keys once and queries per pass. Each ``Attention`` layer gets that
table as ``mesa_rotary`` (a :class:`RotaryTable`: ``cos_sin_cache`` in vLLM's layout,
``[positions, rotary_dim]`` = cos half then sin half, and ``is_neox_style``).

Two shapes of model are handled by :func:`hand_rotary_to_backend`:

- vLLM's own model classes (Llama, Mistral, Qwen2, Phi-3): every attention module holds a
  vLLM rotary embedding as ``rotary_emb`` next to its ``attn``. The rotary becomes
  :class:`DeferredRotary` (returns q and k untouched, so the model's forward and its
  compiled graph stay the same); its table goes to ``attn``.
- vLLM's Transformers modeling backend (GPT-NeoX): the Hugging Face model computes
  ``cos, sin`` once per forward in one rotary module and each attention module rotates
  with ``rotate_half`` before calling vLLM's attention. The rotary module becomes
  :class:`NoRotation` (``cos = 1, sin = 0``: ``q * 1 + rotate_half(q) * 0`` is ``q``
  exactly), and the table is the Hugging Face module's own output at positions
  ``[0, max_model_len)``.

Only rotations that are a fixed angle per position are accepted: mesa rotates at any
position with them. Rotations whose table depends on the sequence length (dynamic NTK,
LongRoPE's short/long switch, M-RoPE, dual-chunk) are refused; ``mesa_vllm.engine``
refuses them from the config before any weights load, and this module again, loudly, if
one reaches it.
"""

from __future__ import annotations

import torch
from torch import nn

from mesa_vllm.rope import NoRotation, angle_per_position, fractional_step_table
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention

# Hugging Face rope types (``rope_parameters["rope_type"]``) with a fixed angle per
# position. vLLM builds them as the rotary classes in ``_vllm_rotary_classes``.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class DeferredRotary(nn.Module):
    """Stands in for a vLLM rotary embedding: q and k go on to attention unrotated."""

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
        return query, key


class RotaryTable(nn.Module):
    """What the MESA backend reads from ``layer.mesa_rotary``: the model's rotation table."""

    def __init__(self, cos_sin_cache: torch.Tensor, is_neox_style: bool, source: str,
                 angles: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("cos_sin_cache", cos_sin_cache, persistent=False)
        self.is_neox_style = bool(is_neox_style)
        self.rotary_dim = int(cos_sin_cache.shape[-1])
        self.source = source
        # Angle per position of each frequency (float64), for rotations at fractional
        # positions (the linear stair); taken from a float32 table, not the model-dtype one.
        self.angles = angles
        self._fractional: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def fractional_table(self, step: int, dtype: torch.dtype) -> torch.Tensor:
        """Row ``j`` at position ``j / step`` (built once, shared by every layer)."""
        table = self._fractional.get((step, dtype))
        if table is None:
            if self.angles is None:
                raise RuntimeError(f"{self.source}: no rotation angles for fractional positions.")
            table = fractional_step_table(self.cos_sin_cache, self.angles, step, dtype)
            self._fractional[(step, dtype)] = table
        return table

    def extra_repr(self) -> str:
        return (f"positions={self.cos_sin_cache.shape[0]}, rotary_dim={self.rotary_dim}, "
                f"neox={self.is_neox_style}, source={self.source}")


def _vllm_rotary_classes():
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


# --------------------------------------------------------------------------------------
# Tables
def vllm_rotary_table(rotary: nn.Module, length: int) -> torch.Tensor:
    """The cos/sin table of a vLLM rotary embedding, covering at least ``length`` positions.

    The table is the rotary's own ``cos_sin_cache`` when that is long enough (with
    ``max_position_embeddings`` raised to ``max_model_len`` by ``mesa_vllm.engine`` it is,
    for the default, Llama-3 and linear types, whose frequencies do not depend on it).
    YaRN builds its table for ``original_max_position_embeddings * factor`` positions
    whatever the config says; it is extended here with the same frequencies and
    magnitude, and the extension must reproduce the stock table bit for bit where they
    overlap. Never mutates ``rotary`` (vLLM shares rotary objects between layers/models).
    """
    from vllm.model_executor.layers.rotary_embedding.linear_scaling_rope import (
        LinearScalingRotaryEmbedding,
    )
    from vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope import (
        YaRNScalingRotaryEmbedding,
    )

    allowed = _vllm_rotary_classes()
    name = type(rotary).__name__
    if type(rotary) not in allowed:
        raise NotImplementedError(
            f"rotary embedding {name} is not supported by mesa (supported: "
            + ", ".join(c.__name__ for c in allowed)
            + "); its angles are not a fixed function of the position."
        )
    if isinstance(rotary, LinearScalingRotaryEmbedding) and len(rotary.scaling_factors) != 1:
        raise NotImplementedError(
            f"{name} with several scaling factors {rotary.scaling_factors} (multi-LoRA "
            "tables) is not supported by mesa."
        )
    stock = rotary.cos_sin_cache
    if stock.shape[-1] != rotary.rotary_dim or rotary.rotary_dim > rotary.head_size:
        raise RuntimeError(
            f"{name}: table width {stock.shape[-1]} does not match rotary_dim="
            f"{rotary.rotary_dim} (head_size={rotary.head_size})."
        )
    if stock.shape[0] >= length:
        return stock
    if not isinstance(rotary, YaRNScalingRotaryEmbedding):
        raise RuntimeError(
            f"{name}: rotary table has {stock.shape[0]} positions, fewer than "
            f"max_model_len={length}; mesa_vllm.engine should have extended it."
        )
    inv_freq = rotary._compute_inv_freq(rotary.scaling_factor)
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.einsum("i,j -> ij", t, inv_freq)
    table = torch.cat((freqs.cos() * rotary.mscale, freqs.sin() * rotary.mscale), dim=-1)
    table = table.to(stock.dtype).to(stock.device)
    if not torch.equal(table[: stock.shape[0]], stock):
        raise RuntimeError(
            f"{name}: extending the rotary table to {length} positions changed the "
            "existing positions; refusing to rotate with a table that is not the model's own."
        )
    return table


def vllm_rotary_handover(rotary: nn.Module, max_len: int) -> RotaryTable:
    """The :class:`RotaryTable` the backend gets for a vLLM rotary embedding. Its angles
    come from the float32 table vLLM computes before casting to the model's dtype."""
    return RotaryTable(
        vllm_rotary_table(rotary, max_len), rotary.is_neox_style, type(rotary).__name__,
        angles=angle_per_position(rotary._compute_cos_sin_cache()[:2].float()),
    )


def hf_rotary_table(rotary: nn.Module, length: int) -> tuple[torch.Tensor, int]:
    """``(table, rotary_dim)`` from a Hugging Face rotary module's own cos/sin at ``[0, length)``.

    Hugging Face modules return ``cos, sin`` of width ``rotary_dim`` with both halves equal
    (``cat(freqs, freqs)``, the neox / ``rotate_half`` pairing) and the attention scaling
    already applied; vLLM's table keeps one half of each.
    """
    rope_type = getattr(rotary, "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        raise NotImplementedError(
            f"{type(rotary).__name__} has rope_type={rope_type!r}; mesa supports "
            f"{', '.join(STATIC_ROPE_TYPES)} (a fixed angle per position)."
        )
    inv_freq = rotary.inv_freq
    probe = torch.zeros(1, 1, 1, dtype=torch.float32, device=inv_freq.device)
    positions = torch.arange(length, device=inv_freq.device)[None]
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    cos, sin = cos[0].float(), sin[0].float()
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    if rotary_dim != 2 * inv_freq.numel() or not (
        torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])
    ):
        raise NotImplementedError(
            f"{type(rotary).__name__}: cos/sin are not the neox (rotate_half) layout mesa "
            "expects from a Hugging Face rotary module."
        )
    return torch.cat((cos[:, :half], sin[:, :half]), dim=-1).contiguous(), rotary_dim


# --------------------------------------------------------------------------------------
# Transformers-backend classes
def hf_architecture(mesa_arch: str) -> str:
    """The Hugging Face architecture a registered Mesa class stands for."""
    from mesa_vllm.models import MESA_ARCHITECTURES

    for hf_arch, (name, _) in MESA_ARCHITECTURES.items():
        if name == mesa_arch:
            return hf_arch
    return mesa_arch


class MesaTransformersMixin:
    """For Mesa classes built on vLLM's Transformers modeling backend.

    The backend finds a checkpoint's weight renamings (GPT-NeoX: ``embed_out`` ->
    ``lm_head``) by the config's architecture name, which ``mesa_vllm.engine`` swapped to
    the Mesa class; look them up under the original name.
    """

    def _create_hf_to_vllm_mapper(self):
        config = self.config
        archs = list(config.architectures or [])
        config.architectures = [hf_architecture(a) for a in archs]
        try:
            super()._create_hf_to_vllm_mapper()
        finally:
            config.architectures = archs


# --------------------------------------------------------------------------------------
# Hand-over
def _is_transformers_backend(model: nn.Module) -> bool:
    from vllm.model_executor.models.transformers.base import Base

    return isinstance(model, Base)


def _hand_vllm_rotary(model: nn.Module, max_len: int) -> dict[str, RotaryTable]:
    tables: dict[int, RotaryTable] = {}
    handed: dict[str, RotaryTable] = {}
    for name, module in model.named_modules():
        attn = getattr(module, "attn", None)
        rotary = getattr(module, "rotary_emb", None)
        if not isinstance(attn, Attention) or rotary is None or isinstance(rotary, DeferredRotary):
            continue
        try:
            table = tables.get(id(rotary))
            if table is None:
                table = vllm_rotary_handover(rotary, max_len)
                tables[id(rotary)] = table
        except (NotImplementedError, RuntimeError) as err:
            raise type(err)(f"{name}: {err}") from None
        attn.mesa_rotary = table
        module.rotary_emb = DeferredRotary()
        handed[attn.layer_name] = table
    return handed


def _hand_hf_rotary(model: nn.Module, max_len: int) -> dict[str, RotaryTable]:
    rotaries = [
        (name, module) for name, module in model.named_modules()
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq")
    ]
    if len(rotaries) != 1:
        raise NotImplementedError(
            f"{type(model).__name__}: expected one Hugging Face rotary module, found "
            f"{[n for n, _ in rotaries]}; mesa cannot tell which rotation each layer uses."
        )
    name, rotary = rotaries[0]
    cache, rotary_dim = hf_rotary_table(rotary, max_len)
    table = RotaryTable(cache, True, type(rotary).__name__, angles=angle_per_position(cache[:2]))
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, NoRotation(rotary_dim))
    handed: dict[str, RotaryTable] = {}
    for module in model.modules():
        if isinstance(module, Attention):
            module.mesa_rotary = table
            handed[module.layer_name] = table
    return handed


def hand_rotary_to_backend(model: nn.Module, vllm_config: VllmConfig) -> int:
    """Give every ``Attention`` layer its rotation table; the model stops rotating q and k.

    Strict: every ``Attention`` layer in the model must get a table, their number must be
    the config's ``num_hidden_layers``, and each must run on the MESA backend.
    """
    from mesa_vllm.attention.backend import MesaAttentionImpl

    max_len = vllm_config.model_config.max_model_len
    if _is_transformers_backend(model):
        handed = _hand_hf_rotary(model, max_len)
    else:
        handed = _hand_vllm_rotary(model, max_len)

    layers = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}
    missing = [name for name, m in layers.items() if getattr(m, "mesa_rotary", None) is None]
    if not handed:
        raise RuntimeError(
            f"{type(model).__name__}: found no attention module with a rotary embedding to "
            "hand to the MESA backend."
        )
    if missing:
        raise RuntimeError(
            f"{type(model).__name__}: attention layers {missing} got no rotary table; their "
            "model applies RoPE in a way mesa does not know."
        )
    expected = vllm_config.model_config.hf_text_config.num_hidden_layers
    if vllm_config.parallel_config.pipeline_parallel_size == 1 and len(layers) != expected:
        raise RuntimeError(
            f"{type(model).__name__}: {len(layers)} attention layers for "
            f"num_hidden_layers={expected}; mesa expects one full-attention layer per layer."
        )
    for name, layer in layers.items():
        if not isinstance(layer.impl, MesaAttentionImpl):
            raise RuntimeError(
                f"{name}: attention runs on {type(layer.impl).__name__}, not the MESA backend; "
                "the platform did not select it (is mesa-vllm's vLLM plugin loaded?)."
            )
        if layer.mesa_rotary.cos_sin_cache.shape[0] < max_len:
            raise RuntimeError(
                f"{name}: rotary table has {layer.mesa_rotary.cos_sin_cache.shape[0]} "
                f"positions, fewer than max_model_len={max_len}."
            )
        if layer.mesa_rotary.rotary_dim > layer.head_size:
            raise RuntimeError(f"{name}: rotary_dim exceeds head_size={layer.head_size}.")
    return len(layers)
