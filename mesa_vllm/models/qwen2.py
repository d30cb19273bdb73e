"""Mesa Qwen2 (``Qwen2ForCausalLM``: Qwen2, Qwen2.5; q/k/v projections with bias)."""

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from mesa_vllm.models.base import hand_rotary_to_backend


class MesaQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hand_rotary_to_backend(self, vllm_config)
