"""vLLM + MESA is exact against the dense oracle on a tiny random Llama (T = 64).

Four engines (``mesa`` eager, compiled and with portable kernels, with small
chunked-prefill steps and prefix caching on; ``CUSTOM`` with whole-prompt steps and caching
off), a mixed batch up to 8T,
and the independent dense oracle (``mesa_vllm.oracle``) as the expectation.
"""

from __future__ import annotations

import pytest

from mesa_vllm.oracle import MesaOracle
from mesa_vllm.rule import MesaGeometry
from mesa_vllm.testing import (
    ORACLE_LOGPROB_ATOL,
    TINY_MAX_LEN,
    TINY_MESA,
    TINY_T,
    assert_greedy_matches_oracle,
    greedy,
    prompt_logprobs,
    random_prompt,
    shutdown_llm,
    tiny_engine,
)

pytestmark = [pytest.mark.cpu, pytest.mark.e2e]

T, MESA, MAX_LEN, LOGPROB_ATOL = TINY_T, TINY_MESA, TINY_MAX_LEN, ORACLE_LOGPROB_ATOL
GEOMETRY = MesaGeometry(T=T, log_n=True, **MESA)

PROMPT_LENGTHS = [20, T, T + 1, 100, 3 * T + 7, 333, 8 * T]
GENERATE_LENGTHS = [40, 130, 8 * T]
NEW_TOKENS = 3 * T

ENGINES = {
    # Small steps split prompts mid-chunk and mid-window at varying offsets.
    "mesa-chunked-cached": dict(attention_backend="mesa", max_num_batched_tokens=80,
                                enable_prefix_caching=True),
    # vLLM's default compiled CPU mode (torch.compile), same small steps.
    "mesa-compiled": dict(attention_backend="mesa", max_num_batched_tokens=80,
                          enable_prefix_caching=True, enforce_eager=False),
    # The CUSTOM spelling, whole prompts per step, no prefix caching.
    "CUSTOM-whole-uncached": dict(attention_backend="CUSTOM", max_num_batched_tokens=MAX_LEN,
                                  enable_prefix_caching=False),
    # Portable kernels (what non-CPU devices run): every pass a gathered partial attention.
    "mesa-portable": dict(attention_backend="mesa", max_num_batched_tokens=80,
                          enable_prefix_caching=True, env={"MESA_KERNELS": "portable"}),
}


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir):
    return MesaOracle(tiny_llama_dir, GEOMETRY)


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request, tiny_llama_dir):
    options = dict(ENGINES[request.param])
    with pytest.MonkeyPatch.context() as mp:  # workers inherit the environment at start
        for name, value in options.pop("env", {}).items():
            mp.setenv(name, value)
        llm = tiny_engine(tiny_llama_dir, max_model_len=MAX_LEN, additional_config={"mesa": MESA},
                          **options)
    yield llm
    shutdown_llm(llm)


def test_engine_runs_mesa_classes(engine):
    config = engine.llm_engine.vllm_config
    assert config.model_config.hf_config.architectures == ["MesaLlamaForCausalLM"]
    assert config.attention_config.backend.get_path().endswith("MesaAttentionBackend")


def test_prompt_logprobs_match_oracle(engine, oracle):
    prompts = [random_prompt(n, seed=n) for n in PROMPT_LENGTHS]
    for prompt, values in zip(prompts, prompt_logprobs(engine, prompts)):
        want = oracle.prompt_logprobs(prompt)
        diffs = [abs(a - b) for a, b in zip(values[1:], want[1:])]
        worst = max(diffs)
        assert worst < LOGPROB_ATOL, (
            f"L={len(prompt)}: worst |logprob - oracle| = {worst:.2e} at position "
            f"{diffs.index(worst) + 1}"
        )


def test_greedy_continuation_matches_oracle(engine, oracle):
    prompts = [random_prompt(n, seed=1000 + n) for n in GENERATE_LENGTHS]
    results = greedy(engine, prompts, NEW_TOKENS)
    for prompt, result in zip(prompts, results):
        assert len(result["tokens"]) == NEW_TOKENS
        assert_greedy_matches_oracle(oracle, prompt, result["tokens"])
