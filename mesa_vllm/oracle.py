"""Dense reference implementation of the Mesa rule on a Hugging Face model.

Plain PyTorch, slow on purpose, written to be obviously right rather than fast: it is
the yardstick the vLLM backend is measured against, and it also lets people without
vLLM run Mesa-Extrapolation on a ``LlamaForCausalLM``.

How it works. The Hugging Face model runs as usual except for two things, switched on
only for the duration of an oracle call (a model object passed in is left as it was):

1. Its rotary module is replaced by one that returns ``cos = 1, sin = 0``, so the
   attention layers see **unrotated** queries and keys (``q * 1 + rotate_half(q) * 0``
   is ``q`` exactly), and the KV cache holds unrotated keys.
2. Its attention implementation is a function registered with transformers'
   ``AttentionInterface`` that, for every (query, key) pair, takes the relative position
   and visibility from :func:`mesa_vllm.rule.relative_positions` (the spec written down
   pair by pair), scores ``q . Rot(-r) . k`` with :func:`mesa_vllm.rope.relative_scores`
   using the model's own RoPE frequencies (``inv_freq`` and ``attention_scaling`` of its
   rotary module), multiplies stair queries by the ``log_n`` factor
   (:func:`mesa_vllm.rule.query_scales`), masks with ``visible``, and takes a float64
   softmax. Grouped-query attention repeats each KV head for its query heads.

No chunk, stair or anchor decomposition is used here; the backend's decomposition is
checked against this file. The one economy: queries go in blocks of a few dozen, and a
block scores only the keys at least one of its queries can see (an unseen key would get
weight ``exp(-inf) = 0`` anyway), so middle chunks cost ``F + C`` keys, not ``L``.
With ``geometry=None`` the same path runs plain causal attention (``r = p - j``), which
is how the oracle itself is checked against Hugging Face's attention.

Model families are isolated in :class:`FamilyAdapter`: it knows where a family keeps its
rotary module, how its rotation pairs channels, and which configs it must refuse
(no RoPE, sliding window).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesa_vllm import rope, rule
from mesa_vllm.params import trained_length
from mesa_vllm.rule import MesaGeometry

ATTN_IMPLEMENTATION = "mesa_oracle"

# Elements of one [q_block, Lk, rotary_dim/2] float64 temporary in relative_scores. The
# query block is sized so each temporary stays around 32 MiB.
_BLOCK_ELEMENTS = 1 << 22
# Queries per block: small blocks let each score only the keys its queries can see.
_MAX_QUERY_BLOCK = 32
# Below this many parameters a model counts as small (see MesaOracle's num_threads).
_SMALL_MODEL_PARAMS = 50_000_000


# --------------------------------------------------------------------------------------
# Trained length and family adapters
class UnsupportedModelError(ValueError):
    """A model the oracle (and Mesa) cannot serve; the message says why."""


@dataclass(frozen=True)
class FamilyAdapter:
    """What the oracle needs to know about one model family.

    Every family here computes ``cos, sin`` once per forward in ``<base model>.rotary_emb``,
    rotates with ``rotate_half`` (neox pairing, on the first ``rotary_dim`` channels), then
    calls the attention function registered under ``config._attn_implementation``.
    """

    model_types: tuple[str, ...]
    rotary_attr: str = "rotary_emb"
    is_neox: bool = True

    def check(self, config: Any, max_len: int | None = None) -> None:
        """Refuse configs whose attention is not plain full-causal RoPE attention.

        A ``sliding_window`` of at least ``max_len`` (the longest sequence the caller will
        run) never masks a key; it is accepted (and switched off during oracle calls,
        see :func:`unused_sliding_window`), as ``mesa_vllm.engine`` drops it for vLLM.
        """
        rope_params = getattr(config, "rope_parameters", None) or {}
        if not isinstance(rope_params, dict) or "rope_type" not in rope_params:
            raise UnsupportedModelError(
                f"model type {config.model_type!r} has no RoPE parameters in its config; "
                "Mesa-Extrapolation needs rotary position embeddings."
            )
        if any(isinstance(v, dict) for v in rope_params.values()):
            raise UnsupportedModelError(
                "per-layer-type RoPE parameters are not supported by the Mesa oracle."
            )
        sliding = getattr(config, "sliding_window", None)
        uses_sliding = getattr(config, "use_sliding_window", True)
        layer_types = getattr(config, "layer_types", None) or ()
        if unused_sliding_window(config, max_len):
            pass
        elif (sliding is not None and uses_sliding) or "sliding_attention" in layer_types:
            raise UnsupportedModelError(
                f"model uses sliding-window attention (sliding_window={sliding}); Mesa "
                "needs full causal attention. Use a checkpoint without a sliding window "
                "(or set sliding_window to null in its config)."
            )
        for attr in ("attn_logit_softcapping", "alibi"):
            if getattr(config, attr, None):
                raise UnsupportedModelError(f"config sets {attr}; not supported by Mesa.")

    def rotary_owner(self, model: nn.Module) -> nn.Module:
        base = getattr(model, "base_model", model)
        if not isinstance(getattr(base, self.rotary_attr, None), nn.Module):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no rotary module at "
                f"{type(base).__name__}.{self.rotary_attr}; is it a RoPE model?"
            )
        return base

    def rope_frequencies(self, model: nn.Module, trained_len: int) -> tuple[torch.Tensor, float]:
        """``(inv_freq, attention_scaling)`` the model itself uses for sequences of ``T``.

        Taken from a copy of the model's rotary module after running it on positions
        ``[0, T)``, so that rope types that pick their frequencies from the sequence length
        (dynamic NTK, longrope) settle to their in-range values. Static types (default,
        linear, llama3, yarn) are unaffected by the call.
        """
        rotary = copy.deepcopy(getattr(self.rotary_owner(model), self.rotary_attr))
        probe = torch.zeros(1, 1, 1, dtype=torch.float32, device=rotary.inv_freq.device)
        positions = torch.arange(trained_len, device=probe.device)[None]
        with torch.no_grad():
            rotary(probe, positions)
        inv_freq = rotary.inv_freq.detach().to("cpu", torch.float64).clone()
        scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
        return inv_freq, scaling


def unused_sliding_window(config: Any, max_len: int | None) -> bool:
    """Whether ``config`` sets a sliding window that no sequence of ``max_len`` reaches."""
    sliding = getattr(config, "sliding_window", None)
    if sliding is None or max_len is None or getattr(config, "use_sliding_window", True) is False:
        return False
    return int(sliding) >= int(max_len)


# All of these compute cos/sin in ``<base model>.rotary_emb`` and rotate the first
# ``rotary_dim = 2 * len(inv_freq)`` channels of each head with ``rotate_half`` (neox
# pairing): full rotary for Llama/Mistral/Qwen2/Qwen3, ``partial_rotary_factor`` for
# Phi-3, ``rotary_pct`` (default 0.25) for GPT-NeoX. Scaled rope types (linear, llama3,
# yarn) change only ``inv_freq`` and ``attention_scaling``, which the oracle reads from
# the module. GPT-J style (interleaved) pairing would need ``is_neox=False``; no family
# here uses it.
FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter(("llama", "mistral")),
    FamilyAdapter(("qwen2", "qwen3", "phi3", "gpt_neox")),
)


def family_for(config: Any) -> FamilyAdapter:
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(itertools.chain.from_iterable(f.model_types for f in FAMILIES))
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported by the Mesa oracle; supported: "
        f"{', '.join(supported)}."
    )


# --------------------------------------------------------------------------------------
# The attention function registered with transformers
@dataclass
class _CallState:
    """What the attention function needs to know about the forward pass in flight."""

    geometry: MesaGeometry | None
    prompt_len: int
    query_positions: torch.Tensor  # [Lq] long
    inv_freq: torch.Tensor  # float64
    rope_scale: float
    is_neox: bool


_STATE: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar(
    "mesa_oracle_state", default=None
)


def pair_rule(
    geometry: MesaGeometry | None,
    prompt_len: int,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rel, visible, query_scale)`` for every pair: the rule, or plain causal attention."""
    if geometry is None:
        p = query_positions.long().view(-1, 1)
        j = key_positions.long().view(1, -1)
        scale = torch.ones(query_positions.numel(), dtype=torch.float64)
        return p - j, j <= p, scale
    rel, visible = rule.relative_positions(geometry, prompt_len, query_positions, key_positions)
    scale = rule.query_scales(geometry, prompt_len, query_positions).to(torch.float64)
    return rel, visible, scale


def _oracle_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    state = _STATE.get()
    if state is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} only runs inside a MesaOracle call."
        )
    window = kwargs.get("sliding_window")
    if window is not None and state.geometry is not None:
        if window >= state.geometry.max_supported_len:
            window = None  # never masks a key of a sequence this oracle runs
    if window is not None or kwargs.get("sinks") is not None:
        raise UnsupportedModelError("sliding-window or sink attention reached the Mesa oracle.")
    batch, num_heads, num_queries, head_dim = query.shape
    num_kv_heads, num_keys = key.shape[1], key.shape[2]
    if batch != 1:
        raise ValueError("the Mesa oracle runs one sequence at a time (batch size 1).")
    if num_queries != state.query_positions.numel():
        raise RuntimeError("query count does not match the positions of this call.")
    if num_keys < int(state.query_positions.max()) + 1:
        raise RuntimeError("fewer keys than positions: the KV cache is out of step.")
    if scaling is None:
        scaling = getattr(module, "scaling", head_dim**-0.5)
    group = num_heads // num_kv_heads
    device = query.device
    key_positions = torch.arange(num_keys, device=device)
    inv_freq = state.inv_freq.to(device)
    half = inv_freq.numel()
    block = max(1, min(_MAX_QUERY_BLOCK, _BLOCK_ELEMENTS // max(1, num_keys * half)))

    keys = key[0].to(torch.float64)  # [Hkv, Lk, d], unrotated
    values = value[0].to(torch.float64)
    out = torch.empty(num_queries, num_heads, value.shape[-1], dtype=torch.float64, device=device)
    for start in range(0, num_queries, block):
        rows = slice(start, min(num_queries, start + block))
        positions = state.query_positions[rows].to(device)
        rel, visible, qscale = pair_rule(state.geometry, state.prompt_len, positions, key_positions)
        rel, visible, qscale = rel.to(device), visible.to(device), qscale.to(device)
        # Only score keys some query of the block can see: a key no query sees would get
        # weight exp(-inf) = 0 anyway. (Middle chunks see F + C keys, not all of them.)
        cols = torch.nonzero(visible.any(dim=0)).flatten()
        rel, visible = rel[:, cols], visible[:, cols]
        for h in range(num_heads):
            kv = h // group
            q = query[0, h, rows].to(torch.float64) * qscale[:, None]
            scores = rope.relative_scores(
                q, keys[kv, cols], rel, inv_freq, is_neox=state.is_neox, scale=state.rope_scale
            )
            scores = (scores * scaling).masked_fill(~visible, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            out[rows, h] = weights @ values[kv, cols]
    return out.to(query.dtype)[None], None  # [1, Lq, H, d], as the interface expects


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _oracle_attention)


# --------------------------------------------------------------------------------------
# The oracle
def _max_len(geometry: MesaGeometry | None) -> int | None:
    """The longest sequence an oracle with ``geometry`` runs (its stair capacity)."""
    return None if geometry is None else geometry.max_supported_len


class MesaOracle:
    """Mesa-Extrapolation (or, with ``geometry=None``, plain causal attention) on a HF model.

    ``model``: a path to a Hugging Face checkpoint or a loaded ``*ForCausalLM``. A loaded
    model is used as it is (its dtype and device are not changed); ``dtype`` and
    ``device`` apply when loading from a path. The model is only altered inside oracle
    calls and restored after each.

    ``num_threads``: torch CPU threads during oracle calls (restored after). The default,
    ``"auto"``, uses one thread for small models on CPU: their many tiny ops gain nothing
    from more, and on a busy machine (a vLLM engine in the same test run) a second
    contended thread can make them tens of times slower. ``None`` leaves torch's setting.
    """

    def __init__(
        self,
        model: str | Path | nn.Module,
        geometry: MesaGeometry | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        num_threads: int | str | None = "auto",
    ):
        if isinstance(model, (str, Path)):
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(model)
            family_for(config).check(config, _max_len(geometry))
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        self.model = model.eval()
        self.config = model.config
        self.family = family_for(self.config)
        self.family.check(self.config, _max_len(geometry))
        # A window no sequence here reaches (checked above) is switched off during calls.
        self._drop_sliding_window = unused_sliding_window(self.config, _max_len(geometry))
        self.trained_len = trained_length(self.config)
        self.geometry = geometry
        self.inv_freq, self.rope_scale = self.family.rope_frequencies(model, self.trained_len)
        self.device = next(model.parameters()).device
        if num_threads == "auto":
            small = sum(p.numel() for p in model.parameters()) < _SMALL_MODEL_PARAMS
            num_threads = 1 if small and self.device.type == "cpu" else None
        self.num_threads = num_threads
        _register_attention()

    # ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _patched(self, prompt_len: int):
        owner = self.family.rotary_owner(self.model)
        original_rotary = getattr(owner, self.family.rotary_attr)
        original_impl = self.config._attn_implementation
        original_window = getattr(self.config, "sliding_window", None)
        setattr(owner, self.family.rotary_attr, rope.NoRotation(2 * self.inv_freq.numel()))
        self.config._attn_implementation = ATTN_IMPLEMENTATION
        if self._drop_sliding_window:
            self.config.sliding_window = None
        state = _CallState(
            geometry=self.geometry,
            prompt_len=prompt_len,
            query_positions=torch.zeros(0, dtype=torch.long),
            inv_freq=self.inv_freq,
            rope_scale=self.rope_scale,
            is_neox=self.family.is_neox,
        )
        token = _STATE.set(state)
        threads_before = torch.get_num_threads()
        change_threads = bool(self.num_threads) and int(self.num_threads) != threads_before
        if change_threads:
            torch.set_num_threads(int(self.num_threads))
        try:
            yield state
        finally:
            if change_threads:
                torch.set_num_threads(threads_before)
            _STATE.reset(token)
            self.config._attn_implementation = original_impl
            if self._drop_sliding_window:
                self.config.sliding_window = original_window
            setattr(owner, self.family.rotary_attr, original_rotary)

    def _check_length(self, total_len: int, prompt_len: int) -> None:
        if prompt_len < 1 or prompt_len > total_len:
            raise ValueError(f"prompt_len={prompt_len} must be in [1, {total_len}].")
        g = self.geometry
        if g is not None and total_len > g.max_supported_len:
            raise ValueError(
                f"sequence of {total_len} tokens exceeds this geometry's stair capacity "
                f"E * (T - 1 - R) = {g.max_supported_len}; relative positions would reach T."
            )

    def _forward(
        self, state: _CallState, ids: list[int], start: int, cache: Any | None
    ) -> tuple[torch.Tensor, Any]:
        positions = torch.arange(start, start + len(ids), dtype=torch.long)
        state.query_positions = positions
        out = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
            position_ids=positions[None].to(self.device),
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out.logits[0].float(), cache

    # ----------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, token_ids: list[int], prompt_len: int | None = None) -> torch.Tensor:
        """``[len, vocab]`` float32 logits of a full recompute; roles from ``prompt_len``."""
        token_ids = list(token_ids)
        prompt_len = len(token_ids) if prompt_len is None else int(prompt_len)
        self._check_length(len(token_ids), prompt_len)
        with self._patched(prompt_len) as state:
            logits, _ = self._forward(state, token_ids, 0, None)
        return logits.cpu()

    def prompt_logprobs(self, token_ids: list[int]) -> list[float | None]:
        """``[None, logp(t1 | t0), logp(t2 | t0 t1), ...]`` with ``prompt_len = len(token_ids)``."""
        token_ids = list(token_ids)
        logprobs = torch.log_softmax(self.logits(token_ids).double(), dim=-1)
        return [None] + [float(logprobs[i - 1, t]) for i, t in enumerate(token_ids) if i > 0]

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, *, eos_token_id: int | None = None
    ) -> tuple[list[int], list[float], torch.Tensor]:
        """Greedy decoding with a cache of unrotated K/V: ``(ids, logprobs, step_logits)``.

        ``step_logits[i]`` (float32, ``[n, vocab]``) are the logits that chose ``ids[i]``.
        Roles come from ``len(prompt_ids)``. Generation stops after ``max_new_tokens`` or
        right after emitting ``eos_token_id`` (kept in the output), if one is given.
        """
        from transformers import DynamicCache

        prompt_ids = list(prompt_ids)
        prompt_len = len(prompt_ids)
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0.")
        self._check_length(prompt_len + max_new_tokens, prompt_len)
        ids: list[int] = []
        logprobs: list[float] = []
        steps: list[torch.Tensor] = []
        if max_new_tokens == 0:
            return ids, logprobs, torch.zeros(0, self.config.vocab_size)
        with self._patched(prompt_len) as state:
            cache = DynamicCache(config=self.config)
            logits, cache = self._forward(state, prompt_ids, 0, cache)
            last = logits[-1]
            while True:
                token = int(torch.argmax(last))
                ids.append(token)
                logprobs.append(float(torch.log_softmax(last.double(), dim=-1)[token]))
                steps.append(last.cpu())
                if len(ids) == max_new_tokens or token == eos_token_id:
                    break
                logits, cache = self._forward(state, [token], prompt_len + len(ids) - 1, cache)
                last = logits[-1]
        return ids, logprobs, torch.stack(steps)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
        """Generated token ids only (greedy, incremental)."""
        return self.generate(prompt_ids, max_new_tokens, **kwargs)[0]

    def greedy_with_logprobs(
        self, prompt_ids: list[int], max_new_tokens: int, **kwargs: Any
    ) -> tuple[list[int], list[float]]:
        """Generated ids and the log-probability of each chosen token."""
        ids, logprobs, _ = self.generate(prompt_ids, max_new_tokens, **kwargs)
        return ids, logprobs


def load_oracle(
    model_path: str | Path,
    *,
    T: int | None = None,
    max_model_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_threads: int | str | None = "auto",
    **mesa_overrides: Any,
) -> MesaOracle:
    """A :class:`MesaOracle` with the same default geometry the backend would pick.

    ``T`` defaults to the model's trained length, ``max_model_len`` to ``4 T``;
    ``mesa_overrides`` are ``F, C, R, E, log_n`` as in ``additional_config["mesa"]``.
    """
    from transformers import AutoConfig

    from mesa_vllm import params

    config = AutoConfig.from_pretrained(model_path)
    family = family_for(config)
    T = int(T or trained_length(config))
    max_model_len = int(max_model_len or params.default_max_model_len(T))
    geometry = params.resolve_geometry(T, max_model_len, mesa_overrides)
    family.check(config, _max_len(geometry))
    return MesaOracle(model_path, geometry, dtype=dtype, device=device, num_threads=num_threads)


__all__ = [
    "ATTN_IMPLEMENTATION",
    "FAMILIES",
    "FamilyAdapter",
    "MesaOracle",
    "UnsupportedModelError",
    "family_for",
    "load_oracle",
    "pair_rule",
    "trained_length",
    "unused_sliding_window",
]
