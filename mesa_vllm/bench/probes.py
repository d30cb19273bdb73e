"""Functions run inside vLLM's worker process through ``LLM.collective_rpc``.

They live at module level in an installed module so the worker can unpickle them by reference.
"""

from __future__ import annotations


def kv_cache_probe(worker=None) -> dict:
    """What the worker allocated for the KV cache: bytes per token summed over layers, blocks."""
    runner = worker.model_runner
    out: dict = {}
    specs = runner.get_kv_cache_spec()
    out["num_layers"] = len(specs)
    out["page_bytes_all_layers"] = sum(int(s.page_size_bytes) for s in specs.values())
    block_sizes = sorted({int(s.block_size) for s in specs.values()})
    out["block_size"] = block_sizes[0] if len(block_sizes) == 1 else block_sizes
    first = next(iter(specs.values()))
    for name in ("num_kv_heads", "head_size", "num_head_slots"):
        value = getattr(first, name, None)
        out[name] = int(value) if value is not None else None
    out["dtype"] = str(getattr(first, "dtype", ""))
    out["kv_bytes_per_token"] = out["page_bytes_all_layers"] / min(block_sizes)
    config = getattr(runner, "kv_cache_config", None)
    if config is not None:
        out["num_blocks"] = int(config.num_blocks)
        out["allocated_bytes"] = int(sum(t.size for t in config.kv_cache_tensors))
    return out
