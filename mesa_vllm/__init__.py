"""mesa-vllm: Mesa-Extrapolation as a vLLM attention backend plugin.

Install it and start vLLM with ``--attention-backend mesa`` (or
``LLM(..., attention_backend="mesa")``). Importing this package changes nothing in vLLM;
vLLM's plugin loader calls :func:`register` in every engine process.
"""

__version__ = "0.1.0"

BACKEND_PATH = "mesa_vllm.attention.backend.MesaAttentionBackend"


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins: mesa``). Idempotent.

    Registers the ``MESA`` attention backend (also as ``CUSTOM``), the Mesa model
    classes, and the documented patches in ``patches/`` (``mesa_vllm_patches``).
    """
    from mesa_vllm.models import register_models
    from mesa_vllm_patches import apply_all

    apply_all()
    register_models()
