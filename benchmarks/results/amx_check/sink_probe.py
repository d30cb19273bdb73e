"""Prototype (not used by the backend): mesa's decode stair pass on vLLM's AMX kernel.

vLLM's ``cpu_attention_with_kv_cache`` returns no log-sum-exp, which mesa needs to merge the
stair pass with the window pass. It does take per-head attention-sink logits (``s_aux``).
Duplicate every query head: the copy with a sink of -1e4 returns the stair output ``o_s``;
the copy whose sink is the window's log-sum-exp returns ``mu * o_s`` with
``mu = Z_s / (Z_s + Z_w)``, the stair's share of the merged softmax. ``mu`` follows from the
two outputs' ratio, and the merged output is ``mu * o_s + (1 - mu) * o_w``.

    .venv/bin/python benchmarks/results/amx_check/sink_probe.py   # needs an AMX CPU

Prints, at 32k keys (window 515), the error of ``mu`` and of the merged output against
float64, next to mesa's current path (SGLang's paged decode + LSE merge), and the time of
the stair pass + merge.
"""

import time

import torch

import vllm._custom_ops as ops  # noqa: F401  (loads the _C ops)
from mesa_vllm.attention import ops as mesa_ops


def best_ms(fn, reps=50):
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def main():
    if not (torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()):
        raise SystemExit("this prototype needs a CPU with AMX tiles")
    torch.manual_seed(0)
    kv_heads, group, d, bs = 3, 3, 64, 128
    length, window = 32768, 515
    stair_len = length - window
    dt, scale = torch.bfloat16, d**-0.5
    for query_scale in (0.3, 1, 3, 8):
        q_stair = (torch.randn(1, kv_heads * group, d) * query_scale).to(dt)
        q_window = (torch.randn(1, kv_heads * group, d) * query_scale).to(dt)
        k = torch.randn(length, kv_heads, d).to(dt)
        v = torch.randn(length, kv_heads, d).to(dt)

        def scores(q, keys):
            return torch.einsum("hd,lhd->hl", q[0].double(), keys.double().repeat_interleave(group, 1)) * scale

        s_stair, s_window = scores(q_stair, k[:stair_len]), scores(q_window, k[stair_len:])
        probs = torch.softmax(torch.cat([s_stair, s_window], 1), 1)
        reference = torch.einsum("hl,lhd->hd", probs, v.double().repeat_interleave(group, 1))
        mu_reference = torch.sigmoid(torch.logsumexp(s_stair, 1) - torch.logsumexp(s_window, 1))

        cache = torch.zeros(length // bs + 2, 3 * kv_heads, bs, d, dtype=dt)
        key_pages, value_pages = cache[:, 2 * kv_heads :], cache[:, kv_heads : 2 * kv_heads]
        ops.cpu_attn_reshape_and_cache(k, v, key_pages, value_pages, torch.arange(length) + bs, "amx")
        block_table = (torch.arange(length // bs) + 1).int()[None]
        win = mesa_ops.paged_decode(
            q_window, k[stair_len:], v[stair_len:], torch.arange(window)[None], torch.tensor([window]), scale
        )
        q2 = torch.cat([q_stair.view(kv_heads, group, d)] * 2, 1).reshape(1, -1, d).contiguous()
        qsl, seq = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([stair_len], dtype=torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(1, q2.shape[1], kv_heads, d, seq, dt, qsl, True, -1, "amx", True)
        out2 = torch.empty_like(q2)

        def stair_and_merge():
            sinks = torch.cat([torch.full((kv_heads, group), -1e4), win.lse.view(kv_heads, group)], 1)
            ops.cpu_attention_with_kv_cache(
                q2, key_pages, value_pages, out2, qsl, seq, scale, True, None, -1, block_table, 0.0,
                meta, sinks.reshape(-1).float().contiguous(),
            )
            o = out2.view(kv_heads, 2, group, d).float()
            plain, share = o[:, 0].reshape(-1, d), o[:, 1].reshape(-1, d)
            mu = (share * plain).sum(-1) / (plain * plain).sum(-1)
            return share + (1 - mu)[:, None] * win.out[0].float(), mu

        merged, mu = stair_and_merge()
        current_stair = mesa_ops.paged_decode(
            q_stair, k[:stair_len], v[:stair_len], torch.arange(stair_len)[None], torch.tensor([stair_len]), scale
        )
        current = mesa_ops.merge([current_stair, win], torch.float32)[0]
        print(
            f"query scale {query_scale}: mu error {(mu.double() - mu_reference).abs().max():.1e}; "
            f"merged output error {(merged.double() - reference).abs().max():.1e} "
            f"(current path {(current.double() - reference).abs().max():.1e}, |output| max "
            f"{reference.abs().max():.2f}); stair pass + merge {best_ms(stair_and_merge):.3f} ms"
        )


if __name__ == "__main__":
    main()
