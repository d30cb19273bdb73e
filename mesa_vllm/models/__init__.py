"""Mesa-aware model classes, registered with vLLM's ``ModelRegistry``.

``MESA_ARCHITECTURES`` maps a Hugging Face architecture to its Mesa class. When the MESA
backend is selected, ``mesa_vllm.engine`` swaps the architecture in the model's config so
vLLM builds the Mesa class; without the flag nothing changes.
"""

from __future__ import annotations

# HF architecture -> (registered Mesa architecture, "module:Class")
MESA_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("MesaLlamaForCausalLM", "mesa_vllm.models.llama:MesaLlamaForCausalLM"),
}


def register_models() -> None:
    from vllm import ModelRegistry

    for mesa_arch, target in MESA_ARCHITECTURES.values():
        if mesa_arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(mesa_arch, target)


def supported_architectures() -> list[str]:
    return sorted(MESA_ARCHITECTURES)
