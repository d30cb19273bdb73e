"""The backend's compute primitives against plain dense references (no engine)."""

from __future__ import annotations

import math

import pytest
import torch

from mesa_vllm import rope
from mesa_vllm.attention import ops
from mesa_vllm.attention.kv_layout import (
    K_STAIR, K_TRUE, LAYOUT_AMX, LAYOUT_ROW, LAYOUT_VEC, VALUE, MesaKVPlanes, check_kv_layout)

pytestmark = [pytest.mark.cpu]


def dense_attention(q, k, v, scale, causal_offset=None):
    """Reference: explicit scores, optional bottom-right causal mask."""
    group = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(group, 1)
    vv = v.float().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kk) * scale
    if causal_offset is not None:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv), torch.logsumexp(scores, -1).T


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("group", [1, 3])
def test_attend_and_merge_equal_one_softmax(group):
    q = torch.randn(7, 2 * group, 32)
    k, v = torch.randn(50, 2, 32), torch.randn(50, 2, 32)
    want, want_lse = dense_attention(q, k, v, 0.2)
    parts = [ops.attend(q, k[:13], v[:13], 0.2, causal=False), ops.attend(q, k[13:], v[13:], 0.2, causal=False)]
    assert torch.allclose(ops.merge(parts, torch.float32), want, atol=1e-5)
    whole = ops.attend(q, k, v, 0.2, causal=False)
    assert torch.allclose(whole.lse, want_lse, atol=1e-5)


def test_causal_tail_is_bottom_right_causal():
    q = torch.randn(9, 4, 32)
    k, v = torch.randn(30, 2, 32), torch.randn(30, 2, 32)
    want, _ = dense_attention(q, k, v, 0.3, causal_offset=True)
    got = ops.merge(ops.attend_causal_tail(q, k, v, 0.3, num_causal=9), torch.float32)
    assert torch.allclose(got, want, atol=1e-5)


def test_rotation_matches_rope_math():
    head, dim = 3, 32
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    t = torch.arange(512).float()
    freqs = torch.outer(t, inv_freq)
    table = torch.cat([freqs.cos(), freqs.sin()], -1)
    x = torch.randn(6, head, dim)
    positions = torch.tensor([0, 1, 5, 63, 200, 511])
    want = rope.rotate(x, positions, inv_freq, is_neox=True)
    assert torch.allclose(ops.rotate_queries(x, positions, table, dim, True), want, atol=1e-5)


LAYOUT_CASES = [  # (layout, vLLM isa writing K_true and V, dtype)
    (LAYOUT_VEC, "vec", torch.float32),
    (LAYOUT_VEC, "vec", torch.bfloat16),
    (LAYOUT_AMX, "amx", torch.bfloat16),
    (LAYOUT_ROW, None, torch.float32),
]


def _needs_amx(layout):
    if layout == LAYOUT_AMX and not torch.cpu._is_amx_tile_supported():
        pytest.skip("the amx layout is only chosen on CPUs with AMX tiles; this one has none")


@pytest.mark.parametrize("layout,isa,dtype", LAYOUT_CASES)
@pytest.mark.parametrize("block_size", [32, 128])
def test_kv_planes_round_trip(layout, isa, dtype, block_size):
    """Every layout reads back what was written: vLLM's writer for K_true and V (the
    layout its kernel reads), mesa's for the stair plane, single keys and whole ranges."""
    _needs_amx(layout)
    if isa is not None:
        check_kv_layout(dtype, block_size, 64, isa, layout)
    num_blocks = 6
    cache = torch.zeros(num_blocks, 3 * 3, block_size, 64, dtype=dtype)
    planes = MesaKVPlanes(cache, 3, layout=layout)
    n = num_blocks * block_size
    key_true, key_stair, value = (torch.randn(n, 3, 64).to(dtype) for _ in range(3))
    block_order = torch.randperm(num_blocks)
    slots = (block_order[:, None] * block_size + torch.arange(block_size)).flatten()
    planes.write(key_true, key_stair, value, slots, isa)
    blocks, offsets = slots // block_size, slots % block_size
    pick = torch.randperm(n)[: block_size + 17]
    for plane, want in ((K_TRUE, key_true), (K_STAIR, key_stair), (VALUE, value)):
        assert torch.equal(planes.gather(plane, blocks[pick], offsets[pick]), want[pick])
        start, size = block_size // 2 + 3, 2 * block_size + 5  # spans four blocks
        first, last = start // block_size, (start + size - 1) // block_size
        got = planes.gather_range(plane, block_order[first : last + 1], start % block_size, size)
        assert torch.equal(got, want[start : start + size])
    # scatter overwrites exactly the rows it names
    fresh = torch.randn(pick.numel(), 3, 64).to(dtype)
    planes.scatter(K_STAIR, blocks[pick], offsets[pick], fresh)
    expect = key_stair.clone()
    expect[pick] = fresh
    assert torch.equal(planes.gather(K_STAIR, blocks, offsets), expect)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_amx_key_pages_turn_like_token_rotation(is_neox, rotary_dim):
    """The one-pass decode's turn: whole AMX key pages out, rotated as token rows, back in,
    and put back after, leaves every key as the token rotation says (shift 0: untouched)."""
    heads, block, dim, blocks = 3, 32, 64, 4
    planes = MesaKVPlanes(torch.zeros(blocks, 3 * heads, block, dim, dtype=torch.bfloat16), heads,
                          layout=LAYOUT_AMX)
    keys = torch.randn(blocks * block, heads, dim).to(torch.bfloat16)
    order = torch.tensor([2, 0, 3, 1])
    slots = (order[:, None] * block + torch.arange(block)).flatten()
    planes.scatter(K_STAIR, slots // block, slots % block, keys)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = torch.outer(torch.arange(4096).float(), inv_freq)
    table = torch.cat([angles.cos(), angles.sin()], -1).to(torch.bfloat16)
    shifts = torch.randint(0, 4096, (blocks * block,))
    shifts[::5] = 0
    saved = planes.turn_pages(
        K_STAIR, order, lambda rows: ops.rotate_in_place(rows, shifts, table, dim, is_neox))
    want = ops.rotate_queries(keys, shifts, table, dim, is_neox)
    got = planes.gather(K_STAIR, slots // block, slots % block)
    assert torch.equal(got, want)
    assert torch.equal(got[::5], keys[::5])
    planes.put_back(K_STAIR, order, saved)
    assert torch.equal(planes.gather(K_STAIR, slots // block, slots % block), keys)


def test_kv_layout_check_rejects_a_layout_vllm_does_not_write():
    """The start-up check fails loudly, naming the way out, when the page layout mesa
    reads is not the one vLLM's writer produced."""
    with pytest.raises(RuntimeError, match="MESA_KERNELS=portable"):
        check_kv_layout(torch.float32, 32, 64, "vec", LAYOUT_ROW)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_decode_reads_stair_plane_in_place(dtype):
    if not ops.paged_decode_supported(dtype, torch.device("cpu")):
        pytest.fail("vLLM's CPU build should ship the paged decode kernel")
    num_blocks, heads, block_size, dim = 40, 3, 128, 64
    cache = torch.randn(num_blocks, 3 * heads, block_size, dim).to(dtype)
    planes = MesaKVPlanes(cache, heads)
    lengths = [1000, 130, 4000, 1]
    table = torch.stack([torch.randperm(num_blocks - 1)[:32] + 1 for _ in lengths])
    pos = torch.arange(max(lengths))
    blocks = table[:, pos // block_size]
    offsets = (pos % block_size).expand(len(lengths), -1)
    q = torch.randn(len(lengths), 9, dim).to(dtype)
    got = ops.paged_decode(
        q, planes.key_stair_rows(), planes.value_rows(), planes.row_index(blocks, offsets),
        torch.tensor(lengths), 1 / math.sqrt(dim),
    )
    for i, n in enumerate(lengths):
        k = planes.gather(K_STAIR, blocks[i, :n], offsets[i, :n])
        v = planes.gather(VALUE, blocks[i, :n], offsets[i, :n])
        want, want_lse = dense_attention(q[i : i + 1], k, v, 1 / math.sqrt(dim))
        assert torch.allclose(got.out[i].float(), want[0], atol=1e-2)
        assert torch.allclose(got.lse[i], want_lse[0], atol=1e-3)
