"""The linear stair (``stair="linear"``, an opt-in variant outside the spec) is exact too.

One fp32 engine on the tiny random Llama (T = 64), small chunked-prefill steps and prefix
caching on, against the dense oracle with the same geometry. The step oracle is checked to
give different numbers on the same prompts, so a backend that ignored the setting fails.
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
LINEAR = MesaGeometry(T=T, log_n=True, stair="linear", **MESA)
STEP = MesaGeometry(T=T, log_n=True, **MESA)
PROMPT_LENGTHS = [40, T + 1, 3 * T + 7, 8 * T]
GENERATE_LENGTHS = [40, 130, 8 * T]
NEW_TOKENS = 3 * T


@pytest.fixture(scope="module")
def oracles(tiny_llama_dir):
    return MesaOracle(tiny_llama_dir, LINEAR), MesaOracle(tiny_llama_dir, STEP)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    llm = tiny_engine(tiny_llama_dir, max_model_len=MAX_LEN, attention_backend="mesa",
                      additional_config={"mesa": {**MESA, "stair": "linear"}},
                      max_num_batched_tokens=80, enable_prefix_caching=True)
    yield llm
    shutdown_llm(llm)


def test_engine_has_the_linear_stair(engine):
    import json

    hf_config = engine.llm_engine.vllm_config.model_config.hf_config
    assert json.loads(hf_config.mesa_geometry)["stair"] == "linear"


def test_prompt_logprobs_match_linear_oracle(engine, oracles):
    linear, step = oracles
    prompts = [random_prompt(n, seed=7 * n) for n in PROMPT_LENGTHS]
    for prompt, values in zip(prompts, prompt_logprobs(engine, prompts)):
        want = linear.prompt_logprobs(prompt)
        worst = max(abs(a - b) for a, b in zip(values[1:], want[1:]))
        assert worst < LOGPROB_ATOL, f"L={len(prompt)}: worst |logprob - oracle| = {worst:.2e}"
        other = step.prompt_logprobs(prompt)
        gap = max(abs(a - b) for a, b in zip(other[1:], want[1:]))
        if len(prompt) <= T:  # untouched within T: both shapes are plain attention
            assert gap < 1e-9, f"L={len(prompt)}: the shapes differ within T ({gap:.2e})"
        elif len(prompt) > T + MESA["R"]:  # stair queries with a stair to read (T + 1: the
            # only stair query is the last token, whose logprob is not a prompt logprob)
            assert gap > 20 * LOGPROB_ATOL, f"L={len(prompt)}: step vs linear only {gap:.2e}"


def test_greedy_continuation_matches_linear_oracle(engine, oracles):
    linear, _ = oracles
    prompts = [random_prompt(n, seed=2000 + n) for n in GENERATE_LENGTHS]
    for prompt, result in zip(prompts, greedy(engine, prompts, NEW_TOKENS)):
        assert len(result["tokens"]) == NEW_TOKENS
        assert_greedy_matches_oracle(linear, prompt, result["tokens"])
