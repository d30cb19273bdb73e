"""Profile one mesa prefill and one decode window (py-spy + torch profiler, in-process engine).

    python benchmarks/profile_mesa.py                         # mesa, 32k prompt, 64 decode steps
    python benchmarks/profile_mesa.py --profile-length 64k
    python benchmarks/profile_mesa.py --profile-backend default

Same as ``mesa-vllm bench --profile``; writes benchmarks/results/profile_<backend>_<len>.{md,json}
and the raw py-spy stacks (``*.pyspy``).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    import argparse

    from mesa_vllm.bench import cli

    argv = ["--profile", *(sys.argv[1:] if argv is None else argv)]
    parser = argparse.ArgumentParser(prog="profile_mesa.py", description=cli.DESCRIPTION)
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv), argv)


if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    sys.exit(main())
