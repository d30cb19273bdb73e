"""Mesa Llama family (Llama 1/2/3, SmolLM, Mistral-style configs served by LlamaForCausalLM)."""

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM

from mesa_vllm.models.base import hand_rotary_to_backend


class MesaLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hand_rotary_to_backend(self, vllm_config)
