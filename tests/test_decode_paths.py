"""Half-precision decode: the paged stair kernel gives the gathered path's answers.

fp32 engines (the oracle tests) decode through the gathered path; bf16/fp16 engines read
the stair plane in place with vLLM's CPU paged decode kernel. This runs an fp16 batch with
decode steps past T both ways and compares (fp16 rather than bf16: its 10-bit mantissa keeps
accumulation-order noise far below the random model's top-token margins).
"""

from __future__ import annotations

import pytest

from mesa_vllm.testing import greedy, random_prompt, shutdown_llm, tiny_engine

pytestmark = [pytest.mark.cpu, pytest.mark.e2e]

T = 64
MESA = {"F": 16, "C": 24, "R": 16, "E": 16}
LENGTHS = [40, 130, 333]


def _run(model_dir, monkeypatch, paged: bool):
    monkeypatch.setenv("MESA_PAGED_DECODE", "1" if paged else "0")
    llm = tiny_engine(model_dir, dtype="float16", attention_backend="mesa", max_model_len=11 * T,
                      additional_config={"mesa": MESA})
    try:
        return greedy(llm, [random_prompt(n, seed=3 * n) for n in LENGTHS], 60)
    finally:
        shutdown_llm(llm)


def test_paged_decode_equals_gathered_path(tiny_llama_dir, monkeypatch):
    paged = _run(tiny_llama_dir, monkeypatch, paged=True)
    gathered = _run(tiny_llama_dir, monkeypatch, paged=False)
    for n, a, b in zip(LENGTHS, paged, gathered):
        assert a["tokens"] == b["tokens"], f"L={n}"
        worst = max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"]))
        assert worst < 0.05, f"L={n}: fp16 logprobs differ by {worst:.3f}"
