"""Prefix caching stays exact under Mesa: block hashes carry the tokens' Mesa role."""

from __future__ import annotations

from mesa_vllm_patches import Patch, require_attribute, require_signature

TARGET = (
    "vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys and "
    "vllm.v1.engine.core.EngineCore.__init__"
)


def apply() -> None:
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine.core import EngineCore

    if getattr(kv_cache_utils, "_mesa_patched", False):
        return
    original_keys = require_attribute(
        kv_cache_utils, "generate_block_hash_extra_keys", TARGET
    )
    require_signature(
        original_keys, ["request", "start_token_idx", "end_token_idx", "start_mm_idx"], TARGET
    )
    original_init = EngineCore.__init__

    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm_idx = original_keys(request, start_token_idx, end_token_idx, start_mm_idx)
        geometry = getattr(request, "_mesa_geometry", None)
        if geometry is not None:
            role = geometry.cache_role_key(request.num_prompt_tokens, end_token_idx)
            if role is not None:
                keys = (*(keys or ()), role)
        return keys, next_mm_idx

    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        from mesa_vllm.params import GEOMETRY_CONFIG_KEY, geometry_from_hf_config

        hf_config = vllm_config.model_config.hf_config
        hasher = getattr(self, "request_block_hasher", None)
        if hasher is None or getattr(hf_config, GEOMETRY_CONFIG_KEY, None) is None:
            return
        geometry = geometry_from_hf_config(hf_config)

        def mesa_block_hasher(request):
            request._mesa_geometry = geometry
            return hasher(request)

        self.request_block_hasher = mesa_block_hasher

    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys
    EngineCore.__init__ = __init__
    kv_cache_utils._mesa_patched = True


PATCH = Patch(
    name="prefix_cache_roles",
    target=TARGET,
    why=(
        "vLLM reuses a cached block when the token ids of its prefix match, but under Mesa "
        "a token's K/V depend on its role, which depends on the prompt length (notes §9.1): "
        "a final-region token of one request is a middle-chunk token of a longer one. "
        "Reusing such blocks would silently break exactness."
    ),
    how=(
        "Mesa engines wrap the request block hasher so each request carries the Mesa "
        "geometry; the extra-keys function then appends MesaGeometry.cache_role_key(L, "
        "block_end) to each block's hash. Blocks whose tokens have the same role in two "
        "requests (first chunk and plain prefix: no key; middle chunks of long prompts; "
        "short prompts; stair regions with the same start b) keep matching hashes and are "
        "reused; the others never match. Non-Mesa engines are untouched."
    ),
    upstream="No upstream API lets an attention backend add block-hash keys (only LoRA, multimodal, cache_salt, prompt embeds).",
    remove_when="vLLM lets a backend contribute per-block hash keys.",
    apply=apply,
)
