"""One flag switches Mesa on: configure vLLM's engine arguments for the MESA backend.

Runs in the process that builds the engine config (the ``LLM`` caller or the API
server), before vLLM creates its ``ModelConfig``, when the attention backend is ``mesa``
(or ``CUSTOM``, which mesa-vllm registers to the same class). It:

1. reads the model's config, refuses models Mesa cannot serve (no RoPE: ALiBi or absolute
   positions; rope types whose angles depend on the sequence length; a sliding window
   that masks keys below ``max_model_len``; an architecture without a Mesa class) with a
   message naming what is supported, and drops a sliding window that never masks;
2. resolves and validates ``F, C, R, E, log_n`` from ``T``, ``max_model_len`` and the
   user's overrides (``additional_config={"mesa": {...}}`` or ``MESA_*`` env vars), and
   logs the effective values once;
3. sets Hugging Face config overrides that every engine process receives:
   ``architectures`` -> the registered Mesa class, ``max_position_embeddings`` ->
   ``max_model_len`` (so the model's own rotary table reaches it and vLLM accepts the
   length), ``rswa_window`` (so the runner hands prompt lengths to attention
   builders), ``mesa_geometry`` (the parameters, as JSON), and ``sliding_window`` ->
   ``None`` when the config's window is at least ``max_model_len`` (it never masks).

With ``max_model_len`` unset, Mesa serves ``DEFAULT_EXTENSION x T``.
"""

from __future__ import annotations

import os
from typing import Any

from mesa_vllm.params import (
    GEOMETRY_CONFIG_KEY,
    MesaConfigError,
    default_max_model_len,
    describe,
    geometry_to_json,
    read_overrides,
    resolve_geometry,
    trained_length,
)

_BACKEND_NAMES = {"MESA", "CUSTOM"}


def _backend_name(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.upper()
    return getattr(value, "name", None)


def mesa_requested(engine_args: Any) -> bool:
    names = {_backend_name(getattr(engine_args, "attention_backend", None))}
    attention_config = getattr(engine_args, "attention_config", None)
    if isinstance(attention_config, dict):
        names.add(_backend_name(attention_config.get("backend")))
    elif attention_config is not None:
        names.add(_backend_name(getattr(attention_config, "backend", None)))
    if "MESA" in names:
        return True
    if "CUSTOM" in names:
        from mesa_vllm import BACKEND_PATH
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        return AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
    return False


# Model types whose positions are not rotary: Mesa re-maps RoPE relative positions.
_ALIBI_MODEL_TYPES = ("mpt", "bloom", "jais")
_ABSOLUTE_MODEL_TYPES = ("gpt2", "opt", "gpt_bigcode", "gpt_neo", "biogpt", "xglm")

# Why each length-dependent (or unverified) rope type is refused.
_ROPE_TYPE_REASONS = {
    "dynamic": "dynamic NTK scaling recomputes the frequencies from the sequence length",
    "longrope": "LongRoPE switches between short and long frequency tables by sequence length",
    "su": "LongRoPE ('su') switches between short and long frequency tables by sequence length",
    "mrope": "M-RoPE rotates by multimodal position triples, not one position per token",
}


def _position_kind(hf_config: Any) -> str | None:
    """``"ALiBi"`` or ``"absolute position embeddings"`` for non-RoPE models, else None."""
    model_type = getattr(hf_config, "model_type", "")
    if getattr(hf_config, "alibi", False) or model_type in _ALIBI_MODEL_TYPES or getattr(
        hf_config, "position_embedding_type", "rope"
    ) == "alibi":
        return "ALiBi attention biases"
    if model_type in _ABSOLUTE_MODEL_TYPES or getattr(
        hf_config, "position_embedding_type", "rope"
    ) in ("absolute", "learned"):
        return "absolute (learned) position embeddings"
    return None


def _rope_parameters(hf_config: Any) -> dict:
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = getattr(hf_config, "rope_scaling", None)
    return dict(params) if isinstance(params, dict) else {}


def _check_rope(hf_config: Any, arch: str, supported: str) -> None:
    from mesa_vllm.models.base import STATIC_ROPE_TYPES

    params = _rope_parameters(hf_config)
    if any(isinstance(v, dict) for v in params.values()):
        raise MesaConfigError(
            f"{arch} has per-layer-type RoPE parameters ({', '.join(params)}); mesa supports "
            "one rotation for every layer. Supported architectures: " + supported + "."
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if "mrope_section" in params or getattr(hf_config, "mrope_section", None):
        rope_type = "mrope"
    problems = []
    if rope_type not in STATIC_ROPE_TYPES:
        reason = _ROPE_TYPE_REASONS.get(rope_type, "mesa has not been verified with it")
        problems.append(
            f"rope_type={rope_type!r}: {reason}. Mesa rotates keys once at fixed positions, so "
            f"it needs a fixed angle per position (supported rope types: "
            f"{', '.join(STATIC_ROPE_TYPES)})"
        )
    if params.get("use_fope"):
        problems.append("Fourier RoPE (use_fope) is not supported")
    if getattr(hf_config, "dual_chunk_attention_config", None):
        problems.append("dual-chunk attention replaces the positions itself")
    if getattr(hf_config, "llama_4_scaling", None):
        problems.append("Llama-4 attention scaling scales queries by their absolute position")
    if getattr(hf_config, "is_causal", True) is False:
        problems.append("it is a bidirectional (non-causal) model")
    if problems:
        raise MesaConfigError(
            f"{arch} cannot run on the mesa backend: {'; '.join(problems)}. Serve it without "
            f"--attention-backend mesa. Supported architectures: {supported}."
        )


def sliding_window_overrides(hf_config: Any, max_model_len: int) -> dict[str, Any]:
    """Refuse a sliding window that masks keys; drop one that never can.

    vLLM applies ``sliding_window`` to every layer (or to the ``sliding_attention`` ones
    in ``layer_types``). A window of at least ``max_model_len`` keys never masks one, so
    it is overridden to ``None`` (Mistral's config class defaults it to 4096 and many
    checkpoints carry a large one). A shorter window is part of the model: mesa, which
    needs full attention, refuses it (Mistral 7B v0.1: 4096; Phi-3-mini-4k: 2047).
    """
    arch = (list(getattr(hf_config, "architectures", None) or []) or ["model"])[0]
    window = getattr(hf_config, "sliding_window", None)
    layer_types = list(getattr(hf_config, "layer_types", None) or [])
    if window is None or getattr(hf_config, "use_sliding_window", True) is False:
        if "sliding_attention" in layer_types:
            raise MesaConfigError(
                f"{arch} declares sliding-attention layers without a window size; mesa needs "
                "full attention in every layer."
            )
        return {}
    if layer_types and "sliding_attention" not in layer_types:
        return {}  # a window no layer uses
    if int(window) >= max_model_len:
        return {"sliding_window": None}
    raise MesaConfigError(
        f"{arch} uses sliding-window attention (sliding_window={window}) below "
        f"max_model_len={max_model_len}; Mesa needs full attention in every layer. If the "
        "checkpoint was trained with full attention (the window only caps memory), override "
        'it: --hf-overrides \'{"sliding_window": null}\'.'
    )


def check_model_supported(hf_config: Any, max_model_len: int | None = None) -> str:
    """Return the Mesa architecture for this config, or refuse with the reason.

    Refuses models without RoPE (ALiBi, absolute positions), architectures without a Mesa
    class, rope types whose angles depend on the sequence length, and (when
    ``max_model_len`` is given) sliding windows that would mask keys.
    """
    from mesa_vllm.models import MESA_ARCHITECTURES, supported_architectures

    archs = list(getattr(hf_config, "architectures", None) or [])
    arch = archs[0] if archs else getattr(hf_config, "model_type", "unknown")
    supported = ", ".join(supported_architectures())
    kind = _position_kind(hf_config)
    if kind is not None:
        raise MesaConfigError(
            f"{arch} does not use rotary position embeddings (RoPE): it uses {kind}. "
            "Mesa-Extrapolation weaves RoPE relative positions and cannot extend it. "
            f"Supported architectures: {supported}."
        )
    if arch not in MESA_ARCHITECTURES:
        raise MesaConfigError(
            f"architecture {arch} is not supported by the mesa backend. Supported "
            f"architectures: {supported}. Serve it without --attention-backend mesa."
        )
    _check_rope(hf_config, arch, supported)
    if max_model_len is not None:
        sliding_window_overrides(hf_config, max_model_len)
    return MESA_ARCHITECTURES[arch][0]


def mesa_hf_overrides(hf_config: Any, max_model_len: int, geometry_json: str) -> dict[str, Any]:
    """The Hugging Face config overrides that make vLLM build the Mesa model.

    ``max_position_embeddings`` is raised to ``max_model_len`` so vLLM accepts the length
    and the default, Llama-3 and linear rotary tables reach it. None of the supported
    rope types takes its frequencies from ``max_position_embeddings`` once the config is
    loaded (Llama-3 and YaRN read ``original_max_position_embeddings`` from the rope
    parameters, which transformers fills in from the original ``max_position_embeddings``
    when the config is built, before overrides apply); ``tests/test_rotary_tables.py``
    checks that the tables equal vLLM's stock ones below ``T``. YaRN's table length does
    not follow the config; ``mesa_vllm.models.base`` extends it.
    """
    return {
        "architectures": [check_model_supported(hf_config, max_model_len)],
        "max_position_embeddings": max(max_model_len, int(hf_config.max_position_embeddings)),
        "rswa_window": max_model_len,
        GEOMETRY_CONFIG_KEY: geometry_json,
        **sliding_window_overrides(hf_config, max_model_len),
    }


def configure_engine_args(engine_args: Any) -> None:
    """Rewrite ``engine_args`` in place for the MESA backend (process0 only)."""
    from vllm.logger import init_logger
    from vllm.transformers_utils.config import get_config

    logger = init_logger("mesa_vllm")
    user_overrides = engine_args.hf_overrides or {}
    if callable(user_overrides):
        raise MesaConfigError(
            "--attention-backend mesa needs hf_overrides as a dict, not a function."
        )
    if user_overrides.get(GEOMETRY_CONFIG_KEY):  # already configured (EngineArgs reused)
        return
    hf_config = get_config(
        engine_args.hf_config_path or engine_args.model,
        engine_args.trust_remote_code,
        engine_args.revision,
        engine_args.code_revision,
        engine_args.config_format,
        hf_overrides_kw=dict(user_overrides),
    )
    if str(getattr(engine_args, "model_impl", "auto")).lower().endswith("transformers"):
        raise MesaConfigError(
            "--attention-backend mesa runs its own model classes; drop --model-impl "
            "transformers (mesa picks vLLM's Transformers backend itself where that is how "
            "vLLM serves the architecture)."
        )
    check_model_supported(hf_config)
    T = trained_length(hf_config)
    max_model_len = engine_args.max_model_len or default_max_model_len(T)
    mesa_user = (engine_args.additional_config or {}).get("mesa") or {}
    if not isinstance(mesa_user, dict):
        raise MesaConfigError(
            'additional_config["mesa"] must be a dict such as {"E": 8, "R": 1024}.'
        )
    geometry = resolve_geometry(T, max_model_len, read_overrides(mesa_user))
    overrides = mesa_hf_overrides(hf_config, max_model_len, geometry_to_json(geometry))
    engine_args.max_model_len = max_model_len
    engine_args.hf_overrides = {**user_overrides, **overrides}
    if "sliding_window" in overrides:
        logger.info(
            "mesa: sliding_window=%s >= max_model_len=%d never masks a key; dropped.",
            hf_config.sliding_window, max_model_len,
        )
    logger.info("%s", describe(geometry, max_model_len))


# vLLM kills the engine (EngineDeadError) when one model step runs longer than
# VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300 s by default). On a 2-core CPU one 8k-token prefill
# step of the default backend at 64k context takes longer than that (measured: its 64k bench
# cell died after ~30 min of prefill), so the bench and the eval raise the limit unless the
# user set it: slow cells are then measured instead of lost.
LONG_STEP_TIMEOUT_S = 4 * 3600


def allow_long_steps() -> None:
    """Raise vLLM's per-step timeout for engines built after this call (env is inherited)."""
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", str(LONG_STEP_TIMEOUT_S))
