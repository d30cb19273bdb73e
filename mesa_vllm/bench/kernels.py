"""Decode attention kernels side by side, without an engine.

One decode query (SmolLM2's heads: 9 query, 3 KV, D=64, bf16) over ``length`` paged keys,
timed for:

- vLLM's own CPU kernel (``cpu_attention_with_kv_cache``) in every ISA this host runs
  (``vec``; ``amx`` where the CPU has AMX tiles), with and without its KV split. This is
  what the default backend runs at every decode step. It returns no log-sum-exp.
- SGLang's paged decode kernel that vLLM's CPU build ships (``decode_attention_cpu``):
  mesa's stair pass, which needs the log-sum-exp to merge with the window pass.
- The rest of mesa's per-layer decode work: the window's key/value gather, the window
  pass, the query rotations, the merge and the cache write (window of ``window`` keys).
- Where the CPU has AMX: the window turn of mesa's one-pass decode (the ``amx`` page
  layout), which with vLLM's ``amx`` kernel over the stair plane is all its decode layer does.

Every kernel's output is checked against a float64 reference before it is timed, so a
layout or numerics change in vLLM fails here instead of producing a fast wrong number.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

NUM_KV_HEADS, GROUP, HEAD_SIZE, BLOCK_SIZE = 3, 3, 64, 128
OUTPUT_TOLERANCE = 2e-2  # bf16 inputs and outputs; the float64 reference is exact


@dataclass
class KernelTiming:
    name: str
    ms_per_layer: float
    max_abs_error: float | None  # against the float64 reference, where it has an output


@dataclass
class KernelReport:
    length: int
    window: int
    threads: int
    amx: bool
    timings: list[KernelTiming] = field(default_factory=list)

    def get(self, name: str) -> KernelTiming:
        return next(t for t in self.timings if t.name == name)


def _time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):  # best of three batches of `reps`: noise on a shared host only adds
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps * 1e3)
    return best


def amx_available() -> bool:
    """AMX tiles present, and this process allowed to use them (Linux asks per process)."""
    if not torch.cpu._is_amx_tile_supported():
        return False
    return bool(torch.cpu._init_amx())


def measure(length: int = 32768, window: int = 515, reps: int = 20, seed: int = 0) -> KernelReport:
    """Time the kernels at one decode step of one sequence of ``length`` keys."""
    import vllm._custom_ops as ops  # loads vLLM's _C ops (and SGLang's decode kernel)

    from mesa_vllm.attention import ops as mesa_ops
    from mesa_vllm.attention.kv_layout import K_STAIR, K_TRUE, VALUE, MesaKVPlanes

    if not 0 < window < length:
        raise ValueError(f"window must be in (0, length); got window={window}, length={length}")
    h, g, d, bs = NUM_KV_HEADS, GROUP, HEAD_SIZE, BLOCK_SIZE
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(length, h, d, generator=gen).to(dtype)
    value = torch.randn(length, h, d, generator=gen).to(dtype)
    query = torch.randn(1, h * g, d, generator=gen).to(dtype)
    scale = d**-0.5

    def reference(num_keys: int) -> torch.Tensor:
        k = key[:num_keys].double().repeat_interleave(g, 1)
        v = value[:num_keys].double().repeat_interleave(g, 1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", query[0].double(), k) * scale, -1)
        return torch.einsum("hl,lhd->hd", probs, v)[None]

    def error(out: torch.Tensor, num_keys: int) -> float:
        err = float((out.double() - reference(num_keys)).abs().max())
        if err > OUTPUT_TOLERANCE:
            raise RuntimeError(f"decode kernel disagrees with the float64 reference by {err:.3g}")
        return err

    num_blocks = length // bs + 2
    first_block = 1  # leave block 0 unused, as vLLM's null block is
    slots = torch.arange(length) + first_block * bs
    blocks, offsets = slots // bs, slots % bs
    block_table = (torch.arange((length + bs - 1) // bs) + first_block).int()[None]
    query_start = torch.tensor([0, 1], dtype=torch.int32)
    seq_lens = torch.tensor([length], dtype=torch.int32)
    amx = amx_available()
    report = KernelReport(length, window, torch.get_num_threads(), amx)

    for isa in ["vec", "amx"] if amx else ["vec"]:
        cache = torch.zeros(num_blocks, 3 * h, bs, d, dtype=dtype)  # mesa's page shape
        key_pages, value_pages = cache[:, 0:h], cache[:, h : 2 * h]
        ops.cpu_attn_reshape_and_cache(key, value, key_pages, value_pages, slots, isa)
        for split in (False, True):
            meta = ops.cpu_attn_get_scheduler_metadata(
                1, h * g, h, d, seq_lens, dtype, query_start, True, -1, isa, split
            )
            out = torch.empty_like(query)

            def vllm_kernel(meta=meta, out=out, key_pages=key_pages, value_pages=value_pages):
                ops.cpu_attention_with_kv_cache(
                    query, key_pages, value_pages, out, query_start, seq_lens, scale, True,
                    None, -1, block_table, 0.0, meta, None,
                )

            vllm_kernel()
            name = f"vllm {isa}" + (" split" if split else "")
            report.timings.append(KernelTiming(name, _time_ms(vllm_kernel, reps), error(out, length)))

    cache = torch.zeros(num_blocks, 3 * h, bs, d, dtype=dtype)
    planes = MesaKVPlanes(cache, h)
    planes.write(key, key, value, slots, "vec")
    rows = planes.row_index(blocks, offsets)[None]
    stair_len = length - window
    stair = lambda: mesa_ops.paged_decode(  # noqa: E731
        query, planes.key_stair_rows(), planes.value_rows(), rows, torch.tensor([stair_len]), scale
    )
    report.timings.append(
        KernelTiming("sglang paged decode (mesa stair pass)", _time_ms(stair, reps), error(stair().out, stair_len))
    )

    # The rest of one mesa decode layer, at the same window.
    window_blocks, window_offsets = blocks[-window:], offsets[-window:]
    window_index = torch.arange(window)[None]
    window_len = torch.tensor([window])
    positions = torch.tensor([stair_len // 10, length])
    table = torch.randn(length + 1, d, generator=gen).to(dtype)  # any table: timing only
    new_slot = torch.tensor([length + first_block * bs - 1])
    parts = [stair(), stair()]
    extra = {
        "window gather (K_true + V)": lambda: (
            planes.gather(K_TRUE, window_blocks, window_offsets),
            planes.gather(VALUE, window_blocks, window_offsets),
        ),
        "window pass": lambda: mesa_ops.paged_decode(
            query, key[-window:], value[-window:], window_index, window_len, scale
        ),
        "query rotations": lambda: mesa_ops.rotate_queries(query.repeat(2, 1, 1), positions, table, d, True),
        "merge": lambda: mesa_ops.merge(parts, dtype),
        "cache write": lambda: planes.write(key[:1], key[:1], value[:1], new_slot, "vec"),
    }
    for name, fn in extra.items():
        report.timings.append(KernelTiming(name, _time_ms(fn, reps * 10), None))
    if amx:
        # mesa's one-pass decode (amx layout) runs vLLM's amx kernel over the stair plane;
        # on top of it, only the window's turn: save its stair rows, turn, write, put back.
        amx_planes = MesaKVPlanes(torch.zeros(num_blocks, 3 * h, bs, d, dtype=dtype), h, layout="amx")
        amx_planes.write(key, key, value, slots, "amx")
        # The blocks holding the window, every token of them turned (mesa turns the others
        # by 0).
        turn_blocks = torch.unique(window_blocks)
        shifts = torch.arange(turn_blocks.numel() * bs)
        turn_table = torch.randn(length + 1, d).to(dtype)  # any table: timing only

        def window_turn():
            saved = amx_planes.turn_pages(
                K_STAIR, turn_blocks,
                lambda rows: mesa_ops.rotate_in_place(rows, shifts, turn_table, d, True),
            )
            amx_planes.put_back(K_STAIR, turn_blocks, saved)

        report.timings.append(KernelTiming(ONE_PASS_TURN, _time_ms(window_turn, reps * 10), None))
    return report


ONE_PASS_TURN = "window turn and restore (one-pass decode, amx)"


MESA_EXTRA = ("window gather (K_true + V)", "window pass", "query rotations", "merge", "cache write")


def to_markdown(report: KernelReport, command: str, num_layers: int = 30) -> str:
    fastest = min(
        (t for t in report.timings if t.name.startswith("vllm")), key=lambda t: t.ms_per_layer
    )
    stair = report.get("sglang paged decode (mesa stair pass)")
    extra = sum(report.get(n).ms_per_layer for n in MESA_EXTRA)
    kv_mb = 2 * report.length * NUM_KV_HEADS * HEAD_SIZE * 2 / 1e6  # keys + values, bf16
    lines = [
        f"# Decode attention kernels at {report.length:,} keys",
        "",
        "Command:",
        "",
        "```sh",
        command,
        "```",
        "",
        f"One decode query, 9 query / 3 KV heads, D=64, bf16, block {BLOCK_SIZE}; "
        f"{report.threads} threads; AMX {'available' if report.amx else 'not available'}. "
        f"Best of 3 batches with warm caches: the same {kv_mb:.0f} MB of keys and values are "
        "read at every call, where an engine reads 30 layers' worth in turn, so in-engine "
        "times are higher (in-engine profiles: `profile_mesa_*.md`).",
        "",
        "| kernel | ms per layer | x 30 layers, ms per step | max abs error vs float64 |",
        "|---|---:|---:|---:|",
    ]
    for t in report.timings:
        err = "-" if t.max_abs_error is None else f"{t.max_abs_error:.1e}"
        lines.append(f"| {t.name} | {t.ms_per_layer:.3f} | {t.ms_per_layer * num_layers:.1f} | {err} |")
    lines += [
        "",
        f"mesa's stair pass / vLLM's fastest kernel here ({fastest.name}): "
        f"{stair.ms_per_layer / fastest.ms_per_layer:.2f}x the time. The rest of mesa's decode "
        f"layer (window gather and pass, rotations, merge, write) adds {extra:.3f} ms per layer, "
        f"{extra / stair.ms_per_layer:.0%} of its stair pass.",
    ]
    if report.amx:
        amx_split = report.get("vllm amx split").ms_per_layer
        one_pass = amx_split + report.get(ONE_PASS_TURN).ms_per_layer + report.get("query rotations").ms_per_layer / 2
        lines += [
            "",
            f"mesa's one-pass decode on this host (amx layout: vllm amx split over the stair "
            f"plane, the window turn, one query rotation): {one_pass:.3f} ms per layer, "
            f"{amx_split / one_pass:.2f}x the default backend's speed (vllm amx split alone).",
        "",
    ]
    return "\n".join(lines)


def write(report: KernelReport, out_dir, name: str, command: str) -> tuple:
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps({"command": command, **asdict(report)}, indent=2) + "\n")
    md_path.write_text(to_markdown(report, command))
    return json_path, md_path
