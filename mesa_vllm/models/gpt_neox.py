"""Mesa GPT-NeoX / Pythia (``GPTNeoXForCausalLM``: partial rotary, ``rotary_pct``).

vLLM serves GPT-NeoX through its Transformers modeling backend (the Hugging Face model
with vLLM's attention layers), so this class subclasses ``TransformersForCausalLM``;
``hand_rotary_to_backend`` takes the rotation table from the Hugging Face rotary module.
"""

from vllm.config import VllmConfig
from vllm.model_executor.models.transformers import TransformersForCausalLM

from mesa_vllm.models.base import MesaTransformersMixin, hand_rotary_to_backend


class MesaGPTNeoXForCausalLM(MesaTransformersMixin, TransformersForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hand_rotary_to_backend(self, vllm_config)
