"""Mesa-aware model classes, registered with vLLM's ``ModelRegistry``.

``MESA_ARCHITECTURES`` maps a Hugging Face architecture to its Mesa class. When the MESA
backend is selected, ``mesa_vllm.engine`` swaps the architecture in the model's config so
vLLM builds the Mesa class; without the flag nothing changes.

Each Mesa class is vLLM's own class for that architecture (the one vLLM's registry maps
it to) plus :func:`mesa_vllm.models.base.hand_rotary_to_backend`.
"""

from __future__ import annotations

# HF architecture -> (registered Mesa architecture, "module:Class")
MESA_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("MesaLlamaForCausalLM", "mesa_vllm.models.llama:MesaLlamaForCausalLM"),
    "MistralForCausalLM": (
        "MesaMistralForCausalLM", "mesa_vllm.models.mistral:MesaMistralForCausalLM"
    ),
    "Qwen2ForCausalLM": ("MesaQwen2ForCausalLM", "mesa_vllm.models.qwen2:MesaQwen2ForCausalLM"),
    "Phi3ForCausalLM": ("MesaPhi3ForCausalLM", "mesa_vllm.models.phi3:MesaPhi3ForCausalLM"),
    # vLLM serves it through its Transformers modeling backend.
    "GPTNeoXForCausalLM": (
        "MesaGPTNeoXForCausalLM", "mesa_vllm.models.gpt_neox:MesaGPTNeoXForCausalLM"
    ),
}


def register_models() -> None:
    from vllm import ModelRegistry

    for mesa_arch, target in MESA_ARCHITECTURES.values():
        if mesa_arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(mesa_arch, target)


def supported_architectures() -> list[str]:
    return sorted(MESA_ARCHITECTURES)
