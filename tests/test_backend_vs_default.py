"""Prompts that fit T are untouched: MESA gives vLLM's default backend's answers."""

from __future__ import annotations

import pytest

from mesa_vllm.testing import greedy, prompt_logprobs, random_prompt, shutdown_llm, tiny_engine

pytestmark = [pytest.mark.cpu, pytest.mark.e2e]

T = 64
LENGTHS = [5, 17, 33, 48, 63]
LOGPROB_ATOL = 1e-4  # same kernel, same rotation table: only summation order may differ


def _run(model_dir, **kwargs):
    llm = tiny_engine(model_dir, **kwargs)
    prompts = [random_prompt(n, seed=7 * n) for n in LENGTHS]
    try:
        results = greedy(llm, prompts, [T - len(p) for p in prompts])
        for result, values in zip(results, prompt_logprobs(llm, prompts)):
            result["prompt_logprobs"] = values[1:]
    finally:
        shutdown_llm(llm)
    return results


@pytest.fixture(scope="module")
def both(tiny_llama_dir):
    default = _run(tiny_llama_dir, max_model_len=T)
    mesa = _run(
        tiny_llama_dir, attention_backend="mesa", max_model_len=5 * T,
        additional_config={"mesa": {"F": 8, "C": 24, "R": 16, "E": 8}},
    )
    return default, mesa


def test_same_greedy_tokens(both):
    default, mesa = both
    for d, m, n in zip(default, mesa, LENGTHS):
        assert m["tokens"] == d["tokens"], f"prompt of {n} tokens"


def test_logprobs_within_tolerance(both):
    default, mesa = both
    for d, m, n in zip(default, mesa, LENGTHS):
        for key in ("logprobs", "prompt_logprobs"):
            worst = max(abs(a - b) for a, b in zip(d[key], m[key]))
            assert worst < LOGPROB_ATOL, f"prompt of {n} tokens, {key}: {worst:.2e}"
