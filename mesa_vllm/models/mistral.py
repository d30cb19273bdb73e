"""Mesa Mistral (``MistralForCausalLM``: Mistral 7B v0.2+, Mistral Nemo, Mistral Small).

Checkpoints whose ``sliding_window`` actually masks keys (Mistral 7B v0.1: 4096) are
refused by ``mesa_vllm.engine``; a window at least ``max_model_len`` long never masks
anything and is dropped there.
"""

from vllm.config import VllmConfig
from vllm.model_executor.models.mistral import MistralForCausalLM

from mesa_vllm.models.base import hand_rotary_to_backend


class MesaMistralForCausalLM(MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hand_rotary_to_backend(self, vllm_config)
