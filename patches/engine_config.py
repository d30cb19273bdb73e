"""One flag switches Mesa on: configure the engine when the MESA backend is selected."""

from __future__ import annotations

from mesa_vllm_patches import Patch, require_signature

TARGET = "vllm.engine.arg_utils.EngineArgs.create_engine_config"


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_mesa_patched", False):
        return
    original = EngineArgs.create_engine_config
    require_signature(original, ["self", "usage_context", "headless"], TARGET)

    def create_engine_config(self, usage_context=None, headless=False):
        from mesa_vllm.engine import configure_engine_args, mesa_requested

        if mesa_requested(self):
            configure_engine_args(self)
        return original(self, usage_context=usage_context, headless=headless)

    create_engine_config.__wrapped__ = original
    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._mesa_patched = True


PATCH = Patch(
    name="engine_config",
    target=TARGET,
    why=(
        "`--attention-backend mesa` alone must turn on everything Mesa needs (hazard 9): the "
        "Mesa model class, rotary tables that reach max_model_len, prompt lengths for the "
        "builder, validated parameters. Those live in the model config, which vLLM builds "
        "inside create_engine_config, after the backend flag is parsed."
    ),
    how=(
        "Wrap create_engine_config: if the selected backend is MESA (or CUSTOM registered to "
        "mesa-vllm), mesa_vllm.engine.configure_engine_args validates the model and "
        "parameters and sets hf_overrides and max_model_len before the original runs. "
        "Without the flag the original runs untouched."
    ),
    upstream="No upstream hook lets an attention backend adjust the model config before it is built.",
    remove_when="vLLM offers a per-backend config hook (e.g. AttentionBackend.verify_and_update_config).",
    apply=apply,
)
