"""Child process: one fresh vLLM engine (one backend, one length) measures its pending cells.

    python -m mesa_vllm.bench.engine_run SPEC.json

``SPEC.json`` (written by :mod:`mesa_vllm.bench.runner`) holds the run's
:class:`~mesa_vllm.bench.config.BenchConfig`, the backend, the length, the cells to measure
with their estimates, the results file and a deadline. Each finished cell is appended to the
results file at once. Both backends get the same engine settings
(:meth:`BenchConfig.engine_settings`); the default backend's rotary table is extended to
``max_model_len`` (``hf_overrides={"max_position_embeddings": max_model_len}``, as the demo
does), so past ``T`` it computes plain RoPE attention at full speed instead of reading past the
end of vLLM's table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from mesa_vllm.engine import allow_long_steps


def _set_env(config, settings: dict, verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(settings["kv_cache_gib"]))
    # LLM.collective_rpc with a function (the KV-cache probe) needs pickle.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    allow_long_steps()  # default@64k: one prefill step outlasts vLLM's 300 s step timeout


def engine_kwargs(backend: str, config, settings: dict) -> dict:
    """``vllm.LLM`` keyword arguments (everything but the model) for one backend."""
    max_model_len = settings["max_model_len"]
    kwargs = {
        "max_model_len": max_model_len,
        "max_num_batched_tokens": settings["max_num_batched_tokens"],
        "block_size": settings["block_size"],
        "dtype": settings["dtype"],
        "enforce_eager": settings["enforce_eager"],
        "enable_prefix_caching": settings["enable_prefix_caching"],
        # Per-request engine timestamps (RequestOutput.metrics); off by default in LLM.
        "disable_log_stats": False,
        "seed": config.seed,
    }
    if backend == "mesa":
        kwargs["attention_backend"] = "mesa"
        if config.mesa:
            kwargs["additional_config"] = {"mesa": dict(config.mesa)}
    elif backend == "default":
        kwargs["hf_overrides"] = {"max_position_embeddings": max_model_len}
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return kwargs


def traced_generate(llm, prompts: list[list[int]], max_tokens: int,
                    on_step=None) -> dict:
    """Run ``prompts`` (token ids) to ``max_tokens`` greedy tokens each, stepping the engine
    here and recording the engine's timestamp of every generated token (see
    :mod:`mesa_vllm.bench.metrics`). ``on_step(trace)`` is called after every step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            detokenize=False)
    engine = llm.llm_engine
    processor = engine.output_processor
    t_submit = time.monotonic()
    ids = llm.enqueue([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                      use_tqdm=False)
    # enqueue returns the engine's internal ids; outputs carry the external ones.
    states = processor.request_states
    external = [str(states[i].external_req_id) if i in states else str(i) for i in ids]
    tokens: dict[str, list[float]] = {rid: [] for rid in external}
    requests: dict[str, dict] = {rid: {} for rid in external}

    def record(rid: str, stats, prompt_len=None, cached=None) -> None:
        if rid not in tokens or stats is None:
            return
        info = requests[rid]
        info["queued_ts"] = stats.queued_ts
        info["scheduled_ts"] = stats.scheduled_ts
        info["num_preemptions"] = stats.num_preemptions
        if prompt_len is not None:
            info["prompt_len"] = int(prompt_len)
        if cached is not None:
            info["num_cached_tokens"] = int(cached)
        seen = tokens[rid]
        while len(seen) < stats.num_generation_tokens:
            seen.append(stats.last_token_ts)

    trace = {"t_submit": t_submit, "requests": requests, "tokens": tokens}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        for state in list(processor.request_states.values()):
            record(str(state.external_req_id), state.stats, state.prompt_len,
                   state.num_cached_tokens)
        for out in outputs:
            if out.finished:
                record(str(out.request_id), out.metrics, len(out.prompt_token_ids or []),
                       out.num_cached_tokens)
        if on_step is not None:
            on_step(trace)
    trace["t_end"] = time.monotonic()
    return trace


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_group(spec: dict) -> int:
    from mesa_vllm.bench.config import SCENARIOS, BenchConfig, ModelShape, prompt_seed
    from mesa_vllm.bench.memory import TreeMemory
    from mesa_vllm.bench.metrics import cell_metrics
    from mesa_vllm.bench.store import append_rows

    config = BenchConfig.from_dict(spec["config"])
    shape = ModelShape(**spec["shape"])
    backend, length = spec["backend"], int(spec["length"])
    settings = config.engine_settings(shape)
    results = Path(spec["results"])
    deadline = spec.get("deadline")
    scale = float(spec.get("scale", 1.0))
    _set_env(config, settings, spec.get("verbose", False))

    memory = TreeMemory().start()
    from vllm import LLM

    import vllm
    from mesa_vllm.bench.probes import kv_cache_probe
    from mesa_vllm.llm_utils import shutdown_llm
    from mesa_vllm.testing import random_prompt

    common = {
        "type": "cell", "backend": backend, "length": length,
        "fingerprint": spec["fingerprint"], "run_id": spec.get("run_id"),
        "engine": settings, "vllm": vllm.__version__,
    }
    t0 = time.monotonic()
    try:
        llm = LLM(model=spec["model"], **engine_kwargs(backend, config, settings))
    except Exception as error:  # report, do not retry forever
        append_rows(results, [{**common, "type": "engine", "error": repr(error)[:2000]}])
        print(f"[bench] {backend}@{length}: engine failed to start: {error!r}", flush=True)
        memory.stop()
        return 1
    start_s = time.monotonic() - t0
    try:
        try:
            kv = llm.collective_rpc(kv_cache_probe)[0]
        except Exception as error:  # fall back to what the front end knows
            cache = llm.llm_engine.vllm_config.cache_config
            kv = {"probe_error": repr(error)[:500], "num_blocks": cache.num_gpu_blocks,
                  "block_size": cache.block_size}
        geometry = None
        if backend == "mesa":
            from mesa_vllm.params import resolve_geometry
            geometry = resolve_geometry(shape.trained_len, settings["max_model_len"],
                                        config.mesa).as_dict()
        # Warm-up: first use of the kernels, allocator, thread pools.
        t_warm = time.monotonic()
        if config.warmup_tokens > 0:
            traced_generate(llm, [random_prompt(config.warmup_tokens, 999_999, vocab=40000)], 4)
        warm_s = time.monotonic() - t_warm
        memory.sample()
        append_rows(results, [{
            **common, "type": "engine", "start_s": start_s, "warmup_s": warm_s, "kv": kv,
            "mesa_geometry": geometry, "idle_rss": memory.sample(), "loadavg": _loadavg(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "time": time.time(),
        }])
        print(f"[bench] {backend}@{length}: engine up in {start_s:.0f}s (+{warm_s:.0f}s warm-up), "
              f"KV {kv.get('kv_bytes_per_token')} B/token", flush=True)

        for scenario, rep, estimate in spec["cells"]:
            if deadline is not None and time.time() + estimate * scale > deadline:
                print(f"[bench] {backend}@{length}: time budget reached before "
                      f"{scenario} rep {rep}; stopping", flush=True)
                break
            n = SCENARIOS[scenario]
            prompts = [random_prompt(length, prompt_seed(length, rep, i, config.seed),
                                     vocab=40000) for i in range(n)]
            max_tokens = config.max_tokens(length, n)
            load_before = _loadavg()
            mem0 = memory.begin()
            row = {**common, "scenario": scenario, "rep": rep, "n_requests": n,
                   "max_tokens": max_tokens, "estimate_s": estimate}
            try:
                trace = traced_generate(llm, prompts, max_tokens)
            except Exception as error:
                row.update({"error": repr(error)[:2000], **memory.end(), **mem0})
                append_rows(results, [row])
                print(f"[bench] {backend}@{length} {scenario} rep {rep}: error {error!r}",
                      flush=True)
                return 1
            mem1 = memory.end()
            figures = cell_metrics(trace)
            row.update(figures)
            row.update(mem0)
            row.update(mem1)
            row["kv_allocated_bytes"] = kv.get("allocated_bytes")
            row["kv_bytes_per_token"] = kv.get("kv_bytes_per_token")
            if kv.get("kv_bytes_per_token"):
                row["kv_bytes_used"] = kv["kv_bytes_per_token"] * n * (length + max_tokens)
            row["loadavg_before"] = load_before
            row["loadavg_after"] = _loadavg()
            row["time"] = time.time()
            append_rows(results, [row])
            dec = figures.get("decode_tok_s")
            print(f"[bench] {backend}@{length} {scenario} rep {rep}: "
                  f"prefill {figures.get('prefill_s', float('nan')):.2f}s "
                  f"({figures.get('prefill_tok_s') or 0:.0f} tok/s), "
                  f"decode {dec or 0:.1f} tok/s, peak {mem1.get('peak_rss', 0) / 2**30:.2f} GiB",
                  flush=True)
    finally:
        memory.stop()
        shutdown_llm(llm)
        del llm
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    return run_group(spec)


if __name__ == "__main__":
    sys.exit(main())
