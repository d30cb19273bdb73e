"""MESA stays exact under vLLM's prefix caching, scheduling, preemption and compilation.

Expectations come from the dense oracle for each request alone and from an engine with
prefix caching off; prefix-cache reuse is checked against the number of leading blocks
whose Mesa roles match (``MesaGeometry.cache_role_key``), computed independently here.
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
    random_prompt,
    shutdown_llm,
    tiny_engine,
)

pytestmark = [pytest.mark.cpu, pytest.mark.e2e]

T, MESA, MAX_LEN, LOGPROB_ATOL = TINY_T, TINY_MESA, TINY_MAX_LEN, ORACLE_LOGPROB_ATOL
GEOMETRY = MesaGeometry(T=T, log_n=True, **MESA)
BLOCK = 32
NEW = 20


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir):
    return MesaOracle(tiny_llama_dir, GEOMETRY)


def _mesa_engine(model_dir, **kwargs):
    return tiny_engine(
        model_dir, attention_backend="mesa", max_model_len=MAX_LEN,
        additional_config={"mesa": MESA}, **kwargs,
    )


@pytest.fixture(scope="module", params=["eager", "compiled"])
def cached(request, tiny_llama_dir):
    """Prefix caching on, small chunked-prefill steps; eager and vLLM's compiled mode."""
    llm = _mesa_engine(
        tiny_llama_dir, enable_prefix_caching=True, max_num_batched_tokens=80,
        enforce_eager=request.param == "eager",
    )
    yield llm
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def uncached(tiny_llama_dir):
    llm = _mesa_engine(tiny_llama_dir, enable_prefix_caching=False, max_num_batched_tokens=MAX_LEN)
    yield llm
    shutdown_llm(llm)


def expected_hit_tokens(a: list[int], b: list[int]) -> int:
    """Tokens of B's prompt that vLLM may serve from A's cached blocks, by the rule.

    A block is reusable when it is full in A's prompt, B's tokens up to its end equal A's,
    every block up to it has the same Mesa role key in both requests, and it ends before
    B's last token (vLLM always computes at least one token).
    """
    hit = 0
    for end in range(BLOCK, min(len(a), len(b) - 1) + 1, BLOCK):
        same_tokens = a[:end] == b[:end]
        same_role = GEOMETRY.cache_role_key(len(a), end) == GEOMETRY.cache_role_key(len(b), end)
        if not (same_tokens and same_role):
            break
        hit = end
    return hit


def _shared(n_a: int, n_b: int, diverge_at: int | None, seed: int) -> tuple[list[int], list[int]]:
    base = random_prompt(max(n_a, n_b), seed)
    a = base[:n_a]
    b = base[:n_b]
    if diverge_at is not None:
        b = base[:diverge_at] + random_prompt(n_b - diverge_at, seed + 1)
    return a, b


PREFIX_CASES = {
    # name: (len A, len B, B diverges from A at, expected roles)
    "A<=T, B>T": (50, 300, None),
    "both>T": (200, 400, None),
    "B diverges inside A's final region": (300, 400, 295),
}


@pytest.mark.parametrize("case", list(PREFIX_CASES))
def test_prefix_cache_across_lengths(case, cached, uncached, oracle):
    n_a, n_b, diverge = PREFIX_CASES[case]
    a, b = _shared(n_a, n_b, diverge, seed=100 + n_a + n_b)
    first = greedy(cached, [a], NEW)[0]
    second = greedy(cached, [b], NEW)[0]
    reference = greedy(uncached, [a, b], NEW)

    # Blocks whose roles match are reused, and no others.
    want_hit = expected_hit_tokens(a, b)
    assert want_hit > 0, "the case should share at least one block"
    assert second["cached_tokens"] == want_hit

    for name, prompt, got, ref in (("A", a, first, reference[0]), ("B", b, second, reference[1])):
        assert_greedy_matches_oracle(oracle, prompt, got["tokens"], name)
        assert got["tokens"] == ref["tokens"], f"{name}: caching on vs off differ"
        worst = max(abs(x - y) for x, y in zip(got["logprobs"], ref["logprobs"]))
        assert worst < LOGPROB_ATOL, f"{name}: logprobs with caching on vs off differ by {worst:.2e}"


def test_same_prompt_twice_hits_every_matching_block(cached, oracle):
    prompt = random_prompt(333, seed=4242)
    runs = [greedy(cached, [prompt], NEW)[0] for _ in range(2)]
    assert runs[1]["cached_tokens"] == expected_hit_tokens(prompt, prompt) > 0
    assert runs[0]["tokens"] == runs[1]["tokens"]
    assert_greedy_matches_oracle(oracle, prompt, runs[0]["tokens"])


def test_batch_invariance(uncached):
    """One request alone, or beside 7 others of mixed lengths and roles (prefill beside
    decode), gives the same tokens and logprobs."""
    target = random_prompt(300, seed=777)
    others = [random_prompt(n, seed=800 + n) for n in (10, 50, 64, 65, 130, 450, 650)]
    alone = greedy(uncached, [target], 40)[0]
    batch = greedy(uncached, others[:3] + [target] + others[3:], [60, 60, 60, 40, 5, 30, 10, 8])
    together = batch[3]
    assert together["tokens"] == alone["tokens"]
    worst = max(abs(x - y) for x, y in zip(together["logprobs"], alone["logprobs"]))
    assert worst < 1e-4, f"logprobs alone vs batched differ by {worst:.2e}"


def test_long_generation_moves_the_window(uncached, oracle):
    """2T prompt, 4T generated: the stair window moves by R sixteen times."""
    prompt = random_prompt(2 * T, seed=2024)
    got = greedy(uncached, [prompt], 4 * T)[0]["tokens"]
    assert len(got) == 4 * T
    assert_greedy_matches_oracle(oracle, prompt, got)


def _preemptions(llm) -> float:
    return sum(
        getattr(m, "value", 0) or 0 for m in llm.get_metrics() if m.name == "vllm:num_preemptions"
    )


def test_preemption_and_recompute_stay_exact(tiny_llama_dir, oracle, monkeypatch):
    # VLLM_CPU_KVCACHE_SPACE (set for the session in conftest) would override the size.
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    # 2 layers x 3 planes x 2 KV heads x 32 dims x 4 bytes = 1.5 KiB per token: 30 blocks
    # of 32 tokens hold ~2 of the 4 requests below, so the scheduler must preempt.
    llm = _mesa_engine(
        tiny_llama_dir, enable_prefix_caching=True, max_num_batched_tokens=96,
        kv_cache_memory_bytes=30 * BLOCK * 1536, disable_log_stats=False,
    )
    try:
        prompts = [random_prompt(n, seed=5000 + n) for n in (300, 310, 250, 200)]
        results = greedy(llm, prompts, 100)
        assert _preemptions(llm) > 0, "the KV cache was meant to be too small to avoid preemption"
    finally:
        shutdown_llm(llm)
    for prompt, result in zip(prompts, results):
        assert len(result["tokens"]) == 100
        assert_greedy_matches_oracle(oracle, prompt, result["tokens"])
