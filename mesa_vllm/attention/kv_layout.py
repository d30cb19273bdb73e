"""Mesa's page layout inside vLLM's paged KV cache.

Each cache block holds three planes per KV head, as separate head slots of the page
(vLLM's ``num_head_slots``; the layer view is ``[num_blocks, 3 * H, block_size, D]``):

- ``K_TRUE`` (slots ``[0, H)``): keys rotated at their true position ``j``;
- ``VALUE`` (slots ``[H, 2H)``): values;
- ``K_STAIR`` (slots ``[2H, 3H)``): keys rotated at ``j // E`` (``j / E`` for the linear
  stair). Stair queries of every anchor read this plane as it is: the stair is rotated
  once, at write time.

How a plane lays out its ``block_size x D`` page depends on the kernels that read it
(``LAYOUTS``):

- ``amx`` (bf16 on CPUs with AMX tiles, step stair): every plane in the layout of vLLM's
  AMX kernel, keys as 16-token tiles of channel pairs ``[block/16, D/2, 16, 2]``, values as
  token pairs ``[D/16, block/2, 16, 2]``, so vLLM's own kernel reads both key planes:
  plain rows over ``K_TRUE``, stair decode in one pass over ``K_STAIR``;
- ``vec`` (other CPU cases): ``K_TRUE`` in vLLM's vector-kernel layout (each page
  transposed, ``[D, block]``), ``VALUE`` and ``K_STAIR`` row-major ``[block, D]``, which
  the paged decode kernel reads in place;
- ``row`` (portable: other devices, or ``MESA_KERNELS=portable``): every plane row-major.

Every plane depends only on the token's own KV, never on the prompt length, so blocks
stay shareable across requests whenever their roles match (see ``rule.cache_role_key``).
That costs 1.5x the KV bytes of vLLM's default backend (three head-sized rows per token
instead of two).

Reads never copy whole caches: a key range is gathered block by block (the blocks it
covers, turned token-major), single keys through per-layout index views.
"""

from __future__ import annotations

import torch

K_TRUE = 0
VALUE = 1
K_STAIR = 2
NUM_PLANES = 3

LAYOUT_AMX = "amx"
LAYOUT_VEC = "vec"
LAYOUT_ROW = "row"
LAYOUTS = (LAYOUT_AMX, LAYOUT_VEC, LAYOUT_ROW)

# Page shapes, as (view of one plane's pages, token-major permutation, element index).
# ``b``/``o``: block ids and in-block offsets of n tokens; each element index yields the
# tokens' ``[n, H, ...]`` slice, ``D`` channels in order once flattened.
_ROW = "row"  # [bs, D]
_TRANSPOSED = "transposed"  # [D, bs]       vLLM vec key pages
_AMX_KEY = "amx_key"  # [bs/16, D/2, 16, 2]  vLLM AMX key pages
_AMX_VALUE = "amx_value"  # [D/16, bs/2, 16, 2]  vLLM AMX value pages


# Per page kind: the permutation of its page view that puts tokens first, then heads,
# then channels, so the result flattens to token-major rows ``[tokens, H, D]``.
_TOKEN_MAJOR = {
    _ROW: (0, 2, 1, 3),
    _TRANSPOSED: (0, 3, 1, 2),
    _AMX_KEY: (0, 2, 4, 1, 3, 5),
    _AMX_VALUE: (0, 3, 5, 1, 2, 4),
}


def _page_kind(layout: str, plane: int) -> str:
    if layout == LAYOUT_AMX:
        return _AMX_VALUE if plane == VALUE else _AMX_KEY
    if layout == LAYOUT_VEC and plane == K_TRUE:
        return _TRANSPOSED
    return _ROW


class MesaKVPlanes:
    """Views of one layer's cache tensor ``[num_blocks, 3H, block_size, D]``."""

    def __init__(self, kv_cache: torch.Tensor, num_kv_heads: int, layout: str = LAYOUT_VEC):
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
        if layout not in LAYOUTS:
            raise ValueError(f"unknown mesa KV layout {layout!r}; expected one of {LAYOUTS}")
        if layout == LAYOUT_AMX and (block_size % 16 or head_size % 16):
            raise ValueError(
                f"the AMX layout needs block size and head size divisible by 16; got "
                f"{block_size} and {head_size}"
            )
        self.cache = kv_cache
        self.layout = layout
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
        self._plane_pages = {K_TRUE: self.key_true_pages, VALUE: self.value_pages,
                             K_STAIR: self.key_stair_pages}
        self._shaped: dict[int, torch.Tensor] = {}
        self._value_rows: torch.Tensor | None = None
        self._key_stair_rows: torch.Tensor | None = None

    # ------------------------------------------------------------------------------
    # Per-plane page views in the plane's own layout.
    def _kind(self, plane: int) -> str:
        return _page_kind(self.layout, plane)

    def _pages(self, plane: int) -> torch.Tensor:
        shaped = self._shaped.get(plane)
        if shaped is None:
            n, h, bs, d = self.num_blocks, self.num_kv_heads, self.block_size, self.head_size
            shape = {
                _ROW: (n, h, bs, d),
                _TRANSPOSED: (n, h, d, bs),
                _AMX_KEY: (n, h, bs // 16, d // 2, 16, 2),
                _AMX_VALUE: (n, h, d // 16, bs // 2, 16, 2),
            }[self._kind(plane)]
            shaped = self._shaped[plane] = self.plane_pages(plane).view(shape)
        return shaped

    def _element_index(self, plane: int, block_ids: torch.Tensor, offsets: torch.Tensor) -> tuple:
        b, o, all_ = block_ids.long(), offsets.long(), slice(None)
        return {
            _ROW: (b, all_, o),  # -> [n, H, D]
            _TRANSPOSED: (b, all_, all_, o),  # -> [n, H, D]
            _AMX_KEY: (b, all_, o // 16, all_, o % 16),  # -> [n, H, D/2, 2]
            _AMX_VALUE: (b, all_, all_, o // 2, all_, o % 2),  # -> [n, H, D/16, 16]
        }[self._kind(plane)]

    def gather(self, plane: int, block_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows ``[n, H, D]`` of ``plane`` for tokens at (block, offset)."""
        got = self._pages(plane)[self._element_index(plane, block_ids, offsets)]
        return got.reshape(-1, self.num_kv_heads, self.head_size)

    def plane_pages(self, plane: int) -> torch.Tensor:
        """The plane's pages as stored, ``[num_blocks, H, block_size, D]`` (any layout)."""
        return self._plane_pages[plane]

    def tokens_of(self, plane: int, pages: torch.Tensor) -> torch.Tensor:
        """Copies of ``plane``'s pages (``plane_pages(plane)[blocks]``) as token-major
        rows ``[n * block_size, H, D]``, contiguous."""
        n, h, bs, d = pages.shape
        kind = self._kind(plane)
        if kind == _AMX_KEY and pages.element_size() == 2:
            # A channel pair is 4 adjacent bytes: moved as one int32, the transpose is a
            # plain [D/2, 16] -> [16, D/2] per tile, twice as fast as pair by pair.
            packed = pages.view(torch.int32).view(n, h, bs // 16, d // 2, 16)
            tokens = packed.permute(0, 2, 4, 1, 3).contiguous().view(pages.dtype)
            return tokens.view(n * bs, h, d)
        perm = _TOKEN_MAJOR[kind]
        # contiguous: a one-block range would otherwise stay a strided view, and the CPU
        # flash kernel's half-precision path needs unit channel stride.
        return pages.reshape(n, *self._pages(plane).shape[1:]).permute(perm).contiguous().view(n * bs, h, d)

    def pages_of(self, plane: int, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`tokens_of`: rows ``[n * block_size, H, D]`` laid out as
        ``n`` pages of ``plane``, ``[n, H, block_size, D]``."""
        h, bs, d = self.num_kv_heads, self.block_size, self.head_size
        n = tokens.shape[0] // bs
        kind = self._kind(plane)
        if kind == _AMX_KEY and tokens.element_size() == 2:
            packed = tokens.contiguous().view(torch.int32).view(n, bs // 16, 16, h, d // 2)
            return packed.permute(0, 3, 1, 4, 2).contiguous().view(tokens.dtype).view(n, h, bs, d)
        perm = _TOKEN_MAJOR[kind]
        token_major_shape = [self._pages(plane).shape[1:][i - 1] for i in perm[1:]]
        inverse = [perm.index(i) for i in range(len(perm))]
        pages = tokens.reshape(n, *token_major_shape).permute(inverse).contiguous()
        return pages.view(n, h, bs, d)

    def turn_pages(self, plane: int, blocks: torch.Tensor, rotate_in_place) -> torch.Tensor:
        """Rewrite the keys of ``blocks`` with ``rotate_in_place(rows)`` (given them as
        contiguous token-major rows ``[n * block_size, H, D]``); returns the pages as they
        were, for :meth:`put_back`."""
        pages = self.plane_pages(plane)
        saved = pages.index_select(0, blocks)
        rows = self.tokens_of(plane, saved)
        rotate_in_place(rows)
        pages.index_copy_(0, blocks, self.pages_of(plane, rows))
        return saved

    def put_back(self, plane: int, blocks: torch.Tensor, saved: torch.Tensor) -> None:
        self.plane_pages(plane).index_copy_(0, blocks, saved)

    def gather_range(self, plane: int, blocks: torch.Tensor, lead: int, size: int) -> torch.Tensor:
        """Rows ``[size, H, D]`` of ``size`` consecutive tokens starting at offset ``lead``
        of ``blocks`` (the blocks they cover, in order): whole pages copied token-major,
        which reads every layout at memory speed."""
        pages = self.plane_pages(plane).index_select(0, blocks.long())
        return self.tokens_of(plane, pages)[lead : lead + size]

    def scatter(self, plane: int, block_ids: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> None:
        """Store ``rows [n, H, D]`` into ``plane`` at (block, offset)."""
        h, d = self.num_kv_heads, self.head_size
        tail = {_AMX_KEY: (d // 2, 2), _AMX_VALUE: (d // 16, 16)}.get(self._kind(plane), (d,))
        rows = rows.to(self.cache.dtype).reshape(-1, h, *tail)
        self._pages(plane)[self._element_index(plane, block_ids, offsets)] = rows

    # ------------------------------------------------------------------------------
    # Token-linear views for the paged decode kernel (``vec`` layout): row
    # ``tau = block * tokens_per_page + offset`` is that token's ``[H, D]`` slice.
    def _row_view(self, plane: int) -> torch.Tensor:
        if self._kind(plane) != _ROW:
            raise RuntimeError(f"plane {plane} is not row-major in the {self.layout!r} layout")
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

    def row_index(self, block_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return block_ids.long() * self.tokens_per_page + offsets

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
        ``rows``: the slots' token-linear rows, if the caller computed them once per step
        (row-major stair plane only)."""
        slots = slot_mapping.long()
        block_ids, offsets = slots // self.block_size, slots % self.block_size
        if self.layout == LAYOUT_ROW:
            self.scatter(K_TRUE, block_ids, offsets, key_true)
            self.scatter(VALUE, block_ids, offsets, value)
        else:
            from vllm import _custom_ops as ops

            ops.cpu_attn_reshape_and_cache(
                key_true, value, self.key_true_pages, self.value_pages, slot_mapping, isa
            )
        if self._kind(K_STAIR) == _ROW:
            if rows is None:
                rows = self.row_index(block_ids, offsets)
            self.key_stair_rows()[rows] = key_stair.to(self.cache.dtype)
        else:
            self.scatter(K_STAIR, block_ids, offsets, key_stair)


def check_kv_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str, layout: str) -> None:
    """Fail loudly if vLLM's CPU kernels no longer store pages the way mesa reads them.

    Mesa reads keys and values that vLLM's ``cpu_attn_reshape_and_cache`` wrote, and
    writes stair keys its kernel reads; a layout change in a future vLLM must stop the
    engine, not silently scramble attention.
    """
    from vllm import _custom_ops as ops

    heads = 2
    cache = torch.zeros(2, NUM_PLANES * heads, block_size, head_size, dtype=dtype)
    planes = MesaKVPlanes(cache, heads, layout=layout)
    n = block_size + 3
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(n, heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, heads, head_size, generator=gen).to(dtype)
    slots = torch.arange(n, dtype=torch.int64) + (block_size - 3)
    ops.cpu_attn_reshape_and_cache(
        key, value, planes.key_true_pages, planes.value_pages, slots, isa
    )
    blocks, offsets = slots // block_size, slots % block_size
    ok = torch.equal(planes.gather(K_TRUE, blocks, offsets), key) and torch.equal(
        planes.gather(VALUE, blocks, offsets), value
    )
    if ok and layout == LAYOUT_AMX:
        # Stair keys go in with mesa's own index views: they must land where vLLM's
        # writer puts keys, since vLLM's kernel reads the stair plane too.
        planes.scatter(K_STAIR, blocks, offsets, key)
        ok = torch.equal(planes.key_stair_pages, planes.key_true_pages)
    if not ok:
        raise RuntimeError(
            f"vLLM's CPU KV layout for isa={isa!r}, dtype={dtype}, block_size={block_size}, "
            f"head_size={head_size} is not the one mesa-vllm's {layout!r} layout reads. "
            "This vLLM build is not supported by this mesa-vllm; MESA_KERNELS=portable "
            "runs without vLLM's CPU kernels."
        )
