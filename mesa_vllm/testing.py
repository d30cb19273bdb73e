"""Tiny randomly initialised models for fast, exact tests (no download, seconds to build)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VOCAB = 256

# The tiny-Llama exactness setup shared by the engine-vs-oracle tests: T = 64 with chunks,
# window and stair step that put every role in play below 8T + 3T, which the stair covers
# (capacity 16 * (64 - 1 - 16) = 752).
TINY_T = 64
TINY_MESA = {"F": 16, "C": 24, "R": 16, "E": 16}
TINY_MAX_LEN = 11 * TINY_T + 32
# fp32 end to end; the oracle rotates in float64 per pair, vLLM in fp32 at absolute
# positions, so small differences remain.
ORACLE_LOGPROB_ATOL = 2e-3


def make_tiny_model(
    path: str | Path,
    config,
    *,
    seed: int = 0,
    init_std: float | None = None,
) -> Path:
    """Write a tiny random ``*ForCausalLM`` built from a ``transformers`` config (fp32
    safetensors) to ``path``; the class comes from ``AutoModelForCausalLM``.

    Give ``config`` a large ``initializer_range`` (or pass ``init_std``): random models
    with the usual 0.02 give nearly flat next-token distributions, where greedy decoding
    flips on rounding noise. With a larger scale the top token usually wins by a clear
    margin, so token-for-token comparisons test the attention rule rather than float luck.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if init_std is not None:
        config.initializer_range = init_std
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    model.save_pretrained(path, safe_serialization=True)
    # Record how it was made, for humans reading a temp dir.
    (path / "mesa_tiny.json").write_text(
        json.dumps({"seed": seed, "init_std": config.initializer_range})
    )
    return path


def make_tiny_llama(
    path: str | Path,
    *,
    trained_len: int = 64,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    rope_theta: float = 10000.0,
    init_std: float = 0.25,
    extra_config: dict | None = None,
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` (fp32 safetensors) to ``path``.

    ``init_std`` is large on purpose (see :func:`make_tiny_model`).
    """
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=trained_len,
        rope_theta=rope_theta,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
        **(extra_config or {}),
    )
    return make_tiny_model(path, config, seed=seed)


def random_prompt(length: int, seed: int, vocab: int = TINY_VOCAB) -> list[int]:
    """Token ids in ``[3, vocab)`` (skipping bos/eos/pad) for tiny-model tests."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def worker_plugin_probe(worker=None) -> dict:
    """Report, from inside the process running it, whether the ``mesa`` plugin is registered there.

    Meant for ``LLM.collective_rpc(worker_plugin_probe)``: vLLM calls it in every worker process
    with the worker object as its argument. It lives at module level in an installed module so
    that the worker can unpickle it by reference. Returns plain values only: pid, parent pid,
    whether ``AttentionBackendEnum`` has the ``MESA`` member that ``mesa_vllm.register()``
    creates, and whether vLLM's general plugins were loaded in that process.
    """
    import os

    import vllm.plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "mesa_registered": "MESA" in AttentionBackendEnum.__members__,
        "plugins_loaded": bool(vllm.plugins.plugins_loaded),
        "worker_class": type(worker).__name__ if worker is not None else None,
    }


def shutdown_llm(llm) -> None:
    """Stop an ``LLM``'s engine processes (for module-scoped engine fixtures' teardown)."""
    from mesa_vllm.llm_utils import shutdown_llm as _shutdown

    _shutdown(llm)


# ----------------------------------------------------------------------------------------
# Engine helpers shared by the exactness tests (tiny models, token-id prompts).
def tiny_engine(model_dir, **kwargs):
    """A ``vllm.LLM`` on a tiny model: fp32, token ids in and out, 32-token blocks."""
    from vllm import LLM

    options = {"dtype": "float32", "enforce_eager": True, "skip_tokenizer_init": True, "block_size": 32}
    options.update(kwargs)
    return LLM(model=str(model_dir), **options)


def prompt_logprobs(llm, prompts: list[list[int]]) -> list[list[float | None]]:
    """Per-position logprob of each prompt token given the ones before (``[None, ...]``)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [
        [None] + [out.prompt_logprobs[i][t].logprob for i, t in enumerate(p) if i > 0]
        for out, p in zip(outputs, prompts)
    ]


def greedy(llm, prompts: list[list[int]], max_tokens: int | list[int]) -> list[dict]:
    """Greedy continuations: tokens, their logprobs, and prefix-cache hits per request."""
    from vllm import SamplingParams

    counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    params = [
        SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0, detokenize=False)
        for n in counts
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        results.append(
            {
                "tokens": list(completion.token_ids),
                "logprobs": [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)],
                "cached_tokens": out.num_cached_tokens or 0,
            }
        )
    return results


# A greedy step whose top two oracle logits are closer than this is a near-tie: fp32 rounding
# in vLLM (fused kernels, other summation orders) may pick either token. Real rule errors move
# logits by far more (tenths on the tiny models), and prompt logprobs are checked to 2e-3.
GREEDY_TIE_TOL = 2e-3


def greedy_mismatches(step_scores: torch.Tensor, tokens: list[int], *,
                      tie_tol: float = GREEDY_TIE_TOL) -> tuple[list[str], int]:
    """Compare greedy ``tokens`` with reference scores ``[n, vocab]`` (logits or logprobs) of
    the steps that chose them: each token must be the reference's argmax, or within ``tie_tol``
    of it. Returns the violations and how many near-ties were accepted."""
    problems, ties = [], 0
    for i, token in enumerate(tokens):
        best = int(step_scores[i].argmax())
        if best == token:
            continue
        gap = float(step_scores[i, best] - step_scores[i, token])
        if gap <= tie_tol:
            ties += 1
        else:
            problems.append(f"generated token {i}: engine chose {token}, the reference's {best} "
                            f"is higher by {gap:.2e}")
    return problems, ties


def greedy_mismatches_vs_oracle(
    oracle, prompt: list[int], tokens: list[int], *, tie_tol: float = GREEDY_TIE_TOL
) -> tuple[list[str], int]:
    """Teacher-forced check of a greedy continuation against the dense oracle.

    The oracle recomputes ``prompt + tokens`` (roles from ``len(prompt)``) and every generated
    position is checked with :func:`greedy_mismatches`, also after a near-tie went the other
    way, where comparing with the oracle's own greedy run would only find where the two runs
    parted.
    """
    if not tokens:
        return [], 0
    logits = oracle.logits(list(prompt) + list(tokens), prompt_len=len(prompt)).double()
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    return greedy_mismatches(steps, tokens, tie_tol=tie_tol)


MAX_GREEDY_TIES = 2


def check_greedy_result(problems: list[str], ties: int, where: str,
                        max_ties: int = MAX_GREEDY_TIES) -> None:
    """Fail on any violation, or on more than ``max_ties`` near-ties (a backend that is off
    everywhere must not pass as a run of ties)."""
    assert not problems, f"{where}: " + "; ".join(problems[:3])
    assert ties <= max_ties, f"{where}: {ties} near-ties, more than {max_ties} is not noise"


def assert_greedy_matches_oracle(oracle, prompt: list[int], tokens: list[int],
                                 label: str = "") -> None:
    """Every generated token is the oracle's choice, up to a few near-ties."""
    problems, ties = greedy_mismatches_vs_oracle(oracle, prompt, tokens)
    check_greedy_result(problems, ties, f"{label} L={len(prompt)}".strip())
