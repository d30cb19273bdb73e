"""Settings and models Mesa cannot serve are refused at start-up with a clear message.

The refusal happens in the process that builds the engine config, before any model
weights load, so these tests only need a config.json.
"""

from __future__ import annotations

import re

import pytest

from mesa_vllm.params import MesaConfigError, resolve_geometry

pytestmark = [pytest.mark.cpu]


def _engine(model_dir, **kwargs):
    from vllm import LLM

    return LLM(model=str(model_dir), skip_tokenizer_init=True, enforce_eager=True, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "max_len", "pattern"),
    [
        ({"F": 16, "C": 60, "E": 8}, 256, r"F \+ C <= T .*C=48"),
        ({"E": 2, "R": 16, "F": 16}, 512, r"max_model_len <= E \* \(T - 1 - R\).*Use E=\d+"),
        ({"E": 8, "R": 12}, 256, r"R=12 must be a multiple of E=8.*R=16"),
        ({"E": 0}, 256, r"E=0 must be >= 1"),
        ({"stride": 4}, 256, r"unknown mesa parameter 'stride'"),
        ({"E": "four"}, 256, r"E='four' must be a whole number"),
        ({"log_n": "maybe"}, 256, r"log_n='maybe' is not a boolean"),
    ],
)
def test_invalid_parameters_refused(tiny_llama_dir, overrides, max_len, pattern):
    with pytest.raises(MesaConfigError, match=pattern):
        _engine(tiny_llama_dir, attention_backend="mesa", max_model_len=max_len,
                additional_config={"mesa": overrides})


def test_suggested_fix_works():
    """The value a refusal suggests is accepted."""
    with pytest.raises(MesaConfigError) as err:
        resolve_geometry(64, 512, {"E": 2, "R": 16, "F": 16})
    e = int(re.search(r"Use E=(\d+)", str(err.value)).group(1))
    r = int(re.search(r"with R=(\d+)", str(err.value)).group(1))
    f = int(re.search(r"F=(\d+)\)", str(err.value)).group(1))
    geometry = resolve_geometry(64, 512, {"E": e, "R": r, "F": f})
    assert geometry.max_supported_len >= 512


def test_environment_overrides_are_validated(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("MESA_C", "70")
    with pytest.raises(MesaConfigError, match=r"F \+ C <= T"):
        _engine(tiny_llama_dir, attention_backend="mesa", max_model_len=256)


def _config_dir(tmp_path, config, architecture=None):
    if architecture:
        config.architectures = [architecture]
    config.save_pretrained(tmp_path)
    return tmp_path


def test_model_without_rope_refused(tmp_path):
    from transformers import GPT2Config

    model = _config_dir(tmp_path, GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64))
    with pytest.raises(MesaConfigError, match=r"does not use rotary position embeddings.*Supported architectures: .*LlamaForCausalLM"):
        _engine(model, attention_backend="mesa")


def test_alibi_model_refused(tmp_path):
    from transformers import MptConfig

    model = _config_dir(tmp_path, MptConfig(n_layers=1, d_model=32, n_heads=2, max_seq_len=64))
    with pytest.raises(MesaConfigError, match=r"does not use rotary position embeddings"):
        _engine(model, attention_backend="mesa")


def test_sliding_window_model_refused(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    config.sliding_window = 32
    model = _config_dir(tmp_path, config, "LlamaForCausalLM")
    with pytest.raises(MesaConfigError, match=r"sliding-window attention .*sliding_window=32"):
        _engine(model, attention_backend="mesa")


def test_unsupported_rope_architecture_refused(tmp_path):
    from transformers import GPTJConfig

    model = _config_dir(
        tmp_path, GPTJConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, rotary_dim=8),
        "GPTJForCausalLM",
    )
    with pytest.raises(MesaConfigError, match=r"GPTJForCausalLM is not supported by the mesa backend. Supported architectures: .*LlamaForCausalLM"):
        _engine(model, attention_backend="mesa")


def test_only_the_flag_selects_mesa():
    from mesa_vllm.engine import mesa_requested
    from vllm.engine.arg_utils import EngineArgs

    assert not mesa_requested(EngineArgs(model="x"))
    assert mesa_requested(EngineArgs(model="x", attention_backend="mesa"))
    assert mesa_requested(EngineArgs(model="x", attention_backend="MESA"))
