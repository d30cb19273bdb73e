"""`vllm serve --attention-backend mesa` refuses what Mesa cannot serve, at start-up.

Each case launches the real command (``vllm serve`` or ``mesa-vllm serve``) and checks that
the process exits non-zero with the reason in its output, before any weights load. The
processes run side by side (~20-40 s in all); none of them ever serves.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesa_vllm.serving import free_port, run_to_exit, serve_command

pytestmark = [pytest.mark.cpu, pytest.mark.e2e]


def _config_dir(path, config, architecture=None):
    if architecture:
        config.architectures = [architecture]
    config.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, tiny_llama_dir, smollm2_dir):
    """Run every refused start-up once, in parallel; map case name -> (exit code, output)."""
    from transformers import GPT2Config, GPTJConfig

    base = tmp_path_factory.mktemp("refusals")
    gpt2 = _config_dir(base / "gpt2", GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64))
    gptj = _config_dir(
        base / "gptj", GPTJConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, rotary_dim=8),
        "GPTJForCausalLM",
    )
    mesa = ("--attention-backend", "mesa")
    no_tok = ("--skip-tokenizer-init",)
    cases = {
        "invalid-parameter": serve_command(
            tiny_llama_dir, *mesa, *no_tok, "--max-model-len", "256",
            "--additional-config", json.dumps({"mesa": {"C": 70}}), port=free_port()),
        "unknown-parameter": serve_command(
            tiny_llama_dir, *mesa, *no_tok, "--max-model-len", "256",
            "--additional-config", json.dumps({"mesa": {"stride": 4}}), port=free_port(),
            front="mesa-vllm"),
        "past-stair-capacity": serve_command(
            smollm2_dir, *mesa, "--max-model-len", "32768",
            "--additional-config", json.dumps({"mesa": {"E": 2}}), port=free_port(),
            front="mesa-vllm"),
        "past-any-stair": serve_command(
            tiny_llama_dir, *mesa, *no_tok, "--max-model-len", "100000", port=free_port()),
        "no-rope-model": serve_command(gpt2, *mesa, *no_tok, port=free_port()),
        "unsupported-architecture": serve_command(gptj, *mesa, *no_tok, port=free_port()),
    }
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(run_to_exit, cmd, timeout=600) for name, cmd in cases.items()}
        return {name: future.result() for name, future in futures.items()}


# What each refused start-up must say (regular expressions over the server's output).
EXPECTED = {
    "invalid-parameter":
        r"MesaConfigError: mesa limit F \+ C <= T is broken: .*A value that works: C=\d+",
    "unknown-parameter": r"MesaConfigError: unknown mesa parameter 'stride'",
    "past-stair-capacity":
        r"MesaConfigError: mesa limit max_model_len <= E \* \(T - 1 - R\) is broken: "
        r"max_model_len=32768 > 2 \* \(8192 - 1 - 4096\) = 8190.*Use E=\d+",  # default R = T/2
    "past-any-stair":
        r"MesaConfigError: mesa limit max_model_len <= E \* \(T - 1 - R\) cannot be met: "
        r"max_model_len=100000 .*Use --max-model-len \d+",
    "no-rope-model":
        r"MesaConfigError: GPT2\w* does not use rotary position embeddings.*"
        r"Supported architectures: .*LlamaForCausalLM",
    "unsupported-architecture":
        r"MesaConfigError: architecture GPTJForCausalLM is not supported by the mesa backend",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_startup_refused(refusals, case):
    pattern = EXPECTED[case]
    code, output = refusals[case]
    assert code != 0, f"{case}: exited 0\n{output[-3000:]}"
    assert re.search(pattern, output), f"{case}: message not found\n{output[-3000:]}"
    assert "Application startup complete" not in output
