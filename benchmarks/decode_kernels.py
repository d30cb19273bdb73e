"""Decode attention kernels side by side at one context length, no engine (~1 minute).

    python benchmarks/decode_kernels.py                    # 32k keys, window 515
    python benchmarks/decode_kernels.py --length 65536

Times vLLM's CPU kernel (vec, and amx where the CPU has it), SGLang's paged decode that
mesa's stair pass runs (vec layout), the rest of a mesa decode layer, and the window turn
of mesa's one-pass decode (amx layout); checks every kernel against a float64 reference first. Writes benchmarks/results/decode_kernels_<len>.{md,json}.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def main(argv=None) -> int:
    from mesa_vllm.bench.config import format_length, parse_length
    from mesa_vllm.bench.kernels import measure, to_markdown, write

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="decode_kernels.py", description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=parse_length, default=32768, help="keys (e.g. 32k); default 32k")
    parser.add_argument("--window", type=int, default=515,
                        help="mesa's window keys at this step (default 515: half of R=1030)")
    parser.add_argument("--reps", type=int, default=20, help="kernel calls per timed batch")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    args = parser.parse_args(argv)
    report = measure(args.length, args.window, args.reps)
    command = shlex.join(["python", "benchmarks/decode_kernels.py", *argv])
    name = f"decode_kernels_{format_length(args.length)}"
    paths = write(report, args.out, name, command)
    print(to_markdown(report, command))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
