"""``mesa-vllm bench`` (also ``python benchmarks/perf.py``): arguments and entry point."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mesa_vllm.bench.config import (
    BACKENDS, SCENARIOS, BenchConfig, parse_duration, parse_length, parse_lengths, parse_reps_at)

HELP = "prefill, decode and memory: mesa vs vLLM's default backend, side by side"
DESCRIPTION = (
    "Measure mesa and vLLM's default CPU attention in the same run on the embedded "
    "SmolLM2-135M-Instruct: prefill throughput and time to first token, decode throughput, peak "
    "memory of the engine's process tree and KV bytes per token, for one request and a batch "
    "of 4, at each length; each backend and length in a fresh engine process; figures as "
    "min/median over repetitions and mesa/default ratios. Also times the dense oracle at short "
    "lengths. Results: OUT/NAME.jsonl (raw, resumable), OUT/NAME.json, OUT/NAME.md, OUT/NAME.png. "
    "--plan prints the groups and a time estimate; --profile profiles one mesa prefill and "
    "decode window instead."
)

DEFAULT_OUT = "benchmarks/results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--lengths", default="8k,16k,32k,64k",
                   help="prompt lengths (default: 8k,16k,32k,64k)")
    w.add_argument("--reps", type=int, default=3, help="repetitions per cell (default: 3)")
    w.add_argument("--reps-at", default="",
                   help="repetitions at given lengths, e.g. '32k=2,64k=1' (default: --reps)")
    w.add_argument("--scenarios", default="single,batch4",
                   help=f"of {','.join(SCENARIOS)} (default: both)")
    w.add_argument("--batch-lengths", default=None,
                   help="lengths at which the batch of 4 runs (default: all)")
    w.add_argument("--backends", default=",".join(BACKENDS),
                   help="of mesa,default (default: both)")
    w.add_argument("--decode-tokens", type=int, default=64,
                   help="decode steps measured after the first token (default: 64)")
    w.add_argument("--warmup-tokens", type=int, default=1024,
                   help="prompt length of each engine's warm-up request (default: 1024; 0: none)")
    w.add_argument("--seed", type=int, default=0, help="prompt seed (default: 0)")

    e = p.add_argument_group("engine (the same for both backends)")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="default: longest length + generated tokens, rounded up to 256")
    e.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="prefill chunk (default: 8192)")
    e.add_argument("--block-size", type=int, default=128, help="KV block size (default: 128)")
    e.add_argument("--kv-cache-gib", type=int, default=None,
                   help="KV cache (VLLM_CPU_KVCACHE_SPACE) for both backends, whole GiB "
                        "(default: enough for the largest cell of mesa, which needs 1.5x)")
    e.add_argument("--compile", action="store_true",
                   help="torch.compile both engines (default: enforce_eager for both)")
    e.add_argument("--mesa", default="",
                   help="mesa parameter overrides, e.g. 'E=16,R=1024' (additional_config)")

    o = p.add_argument_group("dense oracle")
    o.add_argument("--oracle-lengths", default="512,1k,2k",
                   help="lengths to time the dense oracle at, also measured on vLLM "
                        "(one request) for the comparison (default: 512,1k,2k; 'none' to skip)")
    o.add_argument("--oracle-reps", type=int, default=1)
    o.add_argument("--oracle-decode-tokens", type=int, default=8)
    o.add_argument("--oracle-threads", type=int, default=None,
                   help="torch threads for the oracle (default: its own choice, 1 for small "
                        "models; more threads crawl on a busy machine)")

    r = p.add_argument_group("run")
    r.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    r.add_argument("--name", default="perf", help="results name (default: perf)")
    r.add_argument("--model", default=None,
                   help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    r.add_argument("--time-budget", default=None,
                   help="stop starting work that would end after this (e.g. 8h, 90m); groups "
                        "that do not fit are left for a later run")
    r.add_argument("--plan", action="store_true",
                   help="print the groups, what is done and the time estimate; run nothing")
    r.add_argument("--report", action="store_true",
                   help="only rebuild NAME.json/.md/.png from NAME.jsonl")
    r.add_argument("--verbose", action="store_true", help="show the engines' own logs")

    f = p.add_argument_group("profiling (--profile)")
    f.add_argument("--profile", action="store_true",
                   help="instead of the benchmark: one mesa prefill and one decode window, "
                        "in-process engine, under py-spy and the torch profiler; top frames "
                        "and ops to OUT/profile_<backend>_<length>.md")
    f.add_argument("--profile-length", default="32k", help="prompt length (default: 32k)")
    f.add_argument("--profile-decode-tokens", type=int, default=64,
                   help="decode steps profiled (default: 64)")
    f.add_argument("--profile-backend", default="mesa", choices=list(BACKENDS))
    f.add_argument("--profile-tools", default="py-spy,torch",
                   help="py-spy and/or torch (default: both)")


def _parse_mesa(text: str) -> dict:
    out = {}
    for part in (text or "").split(","):
        if part.strip():
            key, _, value = part.partition("=")
            out[key.strip()] = value.strip()
    if out:
        from mesa_vllm.params import MesaConfigError, read_overrides

        try:
            out = read_overrides(out, environ={})
        except MesaConfigError as exc:  # a usage error, not a crash: no traceback
            raise SystemExit(f"error: --mesa {text!r}: {exc} Write it as NAME=VALUE,... "
                             "e.g. --mesa R=2048,E=6") from None
    return out


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"error: unknown backend {b!r}; use {','.join(BACKENDS)}")
    for s in scenarios:
        if s not in SCENARIOS:
            raise SystemExit(f"error: unknown scenario {s!r}; use {','.join(SCENARIOS)}")
    oracle = () if str(args.oracle_lengths).strip().lower() in ("", "none", "0") \
        else tuple(parse_lengths(args.oracle_lengths))
    return BenchConfig(
        lengths=tuple(parse_lengths(args.lengths)),
        backends=backends,
        scenarios=scenarios,
        reps=args.reps,
        reps_at=parse_reps_at(args.reps_at),
        batch_lengths=tuple(parse_lengths(args.batch_lengths)) if args.batch_lengths else None,
        decode_tokens=args.decode_tokens,
        warmup_tokens=args.warmup_tokens,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_gib=args.kv_cache_gib,
        compile=args.compile,
        mesa=_parse_mesa(args.mesa),
        oracle_lengths=oracle,
        oracle_reps=args.oracle_reps,
        oracle_decode_tokens=args.oracle_decode_tokens,
        oracle_threads=args.oracle_threads,
        seed=args.seed,
    )


def _model(args) -> str | None:
    if args.model:
        return args.model
    from mesa_vllm.assets import ModelAssetError, smollm2_path

    try:
        return str(smollm2_path(verbose=True))
    except ModelAssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from mesa_vllm.bench import runner

    config = config_from_args(args)
    model = _model(args)
    if model is None:
        return 1
    paths = runner.Paths(Path(args.out), args.name)
    budget = parse_duration(args.time_budget)
    command = "mesa-vllm bench " + shlex.join(sys.argv[2:] if argv is None else argv)
    if args.profile:
        from mesa_vllm.bench import profile

        return profile.run(config, paths.out_dir, model, backend=args.profile_backend,
                           length=parse_length(args.profile_length),
                           decode_tokens=args.profile_decode_tokens,
                           tools=[t.strip() for t in args.profile_tools.split(",") if t.strip()],
                           verbose=args.verbose)
    if args.report:
        runner.report(config, paths, model, command=command)
        return 0
    if args.plan:
        shape = runner.model_shape(model)
        groups, cost, geometry = runner.plan(config, paths, shape, budget,
                                             include_oracle=bool(config.oracle_lengths))
        settings = config.engine_settings(shape)
        print(f"engine settings (both backends): {settings}")
        print(f"mesa geometry at max_model_len={settings['max_model_len']}: {geometry}")
        print(runner.format_plan(groups, budget, cost))
        return 0
    return runner.run(config, paths, model, budget_s=budget,
                      include_oracle=bool(config.oracle_lengths), verbose=args.verbose,
                      command=command)
