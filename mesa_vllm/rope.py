"""Rotary position embedding math shared by the oracle and the backend.

Conventions (the same as vLLM's and Hugging Face's):

- Only the first ``rotary_dim`` channels of a head rotate; the rest pass through.
- ``neox`` style pairs channel ``i`` with ``i + rotary_dim/2``; ``gptj`` style pairs
  ``2i`` with ``2i + 1``.
- A vector at position ``m`` is rotated by angle ``m * inv_freq[i]`` per pair, and both
  cos and sin may carry a constant ``scale`` (YaRN's attention factor).

Under RoPE the score of query ``q`` (position ``m``) and key ``k`` (position ``n``) is
``q . Rot(n - m) . k`` on unrotated vectors: it depends on ``r = m - n`` only. The oracle
evaluates that formula per pair (:func:`relative_scores`); the backend instead rotates
queries and keys once each at absolute positions (:func:`rotate`), which is the same
thing because rotations compose.
"""

from __future__ import annotations

import torch
from torch import nn


class NoRotation(nn.Module):
    """Stands in for a Hugging Face rotary module: ``cos = 1, sin = 0`` leaves q and k as is
    (``q * 1 + rotate_half(q) * 0`` is ``q`` exactly). The oracle and the GPT-NeoX Mesa model
    use it to get unrotated q and k out of a Hugging Face attention module."""

    def __init__(self, rotary_dim: int):
        super().__init__()
        self.rotary_dim = rotary_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        shape = (*position_ids.shape, self.rotary_dim)
        cos = torch.ones(shape, dtype=x.dtype, device=x.device)
        sin = torch.zeros(shape, dtype=x.dtype, device=x.device)
        return cos, sin


def pair_indices(rotary_dim: int, is_neox: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel indices ``(first, second)`` of each rotation pair."""
    half = rotary_dim // 2
    if is_neox:
        first = torch.arange(half, device=device)
        second = first + half
    else:
        first = torch.arange(0, rotary_dim, 2, device=device)
        second = first + 1
    return first, second


def rotate(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    is_neox: bool = True,
    scale: float = 1.0,
) -> torch.Tensor:
    """Rotate ``x[..., tokens, heads?, head_size]``-shaped vectors at ``positions``.

    ``x`` has shape ``[num_tokens, ..., head_size]`` and ``positions`` ``[num_tokens]``.
    Angles are computed in float64 and the result is returned in ``x``'s dtype.
    """
    rotary_dim = 2 * inv_freq.numel()
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    cos = (torch.cos(angles) * scale).to(torch.float32)
    sin = (torch.sin(angles) * scale).to(torch.float32)
    extra_dims = x.dim() - 2
    cos = cos.view(cos.shape[0], *([1] * extra_dims), -1)
    sin = sin.view(sin.shape[0], *([1] * extra_dims), -1)
    first, second = pair_indices(rotary_dim, is_neox, device=x.device)
    xf = x.to(torch.float32)
    a = xf[..., first]
    b = xf[..., second]
    out = xf.clone()
    out[..., first] = a * cos - b * sin
    out[..., second] = a * sin + b * cos
    return out.to(x.dtype)


def relative_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    rel: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    is_neox: bool = True,
    scale: float = 1.0,
) -> torch.Tensor:
    """Dense per-pair RoPE scores ``q_p . Rot(-r[p, j]) . k_j`` (unscaled by 1/sqrt(d)).

    ``q``: ``[Lq, d]`` and ``k``: ``[Lk, d]`` unrotated; ``rel``: ``[Lq, Lk]`` integer
    relative positions. Computed in float64 for the rotary part: the oracle's job is to be
    right, not fast. ``scale`` multiplies cos and sin as in YaRN, so it enters squared.
    """
    rotary_dim = 2 * inv_freq.numel()
    first, second = pair_indices(rotary_dim, is_neox, device=q.device)
    qd, kd = q.to(torch.float64), k.to(torch.float64)
    qa, qb = qd[:, first], qd[:, second]
    ka, kb = kd[:, first], kd[:, second]
    # For one pair: q . R(-r) k = (qa ka + qb kb) cos(r w) + (qa kb - qb ka) sin(r w).
    dot_same = qa[:, None, :] * ka[None, :, :] + qb[:, None, :] * kb[None, :, :]
    dot_cross = qa[:, None, :] * kb[None, :, :] - qb[:, None, :] * ka[None, :, :]
    angles = rel.to(torch.float64)[:, :, None] * inv_freq.to(torch.float64)[None, None, :]
    rotary_part = (dot_same * torch.cos(angles) + dot_cross * torch.sin(angles)).sum(-1)
    rotary_part = rotary_part * (scale * scale)
    passthrough = qd[:, rotary_dim:] @ kd[:, rotary_dim:].T
    return rotary_part + passthrough


def angle_per_position(cos_sin_rows: torch.Tensor) -> torch.Tensor:
    """Rotation angle per position of each frequency, ``[rotary_dim / 2]`` float64.

    From row 1 of a float32 (or wider) cos/sin table in vLLM's layout (cos half, then sin
    half, both possibly times a constant magnitude, which ``atan2`` ignores). Every
    supported RoPE variant turns by a fixed angle below pi per position, so row 1 holds it.
    """
    if cos_sin_rows.dtype not in (torch.float32, torch.float64) or cos_sin_rows.shape[0] < 2:
        raise ValueError("angle_per_position needs rows 0 and 1 of a float32/float64 table")
    half = cos_sin_rows.shape[-1] // 2
    row = cos_sin_rows[1].to(torch.float64)
    return torch.atan2(row[half:], row[:half])


def fractional_step_table(
    cos_sin_table: torch.Tensor, angles: torch.Tensor, step: int, dtype: torch.dtype
) -> torch.Tensor:
    """Row ``j`` rotates at position ``j / step``: the linear stair's key rotation.

    Composed from the model's own row at ``j // step`` and a turn by the fraction
    ``(j % step) / step`` of one position (``Rot(x) Rot(y) = Rot(x + y)``), so at whole
    positions (``j % step == 0``) it is the model's table exactly, and the fractional turn
    (under one position) is accurate to float64. Same length and layout as the input.
    """
    n, width = cos_sin_table.shape
    half = width // 2
    j = torch.arange(n, device=cos_sin_table.device)
    whole = cos_sin_table[torch.div(j, step, rounding_mode="floor")].to(torch.float64)
    fraction = (j % step).to(torch.float64) / step
    turn = fraction[:, None] * angles.to(device=cos_sin_table.device, dtype=torch.float64)[None, :]
    cos_t, sin_t = torch.cos(turn), torch.sin(turn)
    cos_w, sin_w = whole[:, :half], whole[:, half:]
    table = torch.cat((cos_w * cos_t - sin_w * sin_t, sin_w * cos_t + cos_w * sin_t), dim=-1)
    exact = fraction == 0  # whole positions: the model's own row, bit for bit
    table[exact] = whole[exact]
    return table.to(dtype)
