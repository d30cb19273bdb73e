"""Per-cell figures from one traced ``generate`` (engine-free, pure).

The engine runs with ``disable_log_stats=False``, so vLLM keeps, per request, its own
engine-core timestamps (``RequestStateStats``: ``queued_ts``, ``scheduled_ts``, and the time
of every new token, all ``time.monotonic()`` of the EngineCore process, which on Linux is the
same clock as the harness's). The runner steps the engine itself and records, per request, the
timestamp of each generated token. A trace is::

    {"t_submit": float,                      # harness clock, just before the requests are added
     "t_end": float,                         # harness clock, after the last step
     "requests": {rid: {"queued_ts": float, "scheduled_ts": float, "prompt_len": int,
                        "num_cached_tokens": int, "num_preemptions": int}},
     "tokens": {rid: [ts of token 1, ts of token 2, ...]}}

Figures:

- ``prefill_s``: from the first request's scheduling to the last request's first token
  (engine clock); ``prefill_tok_s`` = all prompt tokens / ``prefill_s``.
- ``ttft_s``: submit -> first token, per request (max over the batch; median kept too).
- decode: the window in which **every** request of the cell is decoding (from the last first
  token to the first request's last token); ``decode_tok_s`` = tokens generated in the window
  (all requests together) / its length, ``decode_step_ms`` = median time between steps in it.
  For a single request that is simply tokens 2..N over their span.
"""

from __future__ import annotations

import statistics


def cell_metrics(trace: dict) -> dict:
    requests = trace.get("requests") or {}
    tokens = {rid: list(ts) for rid, ts in (trace.get("tokens") or {}).items()}
    t_submit = float(trace["t_submit"])
    out: dict = {"n_requests": len(requests)}
    if not requests or any(not tokens.get(rid) for rid in requests):
        out["error"] = "a request produced no token"
        return out

    prompt_tokens = sum(int(r.get("prompt_len", 0)) for r in requests.values())
    firsts = {rid: tokens[rid][0] for rid in requests}
    lasts = {rid: tokens[rid][-1] for rid in requests}
    scheduled = [float(r["scheduled_ts"]) for r in requests.values() if r.get("scheduled_ts")]
    start = min(scheduled) if scheduled else t_submit
    prefill = max(firsts.values()) - start
    ttfts = sorted(firsts[rid] - t_submit for rid in requests)
    out.update({
        "prompt_tokens": prompt_tokens,
        "prefill_s": prefill,
        "prefill_tok_s": prompt_tokens / prefill if prefill > 0 else None,
        "ttft_s": ttfts[-1],
        "ttft_median_s": statistics.median(ttfts),
        "queue_s": (start - t_submit),
        "gen_tokens": sum(len(tokens[rid]) for rid in requests),
        "cached_tokens": sum(int(r.get("num_cached_tokens") or 0) for r in requests.values()),
        "preemptions": sum(int(r.get("num_preemptions") or 0) for r in requests.values()),
    })
    if trace.get("t_end") is not None:
        out["wall_s"] = float(trace["t_end"]) - t_submit

    window_start = max(firsts.values())
    window_end = min(lasts.values())
    in_window = [t for rid in requests for t in tokens[rid] if window_start < t <= window_end]
    span = window_end - window_start
    if span > 0 and in_window:
        steps = sorted({window_start, *in_window})
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        out.update({
            "decode_s": span,
            "decode_tokens": len(in_window),
            "decode_tok_s": len(in_window) / span,
            "decode_step_ms": 1000 * statistics.median(gaps) if gaps else None,
        })
    else:
        out.update({"decode_s": None, "decode_tokens": 0, "decode_tok_s": None,
                    "decode_step_ms": None})
    return out
