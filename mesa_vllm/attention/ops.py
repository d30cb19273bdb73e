"""Compute primitives of the Mesa backend: partial attention with log-sum-exp, the merge,
query rotation, and the paged stair pass for decode.

A Mesa query attends several key ranges, each with its own query rotation. Each range is
one ordinary attention ("partial") that also returns its log-sum-exp; the partials merge
exactly by their LSE weights. No ``[L, L]`` score matrix or mask is ever built.
"""

from __future__ import annotations

import torch

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class Partial:
    """Output ``[n, Hq, D]`` (any float dtype) and log-sum-exp ``[n, Hq]`` (float32)."""

    __slots__ = ("out", "lse")

    def __init__(self, out: torch.Tensor, lse: torch.Tensor):
        self.out = out
        self.lse = lse


def _flash_with_lse(q, k, v, scale: float, causal: bool):
    """q ``[B, Hq, Lq, D]``, k/v ``[B, Hq, Lk, D]`` -> (out, lse ``[B, Hq, Lq]``)."""
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        out, lse = _CPU_FLASH(q, k, v, 0.0, causal, scale=scale)[:2]
        return out, lse
    # Portable path (any device): explicit scores, chunked by the caller's sizes.
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        lq, lk = scores.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    return out, lse


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> Partial:
    """Attention of ``q [Lq, Hq, D]`` over ``k, v [Lk, Hkv, D]`` (grouped-query aware).

    ``causal`` means the queries are the same tokens as the keys (square, ``Lq == Lk``).
    Without it, the groups of query heads that share a KV head are folded into the query
    length, so no key or value is copied per group.
    """
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    if causal:
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out, lse = _flash_with_lse(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale, True
        )
        return Partial(out[0].transpose(0, 1), lse[0].transpose(0, 1))
    qf = q.view(lq, hkv, group, d).permute(1, 2, 0, 3).reshape(1, hkv, group * lq, d)
    out, lse = _flash_with_lse(qf, k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale, False)
    out = out[0].view(hkv, group, lq, d).permute(2, 0, 1, 3).reshape(lq, hq, d)
    lse = lse[0].view(hkv, group, lq).permute(2, 0, 1).reshape(lq, hq)
    return Partial(out, lse)


def attend_causal_tail(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_causal: int
) -> list[Partial]:
    """Queries are the last ``num_causal`` keys (bottom-right causal); 0 means all visible.

    Split into the fully visible prefix and the causal square, so the CPU flash kernel's
    top-left causal alignment is never wrong and no mask is built.
    """
    if num_causal == 0 or (num_causal == 1 and q.shape[0] == 1):
        return [attend(q, k, v, scale, causal=False)]
    prefix = k.shape[0] - num_causal
    parts = [attend(q, k[prefix:], v[prefix:], scale, causal=True)]
    if prefix > 0:
        parts.append(attend(q, k[:prefix], v[:prefix], scale, causal=False))
    return parts


def merge(parts: list[Partial], out_dtype: torch.dtype) -> torch.Tensor:
    """Exact softmax over the union of the partials' keys, from their outputs and LSEs."""
    if len(parts) == 1:
        return parts[0].out.to(out_dtype)
    if len(parts) == 2:
        # Weight of the first part: Z1 / (Z1 + Z2) = sigmoid(lse1 - lse2).
        first, second = parts
        w = torch.sigmoid(first.lse - second.lse).unsqueeze(-1)
        merged = second.out.float()
        merged += w * (first.out.float() - merged)
        return merged.to(out_dtype)
    lse = torch.stack([p.lse for p in parts])  # [P, n, H]
    top = lse.amax(dim=0)
    weights = torch.exp(lse - top)  # [P, n, H]
    total = weights.sum(dim=0)
    acc = torch.zeros_like(parts[0].out, dtype=torch.float32)
    for w, p in zip(weights, parts):
        acc += p.out.float() * w.unsqueeze(-1)
    return (acc / total.unsqueeze(-1)).to(out_dtype)


def rotate_queries(
    query: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_size: int,
    is_neox: bool,
) -> torch.Tensor:
    """A rotated copy of ``query [n, Hq, D]`` at ``positions`` (the model's own table)."""
    rotated = query.clone(memory_format=torch.contiguous_format)
    rotate_in_place(rotated, positions, cos_sin_cache, head_size, is_neox)
    return rotated


def rotate_in_place(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_size: int,
    is_neox: bool,
) -> None:
    """Rotate contiguous ``x [n, heads, D]`` in place."""
    if x.shape[0] == 0:
        return
    if x.device.type == "cpu":
        from vllm import _custom_ops as ops

        # The op reads [tokens, heads * D]; given [tokens, heads, D] it would take every
        # head for a token of its own and rotate it at the wrong position.
        ops.rotary_embedding(positions, x.view(x.shape[0], -1), None, head_size, cos_sin_cache, is_neox)
        return
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    rotary_dim = cos_sin_cache.shape[-1]
    rotated, _ = RotaryEmbedding.forward_static(
        positions, x, None, head_size, rotary_dim, cos_sin_cache, is_neox
    )
    x.copy_(rotated)


def paged_decode_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """vLLM's CPU build ships SGLang's paged decode kernel (bf16/fp16 only)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's _C op library)

        return hasattr(torch.ops._C, "decode_attention_cpu")
    except (AttributeError, ImportError, RuntimeError):
        return False


def paged_decode(
    query: torch.Tensor,
    key_rows: torch.Tensor,
    value_rows: torch.Tensor,
    row_index: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    num_splits: int = 8,
) -> Partial:
    """One query per sequence over paged keys, read in place (no gather).

    ``row_index [B, max_len]`` holds token-linear rows of ``key_rows``/``value_rows``;
    sequence ``b`` uses its first ``lengths[b]`` entries. The kernel splits each sequence
    into ``num_splits`` parts and leaves each part's log-sum-exp in ``attn_logits[..., D]``
    (empty parts hold ``-inf``), so the total LSE is their log-sum-exp.
    """
    batch, heads, d = query.shape
    out = torch.empty_like(query)
    attn_logits = torch.empty(batch, heads, num_splits, d + 1, dtype=torch.float32)
    torch.ops._C.decode_attention_cpu(
        query, key_rows, value_rows, out, None, None, None, attn_logits, row_index,
        torch.arange(batch, dtype=torch.int64), lengths, scale, 0.0, False, -1, None, None,
    )
    return Partial(out, torch.logsumexp(attn_logits[..., d], dim=-1))
