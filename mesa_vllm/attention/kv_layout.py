"""Mesa's page layout inside vLLM's paged KV cache.

Each cache block holds three planes per KV head, as separate head slots of the page
(vLLM's ``num_head_slots``; the layer view is ``[num_blocks, 3 * H, block_size, D]``):

- ``K_TRUE`` (slots ``[0, H)``): keys rotated at their true position ``j``. With vLLM's
  CPU kernels they are written in that kernel's layout (each page transposed,
  ``[D, block_size]``), so it serves plain causal attention unchanged; in portable mode
  (other devices, or ``MESA_KERNELS=portable``) they are row-major like the other planes.
- ``VALUE`` (slots ``[H, 2H)``): values, row-major ``[block_size, D]``.
- ``K_STAIR`` (slots ``[2H, 3H)``): keys rotated at ``j // E`` (``j / E`` for the linear
  stair), row-major. Stair queries
  of every anchor read this plane as it is: the stair is rotated once, at write time.

Every plane depends only on the token's own KV, never on the prompt length, so blocks
stay shareable across requests whenever their roles match (see ``rule.cache_role_key``).
That costs 1.5x the KV bytes of vLLM's default backend (three head-sized rows per token
instead of two).

Reads never copy whole blocks: keys and values are gathered row by row through
strided "token-linear" views, indexed by ``block * tokens_per_page + offset``.
"""

from __future__ import annotations

import torch

K_TRUE = 0
VALUE = 1
K_STAIR = 2
NUM_PLANES = 3


class MesaKVPlanes:
    """Views of one layer's cache tensor ``[num_blocks, 3H, block_size, D]``."""

    def __init__(self, kv_cache: torch.Tensor, num_kv_heads: int, cpu_kernel_layout: bool = True):
        num_blocks, slots, block_size, head_size = kv_cache.shape
        if slots != NUM_PLANES * num_kv_heads:
            raise RuntimeError(
                f"mesa KV cache has {slots} head slots per block; expected "
                f"{NUM_PLANES} x {num_kv_heads} (K_true, V, K_stair per KV head)."
            )
        page = slots * block_size * head_size
        if kv_cache.stride() != (page, block_size * head_size, head_size, 1):
            raise RuntimeError(
                "mesa needs each KV block stored as one dense page; got strides "
                f"{kv_cache.stride()} for shape {tuple(kv_cache.shape)}."
            )
        self.cache = kv_cache
        self.cpu_kernel_layout = cpu_kernel_layout
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.head_size = head_size
        self.tokens_per_page = slots * block_size
        h = num_kv_heads
        # Page-shaped views, as vLLM's CPU kernels take them.
        self.key_true_pages = kv_cache[:, 0:h]
        self.value_pages = kv_cache[:, h : 2 * h]
        self.key_stair_pages = kv_cache[:, 2 * h : 3 * h]
        self._value_rows: torch.Tensor | None = None
        self._key_stair_rows: torch.Tensor | None = None

    # ------------------------------------------------------------------------------
    # Token-linear views: row ``tau = block * tokens_per_page + offset`` is that token's
    # ``[H, D]`` slice of a plane.
    def _row_view(self, plane: int) -> torch.Tensor:
        bs, d, h = self.block_size, self.head_size, self.num_kv_heads
        rows = (self.num_blocks - 1) * self.tokens_per_page + bs
        return torch.as_strided(
            self.cache,
            size=(rows, h, d),
            stride=(d, bs * d, 1),
            storage_offset=self.cache.storage_offset() + plane * h * bs * d,
        )

    def value_rows(self) -> torch.Tensor:
        if self._value_rows is None:
            self._value_rows = self._row_view(VALUE)
        return self._value_rows

    def key_stair_rows(self) -> torch.Tensor:
        if self._key_stair_rows is None:
            self._key_stair_rows = self._row_view(K_STAIR)
        return self._key_stair_rows

    def key_true_rows(self) -> torch.Tensor:
        """K_true in vLLM's CPU layout is transposed per page: token stride 1, channel
        stride ``bs``; indexed with :meth:`transposed_index` (element units), not ``tau``.
        """
        if not self.cpu_kernel_layout:
            return self._row_view(K_TRUE)
        bs, d, h = self.block_size, self.head_size, self.num_kv_heads
        rows = (self.num_blocks - 1) * self.tokens_per_page * d + bs
        return torch.as_strided(
            self.cache,
            size=(rows, h, d),
            stride=(1, bs * d, bs),
            storage_offset=self.cache.storage_offset(),
        )

    def row_index(self, block_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return block_ids.long() * self.tokens_per_page + offsets

    def transposed_index(self, block_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return block_ids.long() * (self.tokens_per_page * self.head_size) + offsets

    # ------------------------------------------------------------------------------
    def write(
        self,
        key_true: torch.Tensor,
        key_stair: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
        isa: str | None,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Store new tokens' keys (both rotations) and values at ``slot_mapping``;
        ``rows``: the slots' token-linear rows, if the caller computed them once per step."""
        if rows is None:
            slots = slot_mapping.long()
            rows = self.row_index(slots // self.block_size, slots % self.block_size)
        if self.cpu_kernel_layout:
            from vllm import _custom_ops as ops

            ops.cpu_attn_reshape_and_cache(
                key_true, value, self.key_true_pages, self.value_pages, slot_mapping, isa
            )
        else:
            self._row_view(K_TRUE)[rows] = key_true.to(self.cache.dtype)
            self.value_rows()[rows] = value.to(self.cache.dtype)
        self.key_stair_rows()[rows] = key_stair.to(self.cache.dtype)

    def gather(self, plane: int, block_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows ``[n, H, D]`` of ``plane`` for tokens at (block, offset)."""
        if plane == K_TRUE and self.cpu_kernel_layout:
            return self.key_true_rows()[self.transposed_index(block_ids, offsets)]
        if plane == K_TRUE:
            return self.key_true_rows()[self.row_index(block_ids, offsets)]
        view = self.value_rows() if plane == VALUE else self.key_stair_rows()
        return view[self.row_index(block_ids, offsets)]


def check_key_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> None:
    """Fail loudly if vLLM's CPU kernel no longer stores key pages as ``[D, block_size]``.

    Mesa reads keys that vLLM's ``cpu_attn_reshape_and_cache`` wrote; a layout change in
    a future vLLM must stop the engine, not silently scramble attention.
    """
    from vllm import _custom_ops as ops

    heads = 2
    cache = torch.zeros(2, NUM_PLANES * heads, block_size, head_size, dtype=dtype)
    planes = MesaKVPlanes(cache, heads)
    n = block_size + 3
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(n, heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, heads, head_size, generator=gen).to(dtype)
    slots = torch.arange(n, dtype=torch.int64) + (block_size - 3)
    ops.cpu_attn_reshape_and_cache(
        key, value, planes.key_true_pages, planes.value_pages, slots, isa
    )
    blocks, offsets = slots // block_size, slots % block_size
    if not (
        torch.equal(planes.gather(K_TRUE, blocks, offsets), key)
        and torch.equal(planes.gather(VALUE, blocks, offsets), value)
    ):
        raise RuntimeError(
            f"vLLM's CPU KV layout for isa={isa!r}, dtype={dtype}, block_size={block_size}, "
            f"head_size={head_size} is not the one mesa-vllm reads (key pages [D, block], "
            "value pages [block, D]). This vLLM build is not supported by this mesa-vllm."
        )
