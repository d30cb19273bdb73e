"""vLLM + MESA is exact against the dense oracle on a tiny random Llama (T = 64).

One engine per spelling (``mesa`` with small chunked-prefill steps and prefix caching on;
``CUSTOM`` with whole-prompt steps and caching off), a mixed batch up to 8T, and the
independent dense oracle (``mesa_vllm.oracle``) as the expectation.
"""

from __future__ import annotations

import gc

import pytest

from mesa_vllm.oracle import MesaOracle
from mesa_vllm.rule import MesaGeometry
from mesa_vllm.testing import random_prompt

pytestmark = [pytest.mark.cpu, pytest.mark.e2e]

T = 64
# Chunks, window and stair step that put every role in play below 8T + 3T.
MESA = {"F": 16, "C": 24, "R": 16, "E": 16}
GEOMETRY = MesaGeometry(T=T, log_n=True, **MESA)
MAX_LEN = 11 * T + 32  # 8T prompt + 3T generated fits the stair (capacity 752)
# fp32 end to end; the oracle rotates in float64 per pair, vLLM in fp32 at absolute
# positions, so small differences remain.
LOGPROB_ATOL = 2e-3

PROMPT_LENGTHS = [20, T, T + 1, 100, 3 * T + 7, 333, 8 * T]
GENERATE_LENGTHS = [40, 130, 8 * T]
NEW_TOKENS = 3 * T


def _engine(model_dir, **kwargs):
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,
        block_size=32,
        max_model_len=MAX_LEN,
        additional_config={"mesa": MESA},
        **kwargs,
    )


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir):
    return MesaOracle(tiny_llama_dir, GEOMETRY)


@pytest.fixture(scope="module", params=["mesa-chunked-cached", "CUSTOM-whole-uncached"])
def engine(request, tiny_llama_dir):
    if request.param.startswith("mesa"):
        llm = _engine(
            tiny_llama_dir,
            attention_backend="mesa",
            # Small steps: prompts split mid-chunk and mid-window at varying offsets.
            max_num_batched_tokens=80,
            enable_prefix_caching=True,
        )
    else:
        llm = _engine(
            tiny_llama_dir,
            attention_backend="CUSTOM",
            max_num_batched_tokens=MAX_LEN,
            enable_prefix_caching=False,
        )
    yield llm
    del llm
    gc.collect()


def _prompt_logprobs(llm, prompts):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [
        [None] + [out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(p) if i > 0]
        for out, p in zip(outputs, prompts)
    ]


def test_engine_runs_mesa_classes(engine):
    config = engine.llm_engine.vllm_config
    assert config.model_config.hf_config.architectures == ["MesaLlamaForCausalLM"]
    assert config.attention_config.backend.get_path().endswith("MesaAttentionBackend")


def test_prompt_logprobs_match_oracle(engine, oracle):
    prompts = [random_prompt(n, seed=n) for n in PROMPT_LENGTHS]
    got = _prompt_logprobs(engine, prompts)
    for prompt, values in zip(prompts, got):
        want = oracle.prompt_logprobs(prompt)
        diffs = [abs(a - b) for a, b in zip(values[1:], want[1:])]
        worst = max(diffs)
        assert worst < LOGPROB_ATOL, (
            f"L={len(prompt)}: worst |logprob - oracle| = {worst:.2e} at position "
            f"{diffs.index(worst) + 1}"
        )


def test_greedy_continuation_matches_oracle(engine, oracle):
    from vllm import SamplingParams

    prompts = [random_prompt(n, seed=1000 + n) for n in GENERATE_LENGTHS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        got = list(out.outputs[0].token_ids)
        want = oracle.greedy(prompt, NEW_TOKENS)
        first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert got == want, f"L={len(prompt)}: first mismatch at generated token {first_diff}"
