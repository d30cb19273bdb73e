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


# --------------------------------------------------------------------------------------
# Model coverage: what is served, what is refused and why (config only, no weights)
SUPPORTED = ("GPTNeoXForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM",
             "Qwen2ForCausalLM")
_SMALL = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
              num_attention_heads=2, max_position_embeddings=64)


def _names_supported(message: str) -> bool:
    return all(name in message for name in SUPPORTED)


def test_supported_architectures_are_registered():
    from mesa_vllm.models import MESA_ARCHITECTURES, supported_architectures
    from vllm import ModelRegistry

    assert tuple(supported_architectures()) == SUPPORTED
    for mesa_arch, _ in MESA_ARCHITECTURES.values():
        assert mesa_arch in ModelRegistry.get_supported_archs()


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        ("bloom", r"BloomForCausalLM does not use rotary .*\(RoPE\): it uses ALiBi"),
        ("mpt", r"does not use rotary position embeddings \(RoPE\): it uses ALiBi"),
        ("opt", r"OPTForCausalLM does not use rotary .*absolute \(learned\) position embeddings"),
        ("gpt2", r"GPT2LMHeadModel does not use rotary .*absolute \(learned\) position embeddings"),
    ],
)
def test_models_without_rope_refused_with_reason(kind, pattern):
    from transformers import BloomConfig, GPT2Config, MptConfig, OPTConfig

    from mesa_vllm.engine import check_model_supported

    config, arch = {
        "bloom": (lambda: BloomConfig(n_layer=1, hidden_size=32, n_head=2), "BloomForCausalLM"),
        "mpt": (lambda: MptConfig(n_layers=1, d_model=32, n_heads=2), "MptForCausalLM"),
        "opt": (lambda: OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64,
                                  num_attention_heads=2), "OPTForCausalLM"),
        "gpt2": (lambda: GPT2Config(n_layer=1, n_embd=32, n_head=2), "GPT2LMHeadModel"),
    }[kind]
    config = config()
    config.architectures = [arch]
    with pytest.raises(MesaConfigError, match=pattern) as err:
        check_model_supported(config)
    assert _names_supported(str(err.value))


def test_longrope_phi3_refused(tmp_path):
    """Phi-3 128k / Phi-3.5 / Phi-4-mini: LongRoPE switches tables with the length."""
    from transformers import Phi3Config

    half = 64 // 2 // 2
    config = Phi3Config(**_SMALL, original_max_position_embeddings=32, sliding_window=None,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                         "short_factor": [1.0] * half, "long_factor": [2.0] * half})
    model = _config_dir(tmp_path, config, "Phi3ForCausalLM")
    with pytest.raises(MesaConfigError, match=r"rope_type='longrope': LongRoPE switches") as err:
        _engine(model, attention_backend="mesa")
    assert _names_supported(str(err.value))


@pytest.mark.parametrize(
    ("rope_parameters", "pattern"),
    [
        ({"rope_type": "dynamic", "factor": 2.0}, r"rope_type='dynamic': dynamic NTK"),
        ({"rope_type": "default", "mrope_section": [4, 6, 6]}, r"rope_type='mrope': M-RoPE"),
    ],
)
def test_length_dependent_rope_refused(rope_parameters, pattern):
    from transformers import Qwen2Config

    from mesa_vllm.engine import check_model_supported

    config = Qwen2Config(**_SMALL, rope_parameters={"rope_theta": 10000.0, **rope_parameters})
    config.architectures = ["Qwen2ForCausalLM"]
    with pytest.raises(MesaConfigError, match=pattern):
        check_model_supported(config)


def test_static_rope_scaling_accepted():
    from transformers import LlamaConfig

    from mesa_vllm.engine import check_model_supported

    for params in (
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
    ):
        config = LlamaConfig(**_SMALL, rope_parameters={"rope_theta": 10000.0, **params})
        config.architectures = ["LlamaForCausalLM"]
        assert check_model_supported(config, 256) == "MesaLlamaForCausalLM"


def test_sliding_window_used_refused_unused_dropped():
    """Mistral 7B v0.1 (window 4096 < its lengths) is refused; a window no sequence reaches
    (MistralConfig's default 4096 on a short model, Qwen2 with use_sliding_window=False)
    is not part of the model."""
    from transformers import MistralConfig, Qwen2Config

    from mesa_vllm.engine import check_model_supported, mesa_hf_overrides

    mistral = MistralConfig(**_SMALL, sliding_window=4096)
    mistral.architectures = ["MistralForCausalLM"]
    with pytest.raises(MesaConfigError, match=r"sliding_window=4096\) below max_model_len=8192"):
        check_model_supported(mistral, 8192)
    assert mesa_hf_overrides(mistral, 256, "{}")["sliding_window"] is None
    assert mesa_hf_overrides(mistral, 4096, "{}")["sliding_window"] is None

    qwen_off = Qwen2Config(**_SMALL, use_sliding_window=False, sliding_window=32)
    qwen_off.architectures = ["Qwen2ForCausalLM"]
    assert "sliding_window" not in mesa_hf_overrides(qwen_off, 256, "{}")
    qwen_on = Qwen2Config(**_SMALL, use_sliding_window=True, sliding_window=32, max_window_layers=0)
    qwen_on.architectures = ["Qwen2ForCausalLM"]
    with pytest.raises(MesaConfigError, match=r"sliding-window attention \(sliding_window=32\)"):
        check_model_supported(qwen_on, 256)


def test_transformers_model_impl_refused(tiny_llama_dir):
    with pytest.raises(MesaConfigError, match=r"drop --model-impl transformers"):
        _engine(tiny_llama_dir, attention_backend="mesa", model_impl="transformers")
