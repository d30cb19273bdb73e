"""Child process: time the dense oracle (:class:`mesa_vllm.oracle.MesaOracle`, Hugging Face
model, every pair scored explicitly) on the same prompts vLLM gets, at the lengths it reaches.

    python -m mesa_vllm.bench.oracle_run SPEC.json

Greedy ``generate`` of ``oracle_decode_tokens``: the first model call is the prefill (its end is
the first token), the following calls are single-token decode steps with a KV cache. The
geometry is the one the vLLM mesa engine resolves for the same ``max_model_len``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def run_group(spec: dict) -> int:
    import torch

    from mesa_vllm.bench.config import BenchConfig, ModelShape, prompt_seed
    from mesa_vllm.bench.memory import TreeMemory
    from mesa_vllm.bench.metrics import cell_metrics
    from mesa_vllm.bench.store import append_rows
    from mesa_vllm.oracle import load_oracle
    from mesa_vllm.testing import random_prompt

    config = BenchConfig.from_dict(spec["config"])
    shape = ModelShape(**spec["shape"])
    length = int(spec["length"])
    results = Path(spec["results"])
    deadline = spec.get("deadline")
    scale = float(spec.get("scale", 1.0))
    common = {"type": "cell", "backend": "oracle", "length": length,
              "fingerprint": spec["fingerprint"], "run_id": spec.get("run_id")}

    memory = TreeMemory().start()
    t0 = time.monotonic()
    threads = config.oracle_threads if config.oracle_threads else "auto"
    oracle = load_oracle(spec["model"], T=shape.trained_len,
                         max_model_len=config.resolved_max_model_len(),
                         dtype=getattr(torch, config.oracle_dtype), num_threads=threads,
                         **config.mesa)
    start_s = time.monotonic() - t0
    append_rows(results, [{**common, "type": "engine", "start_s": start_s,
                           "mesa_geometry": oracle.geometry.as_dict(),
                           "threads": threads, "time": time.time()}])

    calls: list[float] = []
    forward = oracle._forward

    def timed_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(time.monotonic())
        return out

    oracle._forward = timed_forward
    try:
        for scenario, rep, estimate in spec["cells"]:
            if deadline is not None and time.time() + estimate * scale > deadline:
                print(f"[bench] oracle@{length}: time budget reached; stopping", flush=True)
                break
            prompt = random_prompt(length, prompt_seed(length, rep, 0, config.seed), vocab=40000)
            calls.clear()
            mem0 = memory.begin()
            t_submit = time.monotonic()
            oracle.generate(prompt, config.oracle_decode_tokens)
            t_end = time.monotonic()
            trace = {"t_submit": t_submit, "t_end": t_end,
                     "requests": {"0": {"scheduled_ts": t_submit, "prompt_len": length}},
                     "tokens": {"0": list(calls)}}
            row = {**common, "scenario": scenario, "rep": rep, "n_requests": 1,
                   "max_tokens": config.oracle_decode_tokens, "estimate_s": estimate,
                   **cell_metrics(trace), **mem0, **memory.end(),
                   "loadavg_after": list(os.getloadavg()), "time": time.time()}
            append_rows(results, [row])
            print(f"[bench] oracle@{length} rep {rep}: prefill {row['prefill_s']:.1f}s, "
                  f"decode {row.get('decode_tok_s') or 0:.2f} tok/s", flush=True)
    finally:
        memory.stop()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_group(json.loads(Path(argv[0]).read_text()))


if __name__ == "__main__":
    sys.exit(main())
