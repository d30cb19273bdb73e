"""Let the CPU platform honour ``--attention-backend mesa``."""

from __future__ import annotations

from mesa_vllm_patches import Patch, require_signature

TARGET = "vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls"


def apply() -> None:
    from vllm.platforms.cpu import CpuPlatform

    if getattr(CpuPlatform, "_mesa_patched", False):
        return
    original = CpuPlatform.get_attn_backend_cls.__func__
    require_signature(
        original, ["cls", "selected_backend", "attn_selector_config", "num_heads"], TARGET
    )

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from mesa_vllm import BACKEND_PATH

        if (
            selected_backend is not None
            and selected_backend.name in ("MESA", "CUSTOM")
            and selected_backend.get_path() == BACKEND_PATH
            and not attn_selector_config.use_mla
        ):
            return BACKEND_PATH
        return original(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    CpuPlatform._mesa_patched = True


PATCH = Patch(
    name="cpu_platform_backend",
    target=TARGET,
    why=(
        "The CPU platform ignores every user-selected attention backend except CPU_ATTN "
        "(it logs 'Cannot use ... backend on CPU' and returns CPU_ATTN; notes B1), so "
        "`--attention-backend mesa` would silently run the default backend."
    ),
    how=(
        "Wrap the classmethod: when the selected backend is MESA, or CUSTOM registered to "
        "mesa-vllm, return mesa's backend path; otherwise defer to the original."
    ),
    upstream="CPU platform hard-codes CPU_ATTN in vLLM 0.32; CUDA honours any selected backend.",
    remove_when="CpuPlatform.get_attn_backend_cls honours registered custom backends.",
    apply=apply,
)
