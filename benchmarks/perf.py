"""Speed and memory benchmark: mesa vs vLLM's default CPU attention (issue #5).

    python benchmarks/perf.py --plan                 # groups, what is done, time estimate
    python benchmarks/perf.py --time-budget 10h      # measure (resumes from the JSONL)
    python benchmarks/perf.py --report               # rebuild the JSON / Markdown / PNG
    python benchmarks/perf.py --profile              # py-spy + torch profiler, one mesa run

The same as ``mesa-vllm bench``; see ``mesa-vllm bench --help`` and
``mesa_vllm/bench/__init__.py``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from mesa_vllm.bench import cli

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="perf.py", description=cli.DESCRIPTION)
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv), argv)


if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    sys.exit(main())
