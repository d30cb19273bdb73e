"""Mesa Phi-3 (``Phi3ForCausalLM``: fused ``qkv_proj``, optional partial rotary).

Phi-3 checkpoints with LongRoPE (the 128k variants, Phi-3.5, Phi-4-mini) switch rotation
tables with the sequence length and are refused by ``mesa_vllm.engine``.
"""

from vllm.config import VllmConfig
from vllm.model_executor.models.phi3 import Phi3ForCausalLM

from mesa_vllm.models.base import hand_rotary_to_backend


class MesaPhi3ForCausalLM(Phi3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hand_rotary_to_backend(self, vllm_config)
