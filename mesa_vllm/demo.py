"""``mesa-vllm demo``: passkey retrieval past the trained length, on the embedded model.

Builds one vLLM ``LLM`` on SmolLM2-135M-Instruct (trained length ``T`` = 8192), asks a handful of
passkey prompts of ``--length`` tokens (default 10240, past ``T``) with greedy decoding, and
prints what each should say, what it said, the accuracy and the time taken.

``--backend mesa`` starts vLLM with ``attention_backend="mesa"``. ``--backend default`` is
vLLM's own attention with plain RoPE: the model's rotary table is extended to
``max_model_len`` (``hf_overrides={"max_position_embeddings": ...}``) so positions past ``T`` are
rotated correctly, i.e. the usual "no extrapolation method" baseline. (Raising the length with
only ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` instead reads past the end of vLLM's rotary table: on
CPU that gives garbage in eager mode and an index error in compiled mode, which says nothing
about the model.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HELP = "passkey retrieval past the trained length on the embedded model"
DESCRIPTION = (
    "Passkey retrieval on the embedded SmolLM2-135M-Instruct (trained length T = 8192) with "
    "prompts past T, greedy. --backend mesa: attention_backend='mesa'. --backend default: "
    "vLLM's own attention with plain RoPE (rotary table extended to max_model_len)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["mesa", "default"], default="mesa",
                   help="attention backend (default: mesa)")
    p.add_argument("--length", type=int, default=10240,
                   help="prompt length in tokens (default: 10240; the model's T is 8192)")
    p.add_argument("--samples", type=int, default=4, help="number of prompts (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for keys and prompts (default: 0)")
    p.add_argument("--max-new-tokens", type=int, default=12,
                   help="tokens to generate (default: 12)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="engine max_model_len (default: length + max-new-tokens, "
                        "rounded up to 128)")
    p.add_argument("--kv-cache-gib", type=float, default=3.0,
                   help="KV cache size in GiB (default: 3)")
    p.add_argument("--compile", action="store_true",
                   help="let vLLM torch.compile the model (slower start; default: eager)")
    p.add_argument("--model", default=None,
                   help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--verbose", action="store_true", help="show vLLM's own log")


def engine_kwargs(args: argparse.Namespace, max_model_len: int) -> dict:
    """Keyword arguments for ``vllm.LLM`` (everything except the model)."""
    kwargs: dict = {
        "max_model_len": max_model_len,
        "kv_cache_memory_bytes": int(args.kv_cache_gib * (1 << 30)),
        "enforce_eager": not args.compile,
        "seed": args.seed,
    }
    if args.backend == "mesa":
        kwargs["attention_backend"] = "mesa"
    else:
        kwargs["hf_overrides"] = {"max_position_embeddings": max_model_len}
    return kwargs


def run(args: argparse.Namespace) -> int:
    if not args.verbose:
        # Set before vLLM is imported; the engine processes inherit it.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

    from mesa_vllm.assets import ModelAssetError, smollm2_path

    start = time.monotonic()
    try:
        model = args.model or str(smollm2_path(verbose=True))
    except ModelAssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    from transformers import AutoTokenizer

    from mesa_vllm.tasks.passkey import make_passkey_samples, score_passkey

    tokenizer = AutoTokenizer.from_pretrained(model)
    trained_len = _trained_len(model)
    samples = make_passkey_samples(tokenizer, args.length, args.samples, seed=args.seed)
    max_model_len = args.max_model_len or -(-(args.length + args.max_new_tokens) // 128) * 128

    print(f"mesa-vllm demo: backend={args.backend}, model={model}")
    print(f"{args.samples} passkey prompts of ~{args.length} tokens, greedy, "
          f"max_model_len={max_model_len}. Starting vLLM ...", flush=True)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from mesa_vllm.llm_utils import shutdown_llm

    t_engine = time.monotonic()
    llm = LLM(model=model, **engine_kwargs(args, max_model_len))
    try:
        t_gen = time.monotonic()
        params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=s.token_ids) for s in samples], params, use_tqdm=False
        )
        t_end = time.monotonic()
    finally:
        shutdown_llm(llm)
        del llm

    correct = 0
    for i, (sample, output) in enumerate(zip(samples, outputs), 1):
        text = output.outputs[0].text
        ok = score_passkey(text, sample.answer)
        correct += ok
        print(f"  [{i}] {sample.num_tokens} tokens, needle at depth {sample.meta['depth']:.2f}: "
              f"expected {sample.answer:>5}, got {text.strip()[:40]!r} -> "
              f"{'OK' if ok else 'wrong'}")
    print(f"accuracy: {correct}/{len(samples)} = {correct / len(samples):.0%} "
          f"(backend={args.backend}, length {args.length}, trained length T={trained_len})")
    print(f"time: engine start {t_gen - t_engine:.1f} s, generation {t_end - t_gen:.1f} s, "
          f"total {t_end - start:.1f} s")
    return 0


def _trained_len(model: str) -> int | None:
    import json
    from pathlib import Path

    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("max_position_embeddings")
