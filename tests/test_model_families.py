"""Every supported family: vLLM + MESA is the oracle past T and vLLM's default under T.

One tiny random model per family (T = 64, fp32), built from its ``transformers`` config:

- Llama with Llama-3 rope scaling (T is the original length, 64; the config serves 4T),
- Mistral as its config class makes it (``sliding_window=4096``: never reached, so dropped),
- Qwen2 (q/k/v bias),
- Phi-3 (fused ``qkv_proj`` and ``gate_up_proj`` in the checkpoint, half the head rotary),
- GPT-NeoX (``rotary_pct=0.25``, fused q/k/v, served by vLLM's Transformers backend).

Per family, one MESA engine runs a batch of long prompts (3T-5T, past T: every role and a
moving stair window) and short ones (under T); then one default-backend engine runs the
short ones. Engines live one at a time.

Past T the expectation is the dense oracle (``mesa_vllm.oracle``), by full recompute of
prompt + vLLM's continuation with roles from the prompt length: every vLLM token must be
the oracle's argmax given the tokens before it (by induction, the oracle's own greedy
continuation), and prompt and token logprobs must agree. Under T, MESA must give the
default backend's tokens and logprobs.
"""

from __future__ import annotations

import pytest

from mesa_vllm.oracle import MesaOracle
from mesa_vllm.rule import MesaGeometry
from mesa_vllm.testing import (
    TINY_VOCAB,
    check_greedy_result,
    greedy,
    greedy_mismatches,
    make_tiny_model,
    prompt_logprobs,
    random_prompt,
    shutdown_llm,
    tiny_engine,
)

pytestmark = [pytest.mark.cpu, pytest.mark.e2e]

T = 64
MESA = {"F": 8, "C": 24, "R": 16, "E": 8}
GEOMETRY = MesaGeometry(T=T, log_n=True, **MESA)
MAX_LEN = GEOMETRY.max_supported_len  # 8 * (64 - 1 - 16) = 376
LONG_PROMPTS = [3 * T + 5, 5 * T + 3]
NEW_TOKENS = 40  # 5T + 3 + 40 = 363 <= 376; the stair window moves twice
SHORT_PROMPTS = [9, 33, 63]  # generate up to T: all plain
ORACLE_ATOL = 2e-3  # as tests/test_backend_exact.py: fp32 vLLM vs float64-angle oracle
DEFAULT_ATOL = 1e-4  # same rotation table and kernel under T: summation order only
KV_BYTES = 64 << 20

FAMILIES = {
    "llama3": "MesaLlamaForCausalLM",
    "mistral": "MesaMistralForCausalLM",
    "qwen2": "MesaQwen2ForCausalLM",
    "phi3": "MesaPhi3ForCausalLM",
    "gpt_neox": "MesaGPTNeoXForCausalLM",
}


def family_config(kind: str):
    """A tiny ``transformers`` config of one family; large init_std for stable argmaxes."""
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, initializer_range=0.25,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    gqa = dict(common, num_key_value_heads=2)
    if kind == "llama3":
        return LlamaConfig(**gqa, max_position_embeddings=4 * T, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": T})
    if kind == "mistral":
        config = MistralConfig(**gqa, max_position_embeddings=T)
        assert config.sliding_window == 4096  # the class default, as in many checkpoints
        return config
    if kind == "qwen2":
        return Qwen2Config(**gqa, max_position_embeddings=T, rope_theta=10000.0,
                           use_sliding_window=False)
    if kind == "phi3":
        return Phi3Config(**gqa, max_position_embeddings=T, sliding_window=None,
                          partial_rotary_factor=0.5)
    if kind == "gpt_neox":
        return GPTNeoXConfig(**common, max_position_embeddings=T, rotary_pct=0.25)
    raise KeyError(kind)


def _engine(model_dir, **kwargs):
    return tiny_engine(model_dir, kv_cache_memory_bytes=KV_BYTES, **kwargs)


def _with_prompt_logprobs(llm, prompts, results):
    for result, values in zip(results, prompt_logprobs(llm, prompts)):
        result["prompt_logprobs"] = values[1:]  # the first token has none
    return results


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """Build the model, run MESA then the default backend (one engine at a time)."""
    kind = request.param
    model_dir = make_tiny_model(tmp_path_factory.mktemp(kind) / "model", family_config(kind))
    long_prompts = [random_prompt(n, seed=n) for n in LONG_PROMPTS]
    short_prompts = [random_prompt(n, seed=7 * n) for n in SHORT_PROMPTS]
    short_new = [T - n for n in SHORT_PROMPTS]

    llm = _engine(model_dir, attention_backend="mesa", max_model_len=MAX_LEN,
                  additional_config={"mesa": MESA})
    try:
        hf_config = llm.llm_engine.vllm_config.model_config.hf_config
        info = {"architectures": list(hf_config.architectures),
                "sliding_window": getattr(hf_config, "sliding_window", None)}
        prompts = long_prompts + short_prompts
        new_tokens = [NEW_TOKENS] * len(long_prompts) + short_new
        results = _with_prompt_logprobs(llm, prompts, greedy(llm, prompts, new_tokens))
    finally:
        shutdown_llm(llm)
        del llm
    mesa_long, mesa_short = results[: len(long_prompts)], results[len(long_prompts):]

    llm = _engine(model_dir, max_model_len=T)
    try:
        default_short = greedy(llm, short_prompts, short_new)
        default_short = _with_prompt_logprobs(llm, short_prompts, default_short)
    finally:
        shutdown_llm(llm)
        del llm

    return {
        "kind": kind, "model_dir": model_dir, "info": info,
        "long_prompts": long_prompts, "mesa_long": mesa_long,
        "mesa_short": mesa_short, "default_short": default_short,
    }


@pytest.fixture(scope="module")
def oracle_runs(family):
    """The oracle's logits over prompt + vLLM's continuation, roles from the prompt length."""
    oracle = MesaOracle(family["model_dir"], GEOMETRY)
    runs = []
    for prompt, result in zip(family["long_prompts"], family["mesa_long"]):
        logits = oracle.logits(prompt + result["tokens"], prompt_len=len(prompt))
        runs.append(logits.double().log_softmax(-1))
    return runs


def test_engine_runs_the_mesa_class(family):
    assert family["info"]["architectures"] == [FAMILIES[family["kind"]]]
    # Mistral's 4096-token window never masks within max_model_len: dropped, not refused.
    assert family["info"]["sliding_window"] is None


def test_prompt_logprobs_match_oracle_past_T(family, oracle_runs):
    for prompt, result, logprobs in zip(family["long_prompts"], family["mesa_long"], oracle_runs):
        want = [float(logprobs[i - 1, t]) for i, t in enumerate(prompt) if i > 0]
        diffs = [abs(a - b) for a, b in zip(result["prompt_logprobs"], want)]
        worst = max(diffs)
        assert worst < ORACLE_ATOL, (
            f"{family['kind']} L={len(prompt)}: worst |logprob - oracle| = {worst:.2e} at "
            f"position {diffs.index(worst) + 1}"
        )


def test_greedy_continuation_matches_oracle_past_T(family, oracle_runs):
    for prompt, result, logprobs in zip(family["long_prompts"], family["mesa_long"], oracle_runs):
        steps = logprobs[len(prompt) - 1 : -1]  # the rows that chose each generated token
        assert len(result["tokens"]) == len(steps)
        problems, ties = greedy_mismatches(steps, result["tokens"])
        check_greedy_result(problems, ties, f"{family['kind']} L={len(prompt)}")
        chosen = [float(steps[i, t]) for i, t in enumerate(result["tokens"])]
        worst = max(abs(a - b) for a, b in zip(result["logprobs"], chosen))
        assert worst < ORACLE_ATOL, f"{family['kind']} L={len(prompt)}: token logprobs {worst:.2e}"


def test_under_T_equals_default_backend(family):
    for n, m, d in zip(SHORT_PROMPTS, family["mesa_short"], family["default_short"]):
        assert m["tokens"] == d["tokens"], f"{family['kind']} prompt of {n} tokens"
        for key in ("logprobs", "prompt_logprobs"):
            worst = max(abs(a - b) for a, b in zip(m[key], d[key]))
            assert worst < DEFAULT_ATOL, f"{family['kind']} prompt of {n}, {key}: {worst:.2e}"
