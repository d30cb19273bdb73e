"""Per-step plan: which query rows attend which key ranges, rotated where.

Built once per scheduler step by the metadata builder and shared by every layer. Every
decision is derived from each token's absolute position and its request's prompt length,
never from the step's shape, so a prompt split across steps at any boundary, a batch
mixing prefill with decode, or a recompute after preemption all get the same answer.

A request's query rows ``[q0, q1)`` split into:

- a **plain** run (positions below ``geom.plain_end(L)``): ordinary causal attention,
  served by vLLM's own CPU kernel over the true-rotation keys;
- **middle** runs, one per middle chunk ``s``: a pass over the first chunk ``[0, F)``
  with the query rotated at ``F + p - s``, and a pass over ``[s, p]`` at ``p``;
- **stair** runs, one per window anchor ``a``: a pass over ``[0, a)`` on the stair-rotated
  keys with the query rotated at ``p - a + a/E``, and a pass over ``[a, p]`` at ``p``.

Single-token stair runs (decode) are batched so the stair pass reads the paged cache in
place; everything else gathers only the keys it needs, which is linear in the prompt for
a fixed chunk width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mesa_vllm.attention.kv_layout import K_STAIR, K_TRUE
from mesa_vllm.rule import MesaGeometry


@dataclass
class KeyRange:
    """Keys ``[start, end)`` of one request, as (block id, offset) pairs; for one
    contiguous range also the blocks it covers and the offset of its first key in the
    first of them (``lead``), for block-wise reads."""

    block_ids: torch.Tensor
    offsets: torch.Tensor
    blocks: torch.Tensor | None = None
    lead: int = 0

    @property
    def size(self) -> int:
        return int(self.offsets.numel())


@dataclass
class Pass:
    rot_positions: torch.Tensor  # [n] where each query row is rotated for this pass
    plane: int  # K_TRUE or K_STAIR
    keys: KeyRange
    num_causal: int  # the last `num_causal` keys are the queries themselves


@dataclass
class TorchRun:
    """Consecutive query rows of one request with the same passes."""

    row_start: int
    row_end: int
    passes: list[Pass]
    scales: torch.Tensor | None  # log_n factor per row (stair runs only)
    kind: str  # "plain" (portable mode only), "middle" or "stair"

    @property
    def rot_positions(self) -> torch.Tensor:
        """Every pass's query rotation positions, concatenated in pass order."""
        return torch.cat([p.rot_positions for p in self.passes])


@dataclass
class PlainRows:
    """Rows served by plain causal attention: per request, rows and the key count."""

    row_starts: list[int] = field(default_factory=list)
    row_ends: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class StairDecode:
    """Single-token stair queries of several requests, batched."""

    requests: list[int]  # [B] the step's request index of each row
    rows: torch.Tensor  # [B]
    stair_positions: torch.Tensor  # [B] query rotation for the stair pass
    true_positions: torch.Tensor  # [B]
    scales: torch.Tensor | None  # [B]
    stair_block_ids: torch.Tensor  # [B, max_len] block of each stair key (0 past length)
    stair_offsets: torch.Tensor  # [B, max_len]
    stair_lengths: torch.Tensor  # [B] = anchor a
    windows: list[KeyRange]  # keys [a, p] per request
    window_keys: KeyRange  # all windows' keys, concatenated
    window_index: torch.Tensor  # [B, max_window] rows of each window in window_keys
    window_lengths: torch.Tensor  # [B]
    # Per window key j (step stair): the extra turn from its stair rotation j // E to
    # j - a + a // E, where a query rotated at p - a + a // E sees it at distance p - j.
    window_shifts: torch.Tensor


@dataclass
class StepPlan:
    num_tokens: int
    positions: torch.Tensor  # [num_tokens] true position of each query row
    plain: PlainRows
    runs: list[TorchRun]
    decode: StairDecode | None
    all_plain: bool  # every row of the step is plain, in the step's own layout


def _key_range(block_row: torch.Tensor, start: int, end: int, block_size: int) -> KeyRange:
    pos = torch.arange(start, end, dtype=torch.int64)
    first, last = start // block_size, max(start, end - 1) // block_size
    return KeyRange(block_row[pos // block_size].long(), pos % block_size,
                    blocks=block_row[first : last + 1].long(), lead=start - first * block_size)


def _scales(geom: MesaGeometry, positions: torch.Tensor) -> torch.Tensor | None:
    if not geom.log_n:
        return None
    scale = torch.clamp(torch.log(positions.double() + 1) / torch.log(torch.tensor(float(geom.T))), min=1.0)
    if bool((scale == 1.0).all()):
        return None
    return scale.float()


def build_plan(
    geom: MesaGeometry,
    *,
    query_start_loc: list[int],
    seq_lens: list[int],
    prompt_lens: list[int],
    block_table: torch.Tensor,
    block_size: int,
    batch_decode: bool,
    plain_kernel: bool = True,
) -> StepPlan:
    """``plain_kernel``: plain rows go to one vLLM kernel call (``plan.plain``); without it
    (portable mode) they become single-pass runs like the others.
    """
    num_reqs = len(seq_lens)
    num_tokens = query_start_loc[num_reqs]
    positions = torch.empty(num_tokens, dtype=torch.int64)
    plain = PlainRows()
    runs: list[TorchRun] = []
    decode_entries: list[tuple[int, int, int, int]] = []  # (request, row, p, a)
    all_plain = True

    for req in range(num_reqs):
        row0 = query_start_loc[req]
        q_len = query_start_loc[req + 1] - row0
        q1 = seq_lens[req]
        q0 = q1 - q_len
        L = prompt_lens[req]
        positions[row0 : row0 + q_len] = torch.arange(q0, q1)
        if q_len == 0:
            continue
        block_row = block_table[req]
        row = lambda p: row0 + (p - q0)  # noqa: E731

        plain_end = geom.plain_end(L)
        if q0 < plain_end and not plain_kernel:
            end = min(q1, plain_end)
            p = torch.arange(q0, end)
            runs.append(
                TorchRun(row(q0), row(end),
                         passes=[Pass(p, K_TRUE, _key_range(block_row, 0, end, block_size), end - q0)],
                         scales=None, kind="plain")
            )
            all_plain = False
        elif q0 < plain_end:
            end = min(q1, plain_end)
            plain.row_starts.append(row(q0))
            plain.row_ends.append(row(end))
            plain.seq_lens.append(end)
            plain.requests.append(req)
            if end != q1:
                all_plain = False
        else:
            all_plain = False

        b = geom.final_start(L)
        if geom.is_long(L):
            lo, hi = max(q0, plain_end), min(q1, b)
            while lo < hi:
                s = geom.chunk_start(lo)
                end = min(hi, s + geom.C)
                p = torch.arange(lo, end)
                runs.append(
                    TorchRun(
                        row(lo), row(end),
                        passes=[
                            Pass(geom.F + p - s, K_TRUE, _key_range(block_row, 0, geom.F, block_size), 0),
                            Pass(p, K_TRUE, _key_range(block_row, s, end, block_size), end - lo),
                        ],
                        scales=None,
                        kind="middle",
                    )
                )
                lo = end
        stair_from = b if geom.is_long(L) else geom.T
        lo = max(q0, stair_from)
        while lo < q1:
            a = geom.anchor(lo, b)
            end = min(q1, a + geom.R)
            if end - lo == 1 and batch_decode:
                decode_entries.append((req, row(lo), lo, a))
            else:
                p = torch.arange(lo, end)
                runs.append(
                    TorchRun(
                        row(lo), row(end),
                        passes=[
                            Pass(geom.stair_query_position(p, a), K_STAIR, _key_range(block_row, 0, a, block_size), 0),
                            Pass(p, K_TRUE, _key_range(block_row, a, end, block_size), end - lo),
                        ],
                        scales=_scales(geom, p),
                        kind="stair",
                    )
                )
            lo = end

    decode = None
    if decode_entries:
        reqs = [e[0] for e in decode_entries]
        p = torch.tensor([e[2] for e in decode_entries], dtype=torch.int64)
        a = torch.tensor([e[3] for e in decode_entries], dtype=torch.int64)
        max_len = max(1, int(a.max()))
        pos = torch.arange(max_len, dtype=torch.int64)
        rows_bt = block_table[torch.tensor(reqs)].long()
        # Entries past each sequence's anchor point at block 0 (vLLM's null block).
        block_idx = torch.clamp(pos // block_size, max=rows_bt.shape[1] - 1)
        stair_blocks = rows_bt[:, block_idx]
        stair_blocks = torch.where(pos[None, :] < a[:, None], stair_blocks, torch.zeros_like(stair_blocks))
        windows = [
            _key_range(block_table[r], int(ai), int(pi) + 1, block_size)
            for r, ai, pi in zip(reqs, a.tolist(), p.tolist())
        ]
        window_lengths = torch.tensor([w.size for w in windows], dtype=torch.int64)
        window_offsets = torch.cumsum(window_lengths, 0) - window_lengths
        window_index = window_offsets[:, None] + torch.arange(int(window_lengths.max()))[None, :]
        window_index = torch.minimum(window_index, (window_offsets + window_lengths - 1)[:, None])
        window_pos = torch.cat([torch.arange(int(ai), int(pi) + 1) for ai, pi in zip(a.tolist(), p.tolist())])
        window_anchor = torch.repeat_interleave(a, window_lengths)
        decode = StairDecode(
            requests=reqs,
            rows=torch.tensor([e[1] for e in decode_entries], dtype=torch.int64),
            stair_positions=geom.stair_query_position(p, a),
            true_positions=p,
            scales=_scales(geom, p),
            stair_block_ids=stair_blocks,
            stair_offsets=(pos % block_size).expand(len(reqs), -1),
            stair_lengths=a,
            windows=windows,
            window_keys=KeyRange(
                torch.cat([w.block_ids for w in windows]), torch.cat([w.offsets for w in windows])
            ),
            window_index=window_index,
            window_lengths=window_lengths,
            window_shifts=(window_pos - window_pos // geom.E) - (window_anchor - window_anchor // geom.E),
        )
    return StepPlan(num_tokens, positions, plain, runs, decode, all_plain)
