"""bf16 on an AMX CPU: mesa runs vLLM's AMX kernel, decode in one pass over the stair plane.

The engine must pick the ``amx`` page layout (checked on its worker), and its answers must
stay as close to the dense float32 oracle as the ``vec`` path's: prompt log-probs
(prefill: plain rows through vLLM's AMX kernel, middle and stair runs gathered from AMX
pages) and, teacher-forced, the log-prob of every generated token (decode: one kernel pass
with the window's stair keys turned for that call). bf16 noise on a random tiny model flips
greedy tokens early, so the comparison is on log-probs along each engine's own tokens.
Measured when this was written: worst |diff| up to ~1.0 and mean <= 0.10 for both paths;
with the window turn left out (a wrong decode), worst 7.8-10.4 and mean 1.2-1.6.
"""

from __future__ import annotations

import pytest
import torch

from mesa_vllm.oracle import MesaOracle
from mesa_vllm.rule import MesaGeometry
from mesa_vllm.testing import (
    TINY_T,
    greedy,
    prompt_logprobs,
    random_prompt,
    shutdown_llm,
    tiny_engine,
)

pytestmark = [pytest.mark.cpu, pytest.mark.e2e]

if not torch.cpu._is_amx_tile_supported():
    pytest.skip("this CPU has no AMX tiles: mesa never picks the amx layout here "
                "(tests/test_ops.py covers the layouts that run)", allow_module_level=True)

# A window as wide as a 32-token block, so decode windows reach into cached prompt blocks.
MESA = {"F": 16, "C": 24, "R": 32, "E": 16}
MAX_LEN = 16 * (TINY_T - 1 - 32)  # the stair's capacity E * (T - 1 - R) = 496
LENGTHS = [40, 130, 333, 430]  # within T, then past it: middle chunks and stair windows
NEW_TOKENS = 60
WORST_ATOL = 2.0  # bf16 end to end against a float32 oracle
MEAN_ATOL = 0.2


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir):
    return MesaOracle(tiny_llama_dir, MesaGeometry(T=TINY_T, log_n=True, **MESA))


@pytest.fixture(scope="module", params=["auto", "vec"])
def engine(request, tiny_llama_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESA_KERNELS", request.param)
        # In-process, so the test can ask the worker which layout it chose.
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = tiny_engine(tiny_llama_dir, dtype="bfloat16", attention_backend="mesa",
                          max_model_len=MAX_LEN, additional_config={"mesa": MESA},
                          enable_prefix_caching=True, max_num_batched_tokens=200)
    yield request.param, llm
    shutdown_llm(llm)


def test_layout_follows_the_kernel_mode(engine):
    from mesa_vllm.attention.backend import kernel_layouts

    mode, llm = engine
    assert llm.collective_rpc(kernel_layouts) == [["amx" if mode == "auto" else "vec"]]


def _report(diffs: list[float]) -> tuple[float, float]:
    return max(diffs), sum(diffs) / len(diffs)


def test_prompt_logprobs_near_oracle(engine, oracle):
    mode, llm = engine
    prompts = [random_prompt(n, seed=3 * n) for n in LENGTHS]
    for n, prompt, got in zip(LENGTHS, prompts, prompt_logprobs(llm, prompts)):
        want = oracle.prompt_logprobs(prompt)
        worst, mean = _report([abs(a - b) for a, b in zip(got[1:], want[1:])])
        assert worst < WORST_ATOL and mean < MEAN_ATOL, f"{mode} L={n}: worst {worst:.3f}, mean {mean:.4f}"


def test_decode_logprobs_near_oracle(engine, oracle):
    """One batch (so several decode rows share each step), teacher-forced in the oracle."""
    mode, llm = engine
    prompts = [random_prompt(n, seed=3 * n) for n in LENGTHS]
    for n, prompt, result in zip(LENGTHS, prompts, greedy(llm, prompts, NEW_TOKENS)):
        tokens = result["tokens"]
        logprobs = torch.log_softmax(oracle.logits(prompt + tokens, prompt_len=n).double(), -1)
        want = [float(logprobs[n - 1 + i, t]) for i, t in enumerate(tokens)]
        worst, mean = _report([abs(a - b) for a, b in zip(result["logprobs"], want)])
        assert worst < WORST_ATOL and mean < MEAN_ATOL, f"{mode} L={n}: worst {worst:.3f}, mean {mean:.4f}"


def test_shared_prompt_blocks_decode_like_a_lone_request(engine, oracle):
    """Two requests on one cached prompt decode in the same steps with their windows in
    shared blocks (turned once, put back once): both give the same tokens, near the oracle."""
    mode, llm = engine
    n = 330  # its first window is [304, 330]: block [288, 320) is a cached prompt block
    prompt = random_prompt(n, seed=11)
    greedy(llm, [prompt], 1)  # fills the prefix cache
    first, second = greedy(llm, [prompt, prompt], 30)
    assert first["tokens"] == second["tokens"], mode
    assert first["cached_tokens"] >= 320 and second["cached_tokens"] >= 320, mode
    tokens = first["tokens"]
    logprobs = torch.log_softmax(oracle.logits(prompt + tokens, prompt_len=n).double(), -1)
    want = [float(logprobs[n - 1 + i, t]) for i, t in enumerate(tokens)]
    worst, mean = _report([abs(a - b) for a, b in zip(first["logprobs"], want)])
    assert worst < WORST_ATOL and mean < MEAN_ATOL, f"{mode}: worst {worst:.3f}, mean {mean:.4f}"
