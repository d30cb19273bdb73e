"""The ``MESA`` attention backend for vLLM v1 (Backend / MetadataBuilder / Impl).

- K/V live in vLLM's paged blocks, three planes per KV head (``kv_layout``): keys at
  their true rotation (read by vLLM's own CPU kernel), values, and keys at the stair
  rotation ``j // E`` (``j / E`` for the linear stair). Middle chunks read the first chunk's blocks in place; nothing is
  copied between blocks.
- The model hands over *unrotated* q and k (``mesa_vllm.models``); this backend rotates
  keys once when it writes them and rotates queries per pass.
- The builder turns the step into a plan once (``plan.build_plan``); each layer executes
  it: plain rows through vLLM's CPU kernel, middle and stair runs as partial attentions
  over gathered key ranges merged by log-sum-exp, and single-token stair queries (decode)
  reading the stair plane in place: with the ``amx`` page layout in one pass of vLLM's
  own kernel (the window's few stair keys turned to window distances for that call),
  otherwise through a paged decode kernel plus a window pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from mesa_vllm.attention import ops as mesa_ops
from mesa_vllm.attention.kv_layout import (
    K_STAIR, K_TRUE, LAYOUT_AMX, LAYOUT_ROW, LAYOUT_VEC, NUM_PLANES, VALUE, MesaKVPlanes,
    check_kv_layout)
from mesa_vllm.attention.plan import StairDecode, StepPlan, build_plan
from mesa_vllm.params import geometry_from_hf_config
from mesa_vllm.rule import STAIR_LINEAR, MesaGeometry
from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.utils.torch_utils import get_dtype_size
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

logger = init_logger(__name__)

BACKEND_NAME = "MESA"


def geometry_from_config(vllm_config: VllmConfig) -> MesaGeometry:
    return geometry_from_hf_config(vllm_config.model_config.hf_config)


class MesaAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["MesaAttentionImpl"]:
        return MesaAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["MesaMetadataBuilder"]:
        return MesaMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(32)]  # vLLM's CPU kernel reads keys in 32-token tiles

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Three head slots per KV head: true-rotation keys, values, stair keys."""
        if spec.num_head_slots is not None:
            return spec
        return replace(
            spec,
            num_head_slots=3 * spec.num_kv_heads,
            state_content_bytes=spec.head_size * get_dtype_size(spec.dtype),
        )

    @classmethod
    def supports_rswa(cls) -> bool:
        # mesa_vllm.engine sets `rswa_window` only so the runner passes prompt lengths.
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


# MESA_KERNELS: which kernels (and so which page layout) the CPU runs.
KERNEL_MODES = {
    "auto": "vLLM's AMX kernel where it applies (bf16, AMX CPU, step stair), else 'vec'",
    "vec": "vLLM's vector kernel for plain rows, the paged decode kernel for stair decode",
    "portable": "every pass as gathered PyTorch attention (what non-CPU devices run)",
}


def kernel_mode() -> str:
    mode = os.environ.get("MESA_KERNELS", "auto")
    if mode not in KERNEL_MODES:
        raise ValueError(
            f"MESA_KERNELS={mode!r} is not a mesa kernel mode; use one of: "
            + "; ".join(f"{name} ({what})" for name, what in KERNEL_MODES.items())
        )
    return mode


@dataclass
class KernelCall:
    """One call of vLLM's CPU kernel over some of the step's rows (a virtual batch)."""

    rows: torch.Tensor | None  # None: the step's rows as they are
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    scheduler_metadata: torch.Tensor


@dataclass
class WindowTurn:
    """The one-pass decode's turn of the step's window keys, block-wise: the blocks that
    hold any window key, and per token of those blocks its extra rotation (0 elsewhere,
    an exact identity)."""

    blocks: torch.Tensor  # [n] distinct block ids
    shifts: torch.Tensor  # [n * block_size]


@dataclass
class MesaMetadata:
    num_actual_tokens: int
    plan: StepPlan
    slot_mapping: torch.Tensor
    # token-linear rows (kv_layout's row views) of the new tokens' slots, for every layer
    write_rows: torch.Tensor
    key_positions: torch.Tensor  # [2n]: true positions, then stair-table rows (builder.stair_key_rows)
    plain_call: KernelCall | None
    layout: str  # kv_layout.LAYOUTS; not 'row': plain rows through vLLM's CPU kernel
    decode_call: KernelCall | None  # amx layout: stair decode rows in one vLLM kernel call
    window_turn: WindowTurn | None  # with decode_call
    decode_rows: torch.Tensor | None  # token-linear rows of the decode stair keys
    decode_positions: torch.Tensor | None  # [2B]: stair query positions, then true ones


class MesaMetadataBuilder(AttentionMetadataBuilder[MesaMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.geometry = geometry_from_config(vllm_config)
        self.block_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.head_size = kv_cache_spec.head_size
        self.dtype = vllm_config.model_config.dtype
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        self.num_heads = next(iter(layers.values())).impl.num_heads
        # CPU kernels (kernel_mode): vLLM's own CPU attention for plain rows, and for
        # stair decode either its AMX kernel in one pass or the paged decode kernel. Portable
        # mode (any other device, or MESA_KERNELS=portable) runs every pass as a gathered
        # partial attention in PyTorch.
        mode = kernel_mode()
        self.isa = None
        self.layout = LAYOUT_ROW
        if torch.device(device).type == "cpu" and mode != "portable":
            isa = _get_attn_isa(self.dtype, self.block_size, self.head_size, "auto")
            # The one-pass decode turns window keys by whole positions: step stair only.
            if isa == "amx" and (mode == "vec" or self.geometry.stair == STAIR_LINEAR):
                isa = "vec"
            self.isa = isa
            self.layout = LAYOUT_AMX if isa == "amx" else LAYOUT_VEC
            check_kv_layout(self.dtype, self.block_size, self.head_size, self.isa, self.layout)
        for layer in layers.values():
            layer.isa = self.isa
        logger.info_once("MESA kernels: %s page layout (isa %s, %s, MESA_KERNELS=%s)",
                         self.layout, self.isa, self.dtype, mode)
        # MESA_PAGED_DECODE=0 sends single-token stair queries through the gathered path.
        self.batch_decode = os.environ.get("MESA_PAGED_DECODE", "1") != "0" and (
            self.layout == LAYOUT_AMX
            or (self.layout == LAYOUT_VEC
                and mesa_ops.paged_decode_supported(self.dtype, torch.device(device)))
        )

    def stair_key_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of the stair-key rotation table for keys at ``positions``: the model's own
        table at ``j // E`` (step), or the fractional table, whose row ``j`` is ``j / E``."""
        if self.geometry.stair == STAIR_LINEAR:
            return positions
        return positions // self.geometry.E

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> MesaMetadata:
        cm = common_attn_metadata
        if cm.rswa_prefix_lens is None:
            raise RuntimeError(
                "mesa needs each request's prompt length; the engine was not configured "
                "by mesa-vllm (start it with --attention-backend mesa)."
            )
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = cm.seq_lens[:num_reqs].cpu().tolist()
        block_table = cm.block_table_tensor[:num_reqs].cpu()
        plan_args = dict(
            query_start_loc=qsl,
            seq_lens=seq_lens,
            prompt_lens=cm.rswa_prefix_lens[:num_reqs].cpu().tolist(),
            block_table=block_table,
            block_size=self.block_size,
            plain_kernel=self.layout != LAYOUT_ROW,
        )
        plan = build_plan(self.geometry, batch_decode=self.batch_decode, **plan_args)
        if (plan.decode is not None and self.layout == LAYOUT_AMX
                and not _one_pass_safe(plan.decode, self.block_size)):
            # Decode rows share a cached block that one would turn and another needs as
            # it is: this step takes the gathered path instead.
            plan = build_plan(self.geometry, batch_decode=False, **plan_args)
        num_tokens = plan.num_tokens

        plain_call = None
        if len(plan.plain):
            if plan.all_plain:
                rows = None
                query_start_loc = cm.query_start_loc[: num_reqs + 1].to(torch.int32)
                plain_seq_lens = cm.seq_lens[:num_reqs].to(torch.int32)
                plain_table = cm.block_table_tensor[:num_reqs]
            else:
                pr = plan.plain
                rows = torch.cat(
                    [torch.arange(s, e) for s, e in zip(pr.row_starts, pr.row_ends)]
                )
                lengths = torch.tensor([e - s for s, e in zip(pr.row_starts, pr.row_ends)])
                query_start_loc = torch.zeros(len(pr) + 1, dtype=torch.int32)
                query_start_loc[1:] = torch.cumsum(lengths, 0)
                plain_seq_lens = torch.tensor(pr.seq_lens, dtype=torch.int32)
                plain_table = cm.block_table_tensor[torch.tensor(pr.requests)]
            plain_call = self._kernel_call(rows, query_start_loc, plain_seq_lens, plain_table)

        decode_call = window_turn = None
        if plan.decode is not None and self.layout == LAYOUT_AMX:
            dec = plan.decode
            decode_call = self._kernel_call(
                dec.rows,
                torch.arange(dec.rows.numel() + 1, dtype=torch.int32),
                (dec.true_positions + 1).to(torch.int32),
                cm.block_table_tensor[torch.tensor(dec.requests)],
            )
            blocks, index = torch.unique(dec.window_keys.block_ids, return_inverse=True)
            shifts = torch.zeros(blocks.numel() * self.block_size, dtype=torch.int64)
            shifts[index * self.block_size + dec.window_keys.offsets] = dec.window_shifts
            window_turn = WindowTurn(blocks, shifts)

        # Token-linear rows (kv_layout's row views): block * tokens_per_page + offset.
        tokens_per_page = NUM_PLANES * self.num_kv_heads * self.block_size
        decode_rows = decode_positions = None
        if plan.decode is not None and decode_call is None:  # the paged decode kernel's inputs
            decode_rows = plan.decode.stair_block_ids * tokens_per_page + plan.decode.stair_offsets
            decode_positions = torch.cat([plan.decode.stair_positions, plan.decode.true_positions])

        slots = cm.slot_mapping[:num_tokens]
        slots_long = slots.long()
        return MesaMetadata(
            num_actual_tokens=num_tokens,
            plan=plan,
            slot_mapping=slots,
            write_rows=(slots_long // self.block_size) * tokens_per_page
            + slots_long % self.block_size,
            key_positions=torch.cat([plan.positions, self.stair_key_rows(plan.positions)]),
            plain_call=plain_call,
            layout=self.layout,
            decode_call=decode_call,
            window_turn=window_turn,
            decode_rows=decode_rows,
            decode_positions=decode_positions,
        )

    def _kernel_call(self, rows, query_start_loc, seq_lens, block_table) -> KernelCall:
        from vllm import _custom_ops as ops

        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=int(seq_lens.numel()),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_size,
            seq_lens=seq_lens,
            dtype=self.dtype,
            query_start_loc=query_start_loc,
            causal=True,
            sliding_window_size=-1,
            isa=self.isa,
            enable_kv_split=True,
        )
        return KernelCall(rows, query_start_loc, seq_lens, block_table, scheduler_metadata)


def kernel_layouts(worker) -> list[str]:
    """The page layout of every MESA metadata builder on a worker; run it on an engine's
    workers with ``LLM.collective_rpc(kernel_layouts)``."""
    return [
        group.get_metadata_builder().layout
        for groups in worker.model_runner.attn_groups
        for group in groups
        if isinstance(group.get_metadata_builder(), MesaMetadataBuilder)
    ]


def _one_pass_safe(dec: StairDecode, block_size: int) -> bool:
    """Whether the one-pass decode may turn the step's window keys in place: blocks shared
    between requests (prefix caching) must not hold a slot that one row turns while another
    row turns it differently or reads it as a stair key."""
    slots = dec.window_keys.block_ids * block_size + dec.window_keys.offsets
    unique_slots = torch.unique(slots)
    if unique_slots.numel() != slots.numel():
        pairs = torch.unique(torch.stack([slots, dec.window_shifts]), dim=1)
        if pairs.shape[1] != unique_slots.numel():
            return False
    # Stair keys of every row: blocks first (cheap), slots only where a block is shared.
    stair_blocks = dec.stair_block_ids[:, ::block_size]
    if not bool(torch.isin(dec.window_keys.block_ids, stair_blocks).any()):
        return True
    in_stair = torch.arange(dec.stair_block_ids.shape[1])[None, :] < dec.stair_lengths[:, None]
    stair_slots = (dec.stair_block_ids * block_size + dec.stair_offsets)[in_stair]
    return not bool(torch.isin(unique_slots, stair_slots).any())


class MesaAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logit soft-capping": bool(logits_soft_cap),
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
            "attention sinks": sinks is not None,
            f"KV cache dtype {kv_cache_dtype}": kv_cache_dtype != "auto",
        }
        found = [name for name, bad in unsupported.items() if bad]
        if found:
            raise NotImplementedError(
                f"The MESA attention backend does not support {', '.join(found)}. "
                "Mesa-Extrapolation applies to decoder models with rotary position "
                "embeddings and full attention."
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        self.attn_type = attn_type
        self.geometry = geometry_from_config(get_current_vllm_config())
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._planes: MesaKVPlanes | None = None  # views of this layer's cache, made once

    def _planes_of(self, kv_cache: torch.Tensor, layout: str) -> MesaKVPlanes:
        planes = self._planes
        if (planes is None or planes.cache.data_ptr() != kv_cache.data_ptr()
                or planes.cache.shape != kv_cache.shape
                or planes.layout != layout):
            planes = MesaKVPlanes(kv_cache, self.num_kv_heads, layout=layout)
            self._planes = planes
        return planes

    def _rotation(self, layer: AttentionLayer, dtype: torch.dtype):
        rotary = getattr(layer, "mesa_rotary", None)
        if rotary is None:
            raise RuntimeError(
                f"{type(layer).__name__} has no rotary embedding handed over by a Mesa "
                "model class; the MESA backend only runs models registered by mesa-vllm."
            )
        tables = self._tables.get(dtype)
        if tables is None:
            # The linear stair rotates stair keys at fractional positions j / E.
            stair_table = (rotary.fractional_table(self.geometry.E, dtype)
                           if self.geometry.stair == STAIR_LINEAR else None)
            tables = (rotary.cos_sin_cache.to(dtype), stair_table)
            self._tables[dtype] = tables
        return tables[0], tables[1], rotary.is_neox_style

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: MesaMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by MESA")
        if attn_metadata is None:  # profiling / warm-up
            return output
        md = attn_metadata
        plan = md.plan
        n = md.num_actual_tokens
        table, stair_table, is_neox = self._rotation(layer, query.dtype)
        planes = self._planes_of(kv_cache, md.layout)
        hs = self.head_size

        def rotated(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return mesa_ops.rotate_queries(x, positions, table, hs, is_neox)

        def rotate_in_place(x: torch.Tensor, positions: torch.Tensor) -> None:
            mesa_ops.rotate_in_place(x, positions, table, hs, is_neox)

        # 1. Store the new keys at both rotations (in place on the fresh copy `repeat`
        # makes; one call when both come from the model's table), and the values.
        new_keys = key[:n].repeat(2, 1, 1)
        if stair_table is None:
            rotate_in_place(new_keys, md.key_positions)
        else:
            rotate_in_place(new_keys[:n], md.key_positions[:n])
            mesa_ops.rotate_in_place(new_keys[n:], md.key_positions[n:], stair_table, hs, is_neox)
        planes.write(new_keys[:n], new_keys[n:], value[:n], md.slot_mapping, layer.isa,  # type: ignore[attr-defined]
                     rows=md.write_rows)

        q = query[:n]
        out = output[:n]
        if md.plain_call is not None:
            self._plain(planes, q, out, md.plain_call, plan.positions, rotated, rotate_in_place)
        for run in plan.runs:
            self._run(planes, q, out, run, rotated)
        if md.decode_call is not None:
            self._decode_one_pass(planes, q, out, plan.decode, md.decode_call, md.window_turn,
                                  rotated, rotate_in_place)
        elif plan.decode is not None:
            self._decode(planes, q, out, plan.decode, md.decode_rows, md.decode_positions, rotated)
        return output

    def _plain(self, planes, q, out, call: KernelCall, positions, rotated, rotate_in_place) -> None:
        """Plain rows: vLLM's own CPU kernel over the true-rotation keys."""
        if call.rows is None and q.stride(-1) == 1 and q.stride(-2) == q.shape[-1]:
            # Every row is plain (prompts within T): rotate the queries in place, as the
            # stock model would have, since no other pass reads them.
            rotate_in_place(q, positions)
            plain_q, plain_out = q, out
        elif call.rows is None:
            plain_q, plain_out = rotated(q, positions), out
        else:
            plain_q = rotated(q.index_select(0, call.rows), positions.index_select(0, call.rows))
            plain_out = torch.empty_like(plain_q)
        self._kernel(planes.key_true_pages, planes.value_pages, plain_q, plain_out, call)
        if call.rows is not None:
            out.index_copy_(0, call.rows, plain_out)

    def _kernel(self, key_pages, value_pages, q, out, call: KernelCall) -> None:
        """vLLM's own CPU attention kernel, causal, over ``call``'s paged sequences."""
        from vllm import _custom_ops as ops

        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=key_pages,
            value_cache=value_pages,
            output=out,
            query_start_loc=call.query_start_loc,
            seq_lens=call.seq_lens,
            scale=self.scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=call.block_table,
            softcap=0.0,
            scheduler_metadata=call.scheduler_metadata,
            s_aux=None,
        )

    def _run(self, planes, q, out, run, rotated) -> None:
        """Middle or stair rows: one partial attention per pass, merged by LSE."""
        run_q = q[run.row_start : run.row_end]
        if run.scales is not None:
            run_q = run_q * run.scales.to(run_q.dtype)[:, None, None]
        rows = run_q.shape[0]
        # Every pass's query rotation in one call.
        all_q = rotated(run_q.repeat(len(run.passes), 1, 1), run.rot_positions)
        parts: list[mesa_ops.Partial] = []
        for i, p in enumerate(run.passes):
            r = p.keys
            keys = planes.gather_range(p.plane, r.blocks, r.lead, r.size)
            values = planes.gather_range(VALUE, r.blocks, r.lead, r.size)
            parts += mesa_ops.attend_causal_tail(
                all_q[i * rows : (i + 1) * rows], keys, values, self.scale, p.num_causal
            )
        out[run.row_start : run.row_end] = mesa_ops.merge(parts, out.dtype)

    def _decode(self, planes, q, out, dec, decode_rows, decode_positions, rotated) -> None:
        """Single-token stair queries: the stair pass reads the paged cache in place; the
        windows' few keys are gathered once for the batch."""
        batch = dec.rows.numel()
        dec_q = q.index_select(0, dec.rows)
        if dec.scales is not None:
            dec_q = dec_q * dec.scales.to(dec_q.dtype)[:, None, None]
        both = rotated(dec_q.repeat(2, 1, 1), decode_positions)
        stair = mesa_ops.paged_decode(
            both[:batch], planes.key_stair_rows(), planes.value_rows(), decode_rows,
            dec.stair_lengths, self.scale,
        )
        # All windows in one call: gather their keys once, then the same paged kernel.
        window = mesa_ops.paged_decode(
            both[batch:],
            planes.gather(K_TRUE, dec.window_keys.block_ids, dec.window_keys.offsets),
            planes.gather(VALUE, dec.window_keys.block_ids, dec.window_keys.offsets),
            dec.window_index,
            dec.window_lengths,
            self.scale,
        )
        out.index_copy_(0, dec.rows, mesa_ops.merge([stair, window], out.dtype))

    def _decode_one_pass(self, planes, q, out, dec, call: KernelCall, turn: WindowTurn,
                         rotated, rotate_in_place) -> None:
        """Single-token stair queries in one call of vLLM's kernel over the stair plane.

        A query rotated at ``p - a + a // E`` sees stair key ``j < a`` (rotated at
        ``j // E``) at the stair distance; window keys ``a <= j <= p`` are turned to
        ``j - a + a // E`` for this call, so it sees them at ``p - j``: every key at its
        spec distance in one softmax, no second pass and no merge. The turn works on whole
        pages (the few blocks that hold the windows): saved, turned, written, and the saved
        pages put back, so blocks keep their shareable content between steps.
        """
        dec_q = q.index_select(0, dec.rows)
        if dec.scales is not None:
            dec_q = dec_q * dec.scales.to(dec_q.dtype)[:, None, None]
        stair_q = rotated(dec_q, dec.stair_positions)
        # Turned from the stored keys with the table they were written with; a shift of 0
        # (keys outside the windows) is an exact identity.
        saved = planes.turn_pages(K_STAIR, turn.blocks, lambda rows: rotate_in_place(rows, turn.shifts))
        try:
            dec_out = torch.empty_like(stair_q)
            self._kernel(planes.key_stair_pages, planes.value_pages, stair_q, dec_out, call)
        finally:
            planes.put_back(K_STAIR, turn.blocks, saved)
        out.index_copy_(0, dec.rows, dec_out.to(out.dtype))
