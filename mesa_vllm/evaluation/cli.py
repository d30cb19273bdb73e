"""``mesa-vllm eval``: long-context quality of extrapolation methods, side by side.

Also the entry point of ``benchmarks/long_context.py`` (same arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

HELP = "long-context quality: passkey, RULER-style needles, perplexity; methods side by side"
DESCRIPTION = (
    "Evaluate extrapolation methods (origin = vLLM's default attention with plain RoPE, YaRN, "
    "dynamic NTK, mesa and mesa parameter variants) on passkey retrieval, RULER-style needle "
    "tasks and perplexity, at lengths from 2k to 64k, on the same prompts. Results are appended "
    "per sample to OUT/results.jsonl (a run resumes where the last one stopped); OUT/summary.md, "
    "summary.csv and PNG plots are written at the end. --plan prints the grid with time "
    "estimates and runs nothing. --endpoint URL sends the prompts to an OpenAI-compatible "
    "server (e.g. `vllm serve`) instead of starting engines."
)
DEFAULT_OUT = "benchmarks/results/long_context"
EPILOG = """\
methods: origin | yarn | ntk | mesa, optionally with parameters:
  yarn:factor=4  ntk:factor=2  mesa:E=4,R=512,C=2048,F=64,log_n=false
  (yarn/ntk without a factor use factor = L / T per length; mesa without parameters uses the
  defaults for max_model_len = L)
tasks: passkey niah_single niah_multikey niah_multivalue vt ppl
presets: smoke (default), issue4 (the full comparison), sweep (mesa E/R/C/log_n variants)

examples:
  mesa-vllm eval --preset issue4 --plan
  mesa-vllm eval --preset issue4 --out benchmarks/results/long_context --time-budget 8h
  mesa-vllm eval --preset sweep --out benchmarks/results/mesa_sweep
  mesa-vllm eval --tasks passkey --methods origin,mesa --lengths 4k,12k --samples 4
  mesa-vllm eval --endpoint http://localhost:8000/v1 --endpoint-label mesa-serve \\
      --tasks passkey --lengths 16k --samples 20
  mesa-vllm eval --report --out benchmarks/results/long_context
"""


def _split(values: list[str] | None) -> list[str] | None:
    """Comma-separated (and repeated) option values; ``KEY=VALUE`` pieces after a method with
    parameters belong to it: ``mesa:E=4,R=512,origin`` -> ``["mesa:E=4,R=512", "origin"]``."""
    if not values:
        return None
    out: list[str] = []
    for value in values:
        for piece in (p.strip() for p in value.split(",")):
            if not piece:
                continue
            if "=" in piece and ":" not in piece and out and ":" in out[-1]:
                out[-1] += "," + piece
            else:
                out.append(piece)
    return out


def parse_duration(text: str | None) -> float | None:
    """``"90"`` (seconds), ``"45m"``, ``"3h"``, ``"1h30m"`` -> seconds."""
    if not text:
        return None
    total = 0.0
    matched = False
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", text.strip().lower()):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit]
        matched = True
    if not matched:
        raise argparse.ArgumentTypeError(f"cannot read the duration {text!r} (use 3h, 45m, 90)")
    return total


def _engine_args(values: list[str] | None) -> dict:
    out = {}
    for item in values or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --engine-arg {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    g = p.add_argument_group("grid")
    g.add_argument("--preset", default=None, help="starting grid: smoke (default), issue4, sweep")
    g.add_argument("--tasks", action="append", help="comma-separated tasks (replaces the preset's)")
    g.add_argument("--methods", action="append",
                   help="comma-separated methods (replaces the preset's); repeatable")
    g.add_argument("--lengths", action="append", help="comma-separated lengths, e.g. 2k,4k,16k")
    g.add_argument("--samples", default=None,
                   help="samples per cell: N, or per task: passkey=20,ppl=6 (* = the rest)")
    g.add_argument("--max-samples-per-cell", type=int, default=None,
                   help="cap every cell at this many samples (a quick partial run)")
    g.add_argument("--cap", action="append", metavar="SELECTOR=N",
                   help="cap matching cells at N samples; SELECTOR joins a length, a task "
                        "and/or a method with @: origin@64k=3, yarn@32k=10, ppl@64k=2, "
                        "passkey@ntk@64k=5 (repeatable, comma-separated; replaces the preset's)")
    g.add_argument("--seed", type=int, default=0, help="base seed of the prompts (default 0)")
    o = p.add_argument_group("run")
    o.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    o.add_argument("--plan", action="store_true",
                   help="print the grid, what is done and the estimated time per cell; run nothing")
    o.add_argument("--report", action="store_true",
                   help="only (re)write the summary and plots from OUT/results.jsonl")
    o.add_argument("--no-report", action="store_true", help="do not write summary and plots")
    o.add_argument("--time-budget", type=parse_duration, default=None,
                   help="stop before a batch that would end past this (e.g. 6h, 90m)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--calibrate-from", action="append", metavar="DIR",
                   help="also use the timings in this results folder for estimates (repeatable; "
                        "OUT's own results are always used)")
    o.add_argument("--verbose", action="store_true", help="show vLLM's own log")
    e = p.add_argument_group("engine (offline vLLM)")
    e.add_argument("--model", default=None,
                   help="model folder (default: the embedded SmolLM2-135M-Instruct); with "
                        "--endpoint, the local folder whose tokenizer and config build prompts")
    e.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    e.add_argument("--trained-len", type=int, default=None,
                   help="T, the trained length (default: from the model's config)")
    e.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV cache per engine in GiB (default: sized per engine from its length)")
    e.add_argument("--batch-tokens", type=int, default=0,
                   help="send prompts to LLM.generate in batches of up to this many prompt "
                        "tokens (default 0: one prompt per call, so a result does not depend "
                        "on which prompts shared its batch; see the README)")
    e.add_argument("--compile", action="store_true",
                   help="let vLLM torch.compile (slower start; default: eager)")
    e.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    e.add_argument("--engine-arg", action="append", metavar="KEY=VALUE",
                   help="extra vllm.LLM keyword argument (JSON value), e.g. "
                        "max_num_batched_tokens=8192; repeatable")
    s = p.add_argument_group("endpoint (OpenAI-compatible server)")
    s.add_argument("--endpoint", default=None, metavar="URL",
                   help="send prompts to this server (e.g. http://localhost:8000/v1) instead of "
                        "starting engines")
    s.add_argument("--endpoint-model", default=None,
                   help="model name on the server (default: the first of /v1/models)")
    s.add_argument("--endpoint-label", default="endpoint",
                   help="method name for the server's results (default: endpoint)")
    s.add_argument("--endpoint-prompt", choices=["tokens", "text"], default="tokens",
                   help="send token ids (default; exact lengths) or the prompt text")
    s.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    s.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    s.add_argument("--request-timeout", type=float, default=3600.0,
                   help="seconds per request (default 3600)")


def build_grid(args: argparse.Namespace):
    from mesa_vllm.evaluation.grid import Grid
    from mesa_vllm.evaluation.methods import Method

    methods = _split(args.methods)
    if args.endpoint:
        methods = [Method(args.endpoint_label, "endpoint")]
    return Grid.from_options(
        preset=args.preset, tasks=_split(args.tasks), methods=methods,
        lengths=_split(args.lengths), samples=args.samples, seed=args.seed,
        max_samples_per_cell=args.max_samples_per_cell, caps=args.cap,
    )


def run(args: argparse.Namespace) -> int:
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from mesa_vllm.evaluation.report import write_report

    out = Path(args.out)
    if args.report:
        written = write_report(out)
        for name, path in written.items():
            print(f"{name}: {path}")
        return 0
    try:
        grid = build_grid(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from mesa_vllm.evaluation.harness import Runner, RunOptions, format_plan
    from mesa_vllm.tasks.texts import TextSourceError

    endpoint = None
    if args.endpoint:
        endpoint = {"url": args.endpoint, "model": args.endpoint_model,
                    "label": args.endpoint_label, "prompt_mode": args.endpoint_prompt,
                    "concurrency": args.concurrency, "api_key": args.api_key,
                    "timeout": args.request_timeout}
    options = RunOptions(
        out_dir=out, model=args.model, tokenizer=args.tokenizer, trained_len=args.trained_len,
        kv_cache_gib=args.kv_cache_gib, enforce_eager=not args.compile,
        prefix_caching=not args.no_prefix_caching, batch_tokens=args.batch_tokens,
        time_budget=args.time_budget, engine_kwargs=_engine_args(args.engine_arg),
        seed=args.seed, endpoint=endpoint, progress=not args.no_progress,
        calibrate_from=[Path(p) for p in args.calibrate_from or []],
    )
    runner = Runner(grid, options)
    print(format_plan(runner.plan, grid, args.time_budget))
    if args.plan:
        return 0
    if "ppl" in grid.tasks:
        try:
            from mesa_vllm.tasks.texts import find_austen_dir

            find_austen_dir()
        except TextSourceError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    stats = runner.run()
    print(f"\nran {stats['samples']} samples ({stats['rows']} result rows) on "
          f"{stats['engines']} engines in {stats['seconds'] / 60:.1f} min"
          + (f"; stopped: {stats['stopped']}" if stats["stopped"] else ""))
    print(f"results: {out / 'results.jsonl'}")
    if not args.no_report:
        written = write_report(out, runner.facts.trained_len)
        for name, path in written.items():
            print(f"{name}: {path}")
        print((out / "summary.md").read_text())
    return 0 if stats["stopped"] in (None, "time budget") else 130


# ``mesa-vllm prepare-text``
PREPARE_HELP = "get the perplexity text (Jane Austen's novels, Debian r-cran-janeaustenr)"


def add_prepare_text_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deb", default=None,
                   help="use this r-cran-janeaustenr .deb file instead of `apt-get download`")


def run_prepare_text(args: argparse.Namespace) -> int:
    from mesa_vllm.tasks.texts import TextSourceError, prepare_austen

    try:
        prepare_austen(args.deb)
    except TextSourceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
