"""Long-context quality benchmark: the same harness as ``mesa-vllm eval``.

    python benchmarks/long_context.py --preset issue4 --plan
    python benchmarks/long_context.py --preset issue4 --time-budget 8h

Passkey, RULER-style needles (single, multi-key, multi-value, variable tracking) and perplexity,
for origin (vLLM default attention), YaRN, dynamic NTK and mesa, at 2k-64k on the embedded
SmolLM2-135M-Instruct by default. See ``mesa-vllm eval --help`` and the README.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from mesa_vllm.evaluation import cli

    parser = argparse.ArgumentParser(prog="long_context.py", description=cli.DESCRIPTION)
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    sys.exit(main())
