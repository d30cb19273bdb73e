"""Mesa rotates with the model's own rotation, whatever the rope variant.

``mesa_vllm.engine`` raises ``max_position_embeddings`` to ``max_model_len`` so the rotary
tables reach it; that must not change a single frequency. For every supported variant the
table mesa hands the backend (``mesa_vllm.models.base``) equals vLLM's stock table on every
position the stock table has (so on all of ``[0, T)``), reaches ``max_model_len``, and agrees
with Hugging Face's own rotary module below ``T`` (which the oracle uses). Config files
only: no weights, no engine.

Also: the backend's rotation op pairs channels as the table says (neox or gpt-j) and leaves
channels past ``rotary_dim`` alone (partial rotary).
"""

from __future__ import annotations

import pytest
import torch

from mesa_vllm import rope
from mesa_vllm.attention import ops
from mesa_vllm.testing import TINY_VOCAB

pytestmark = [pytest.mark.cpu]

T = 64
MAX_MODEL_LEN = 8 * T
HF_ATOL = 1e-5  # fp32 tables; inv_freq computed by two codes


def _config(kind):
    from transformers import GPTNeoXConfig, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256,
                  num_hidden_layers=1, num_attention_heads=4, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    rope_theta = {"rope_theta": 10000.0}
    return {
        "default": lambda: LlamaConfig(**common, max_position_embeddings=T),
        # T is the original length; the config serves 4T.
        "llama3": lambda: LlamaConfig(**common, max_position_embeddings=4 * T, rope_parameters={
            "rope_type": "llama3", **rope_theta, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": T}),
        "linear": lambda: LlamaConfig(**common, max_position_embeddings=T, rope_parameters={
            "rope_type": "linear", **rope_theta, "factor": 2.0}),
        # vLLM builds YaRN's table for original * factor = 4T positions: mesa extends it.
        "yarn": lambda: LlamaConfig(**common, max_position_embeddings=4 * T, rope_parameters={
            "rope_type": "yarn", **rope_theta, "factor": 4.0,
            "original_max_position_embeddings": T}),
        # YaRN without an explicit original length: transformers fills in the config's.
        "yarn_implicit": lambda: LlamaConfig(**common, max_position_embeddings=T, rope_parameters={
            "rope_type": "yarn", **rope_theta, "factor": 2.0}),
        "qwen2": lambda: Qwen2Config(**common, max_position_embeddings=T, rope_theta=1e6),
        "phi3_partial": lambda: Phi3Config(**common, max_position_embeddings=T,
                                           partial_rotary_factor=0.5, sliding_window=None),
        "gpt_neox": lambda: GPTNeoXConfig(**common, max_position_embeddings=T, rotary_pct=0.25),
    }[kind]()


def _vllm_configs(tmp_path, kind):
    """(stock, mesa) configs as vLLM loads them: as saved, and with mesa's overrides."""
    from mesa_vllm.engine import mesa_hf_overrides
    from vllm.transformers_utils.config import get_config

    config = _config(kind)
    config.architectures = [{"gpt_neox": "GPTNeoXForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "phi3_partial": "Phi3ForCausalLM"}.get(kind, "LlamaForCausalLM")]
    config.save_pretrained(tmp_path)
    stock = get_config(str(tmp_path), False)
    overrides = mesa_hf_overrides(stock, MAX_MODEL_LEN, "{}")
    mesa = get_config(str(tmp_path), False, hf_overrides_kw=overrides)
    assert mesa.max_position_embeddings >= MAX_MODEL_LEN
    return stock, mesa


def _vllm_rotary(config):
    """The rotary embedding vLLM's Llama/Qwen2/Phi-3 attention builds from ``config``."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    head_dim = config.hidden_size // config.num_attention_heads
    with set_current_vllm_config(VllmConfig()):
        return get_rope(head_dim, max_position=config.max_position_embeddings,
                        rope_parameters=config.rope_parameters, is_neox_style=True,
                        dtype=torch.float32)


def _hf_rotary(config):
    from transformers import AutoModelForCausalLM

    from mesa_vllm.oracle import family_for

    model = AutoModelForCausalLM.from_config(config)
    family = family_for(config)
    return getattr(family.rotary_owner(model), family.rotary_attr)


@pytest.mark.parametrize(
    "kind", ["default", "llama3", "linear", "yarn", "yarn_implicit", "qwen2", "phi3_partial"]
)
def test_vllm_table_is_the_stock_one_extended(tmp_path, kind):
    from mesa_vllm.models.base import hf_rotary_table, vllm_rotary_table
    from mesa_vllm.params import trained_length

    stock_config, mesa_config = _vllm_configs(tmp_path, kind)
    assert trained_length(stock_config) == T
    stock = _vllm_rotary(stock_config).cos_sin_cache
    table = vllm_rotary_table(_vllm_rotary(mesa_config), MAX_MODEL_LEN)
    assert stock.shape[0] >= T and table.shape[0] >= MAX_MODEL_LEN
    assert table.shape[1] == stock.shape[1]
    assert torch.equal(table[: stock.shape[0]], stock)
    # ... and is the rotation Hugging Face's model (and so the oracle) uses below T.
    hf, rotary_dim = hf_rotary_table(_hf_rotary(stock_config), T)
    assert rotary_dim == table.shape[1]
    assert float((table[:T] - hf).abs().max()) < HF_ATOL


def test_hf_table_is_unchanged_by_the_overrides(tmp_path):
    """GPT-NeoX runs on vLLM's Transformers backend: the table is the HF module's own."""
    from mesa_vllm.models.base import hf_rotary_table

    stock_config, mesa_config = _vllm_configs(tmp_path, "gpt_neox")
    stock, rotary_dim = hf_rotary_table(_hf_rotary(stock_config), MAX_MODEL_LEN)
    table, mesa_dim = hf_rotary_table(_hf_rotary(mesa_config), MAX_MODEL_LEN)
    assert rotary_dim == mesa_dim == 8  # rotary_pct = 0.25 of head_dim 32
    assert torch.equal(table, stock)
    # Plain RoPE: cos/sin of position * 10000^(-2i/d).
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim))
    angles = torch.arange(MAX_MODEL_LEN).double()[:, None] * inv_freq
    want = torch.cat([angles.cos(), angles.sin()], -1).float()
    assert float((table - want).abs().max()) < 1e-4  # fp32 angles up to 512 rad


def test_hf_table_refuses_length_dependent_rope(tmp_path):
    from transformers import LlamaConfig

    from mesa_vllm.models.base import hf_rotary_table

    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=T,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                          "rope_theta": 10000.0})
    with pytest.raises(NotImplementedError, match="rope_type='dynamic'"):
        hf_rotary_table(_hf_rotary(config), MAX_MODEL_LEN)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [32, 16, 8])
def test_rotation_op_pairing_and_partial_dims(is_neox, rotary_dim):
    """vLLM's rotation op, as the backend calls it, against the RoPE math in ``mesa_vllm.rope``."""
    head_size, heads = 32, 3
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim))
    angles = torch.arange(MAX_MODEL_LEN).double()[:, None] * inv_freq
    table = torch.cat([angles.cos(), angles.sin()], -1).float()
    torch.manual_seed(0)
    x = torch.randn(7, heads, head_size)
    positions = torch.tensor([0, 1, 5, 63, 64, 300, MAX_MODEL_LEN - 1])
    got = ops.rotate_queries(x, positions, table, head_size, is_neox)
    want = rope.rotate(x, positions, inv_freq, is_neox=is_neox)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("kind", ["default", "llama3", "linear", "yarn", "qwen2", "phi3_partial"])
@pytest.mark.parametrize("step", [3, 8])
def test_linear_stair_table_is_the_rotation_at_fractional_positions(tmp_path, kind, step):
    """Row ``j`` of the linear stair's key table is the model's rotation at ``j / E``, as
    Hugging Face's rotary module computes it for fractional position ids."""
    from mesa_vllm.models.base import vllm_rotary_handover

    stock_config, mesa_config = _vllm_configs(tmp_path, kind)
    handed = vllm_rotary_handover(_vllm_rotary(mesa_config), MAX_MODEL_LEN)
    table = handed.fractional_table(step, torch.float32)
    assert table.shape == handed.cos_sin_cache.shape
    whole = torch.arange(0, table.shape[0], step)
    assert torch.equal(table[whole], handed.cos_sin_cache[whole // step])  # bit for bit
    hf_rotary = _hf_rotary(stock_config)
    positions = torch.arange(MAX_MODEL_LEN).double() / step
    probe = torch.zeros(1, 1, 1)
    with torch.no_grad():
        cos, sin = hf_rotary(probe, positions[None].float())
    half = table.shape[1] // 2
    want = torch.cat([cos[0, :, :half], sin[0, :, :half]], -1)
    assert float((table[:MAX_MODEL_LEN] - want).abs().max()) < HF_ATOL
    assert handed.fractional_table(step, torch.float32) is table  # built once, shared
