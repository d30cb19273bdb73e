"""The backend's per-step plan reproduces the dense rule for every (query, key) pair.

``plan.build_plan`` decomposes each query into passes (key range, key rotation, query
rotation). Here the passes are expanded back into (key, relative position) pairs and
compared with ``rule.relative_positions``, for many geometries, prompt lengths and ways a
scheduler step can cut the sequence (chunked prefill, decode, recompute after preemption).
"""

from __future__ import annotations

import random

import pytest
import torch

from mesa_vllm.attention.kv_layout import K_STAIR
from mesa_vllm.attention.plan import build_plan
from mesa_vllm.rule import MesaGeometry, relative_positions

pytestmark = [pytest.mark.cpu]

BLOCK = 8


def expand(geom: MesaGeometry, plan, row: int) -> dict[int, int]:
    """{key position: relative position} that the plan gives query row ``row``."""
    p = int(plan.positions[row])
    pairs: dict[int, int] = {}
    for start, end, seq_len in zip(plan.plain.row_starts, plan.plain.row_ends, plan.plain.seq_lens):
        if start <= row < end:
            # vLLM's kernel: keys [0, seq_len) bottom-right causal, true rotations.
            last = seq_len - (end - row)
            pairs.update({j: p - j for j in range(last + 1)})
    for run in plan.runs:
        if run.row_start <= row < run.row_end:
            i = row - run.row_start
            n = run.row_end - run.row_start
            for ps in run.passes:
                keys = ((ps.keys.block_ids - 1) * BLOCK + ps.keys.offsets).tolist()
                # the block-wise description of the range names the same keys
                covered = ps.keys.blocks.repeat_interleave(BLOCK)[ps.keys.lead : ps.keys.lead + len(keys)]
                assert torch.equal(covered, ps.keys.block_ids)
                visible = len(keys) - ps.num_causal + i + 1 if ps.num_causal else len(keys)
                assert ps.num_causal in (0, n)
                for j in keys[:visible]:
                    key_rotation = j // geom.E if ps.plane == K_STAIR else j
                    assert j not in pairs, "a key is attended twice"
                    pairs[j] = int(ps.rot_positions[i]) - key_rotation
    dec = plan.decode
    if dec is not None and row in dec.rows.tolist():
        b = dec.rows.tolist().index(row)
        a = int(dec.stair_lengths[b])
        for j in range(a):
            key = (int(dec.stair_block_ids[b, j]) - 1) * BLOCK + int(dec.stair_offsets[b, j])
            assert key == j
            pairs[j] = int(dec.stair_positions[b]) - j // geom.E
        window = dec.windows[b]
        first = int(dec.window_lengths[:b].sum())
        for i, j in enumerate(((window.block_ids - 1) * BLOCK + window.offsets).tolist()):
            pairs[j] = p - j
            # The one-pass decode sees window keys turned by window_shifts from their stair
            # rotation, from the stair query: the same distance.
            turned = j // geom.E + int(dec.window_shifts[first + i])
            assert int(dec.stair_positions[b]) - turned == p - j
    return pairs


def check_step(
    geom: MesaGeometry,
    prompt_lens: list[int],
    spans: list[tuple[int, int]],
    batch_decode: bool,
    plain_kernel: bool = True,
):
    qsl = [0]
    for q0, q1 in spans:
        qsl.append(qsl[-1] + q1 - q0)
    max_len = max(q1 for _, q1 in spans)
    table = torch.arange(1, max_len // BLOCK + 2, dtype=torch.int32).repeat(len(spans), 1)
    plan = build_plan(
        geom, query_start_loc=qsl, seq_lens=[q1 for _, q1 in spans], prompt_lens=prompt_lens,
        block_table=table, block_size=BLOCK, batch_decode=batch_decode, plain_kernel=plain_kernel,
    )
    for req, ((q0, q1), L) in enumerate(zip(spans, prompt_lens)):
        rel, visible = relative_positions(geom, L, torch.arange(q0, q1), torch.arange(q1))
        for i in range(q1 - q0):
            want = {j: int(rel[i, j]) for j in range(q1) if visible[i, j]}
            got = expand(geom, plan, qsl[req] + i)
            assert got == want, f"L={L}, query {q0 + i}, step [{q0}, {q1})"


GEOMETRIES = [
    MesaGeometry(T=64, F=16, C=24, R=16, E=16),
    MesaGeometry(T=64, F=10, C=20, R=15, E=5),
    MesaGeometry(T=32, F=3, C=9, R=6, E=3, log_n=False),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
def test_whole_prompts(geom):
    lengths = [5, geom.T, geom.T + 1, 3 * geom.T + 5, geom.max_supported_len // 2]
    check_step(geom, lengths, [(0, n) for n in lengths], batch_decode=False)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
@pytest.mark.parametrize(
    ("batch_decode", "plain_kernel"), [(False, True), (True, True), (False, False)],
    ids=["gathered-decode", "paged-decode", "portable"],
)
def test_random_steps(geom, batch_decode, plain_kernel):
    rng = random.Random(hash(str(geom)) % 1000)
    for _ in range(30):
        spans, lengths = [], []
        for _ in range(rng.randint(1, 4)):
            L = rng.randint(1, geom.max_supported_len - 40)
            total = min(geom.max_supported_len, L + rng.randint(0, 3 * geom.R))
            kind = rng.choice(["prefill", "decode", "recompute"])
            if kind == "decode":
                q1 = rng.randint(L, total)
                q0 = q1 - 1
            elif kind == "prefill":
                q0 = rng.randint(0, L - 1)
                q1 = rng.randint(q0 + 1, L)
            else:  # after preemption: prompt and generated tokens in one step
                q0 = rng.randint(0, L - 1)
                q1 = rng.randint(max(q0 + 1, L), max(q0 + 1, total))
            spans.append((q0, q1))
            lengths.append(L)
        check_step(geom, lengths, spans, batch_decode, plain_kernel)


def test_one_pass_decode_only_where_no_shared_slot_is_turned_for_another_row():
    """The one-pass decode turns window keys in place for one call: a cache slot shared by
    two decode rows (prefix caching) must need the same turn from both and must not be a
    stair key of either, else the step takes the gathered path."""
    from mesa_vllm.attention.backend import _one_pass_safe

    geom = GEOMETRIES[0]  # T=64, R=16, E=16; first window of L=130 is [128, 130]
    own = torch.arange(1, 41, dtype=torch.int32)

    def decode_step(lengths, tables):
        plan = build_plan(
            geom, query_start_loc=list(range(len(lengths) + 1)), seq_lens=[n + 1 for n in lengths],
            prompt_lens=lengths, block_table=torch.stack(tables), block_size=BLOCK, batch_decode=True,
        )
        return plan.decode

    # 17 shared prompt blocks hold tokens [0, 136): the short request's window, and stair
    # keys of a longer request (L=200, anchor 192) on the same prefix.
    shared_prefix = torch.cat([own[:17], own[17:] + 100])
    assert _one_pass_safe(decode_step([130, 200], [own, own + 100]), BLOCK)  # nothing shared
    assert _one_pass_safe(decode_step([130, 130], [own, own]), BLOCK)  # same windows, same turns
    assert not _one_pass_safe(decode_step([130, 200], [own, shared_prefix]), BLOCK)
