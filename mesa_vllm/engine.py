"""One flag switches Mesa on: configure vLLM's engine arguments for the MESA backend.

Runs in the process that builds the engine config (the ``LLM`` caller or the API
server), before vLLM creates its ``ModelConfig``, when the attention backend is ``mesa``
(or ``CUSTOM``, which mesa-vllm registers to the same class). It:

1. reads the model's config, refuses models Mesa cannot serve (no RoPE, sliding window,
   unsupported architecture) with a message naming what is supported;
2. resolves and validates ``F, C, R, E, log_n`` from ``T``, ``max_model_len`` and the
   user's overrides (``additional_config={"mesa": {...}}`` or ``MESA_*`` env vars), and
   logs the effective values once;
3. sets Hugging Face config overrides that every engine process receives:
   ``architectures`` -> the registered Mesa class, ``max_position_embeddings`` ->
   ``max_model_len`` (so the model's own rotary table reaches it and vLLM accepts the
   length), ``rswa_window`` (so the runner hands prompt lengths to attention
   builders), and ``mesa_geometry`` (the parameters, as JSON).

With ``max_model_len`` unset, Mesa serves ``DEFAULT_EXTENSION x T``.
"""

from __future__ import annotations

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


def check_model_supported(hf_config: Any) -> str:
    """Return the Mesa architecture for this config, or refuse with the reason."""
    from mesa_vllm.models import MESA_ARCHITECTURES, supported_architectures

    archs = list(getattr(hf_config, "architectures", None) or [])
    arch = archs[0] if archs else getattr(hf_config, "model_type", "unknown")
    supported = ", ".join(supported_architectures())
    if getattr(hf_config, "alibi", False) or getattr(hf_config, "position_embedding_type", "rope") in (
        "alibi", "absolute", "learned",
    ) or getattr(hf_config, "model_type", "") in ("mpt", "gpt2", "bloom", "opt", "gpt_bigcode"):
        raise MesaConfigError(
            f"{arch} does not use rotary position embeddings (RoPE); Mesa-Extrapolation "
            f"weaves RoPE positions and cannot extend it. Supported architectures: {supported}."
        )
    if arch not in MESA_ARCHITECTURES:
        raise MesaConfigError(
            f"architecture {arch} is not supported by the mesa backend. Supported "
            f"architectures: {supported}. Serve it without --attention-backend mesa."
        )
    layer_types = getattr(hf_config, "layer_types", None) or []
    sliding = getattr(hf_config, "sliding_window", None)
    uses_sliding = (
        any(t == "sliding_attention" for t in layer_types)
        or (sliding is not None and getattr(hf_config, "use_sliding_window", True) and not layer_types)
    )
    if uses_sliding:
        raise MesaConfigError(
            f"{arch} uses sliding-window attention (sliding_window={sliding}); Mesa needs "
            "full attention in every layer. If the checkpoint does not really need the "
            'window, override it: --hf-overrides \'{"sliding_window": null}\'.'
        )
    return MESA_ARCHITECTURES[arch][0]


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
    mesa_arch = check_model_supported(hf_config)
    T = trained_length(hf_config)
    max_model_len = engine_args.max_model_len or default_max_model_len(T)
    mesa_user = (engine_args.additional_config or {}).get("mesa") or {}
    if not isinstance(mesa_user, dict):
        raise MesaConfigError(
            'additional_config["mesa"] must be a dict such as {"E": 8, "R": 1024}.'
        )
    geometry = resolve_geometry(T, max_model_len, read_overrides(mesa_user))
    engine_args.max_model_len = max_model_len
    engine_args.hf_overrides = {
        **user_overrides,
        "architectures": [mesa_arch],
        "max_position_embeddings": max(max_model_len, int(hf_config.max_position_embeddings)),
        "rswa_window": max_model_len,
        GEOMETRY_CONFIG_KEY: geometry_to_json(geometry),
    }
    logger.info("%s", describe(geometry, max_model_len))
