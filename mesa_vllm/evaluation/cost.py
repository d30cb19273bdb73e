"""Time estimates for the plan and the progress bar.

Seconds for one sample of length ``L`` (``c`` prompt tokens found in the prefix cache, ``g``
generated tokens)::

    per_token * (L - c) + per_pair * pairs + per_gen_token * g * (1 + L / 8192)

where ``pairs`` counts attention query-key pairs of the prompt's new tokens: ``(L^2 - c^2) / 2``
for dense attention (origin, YaRN, NTK, and mesa at ``L <= T``), and
``(L - c) * (F + C/2 + R)`` for mesa past ``T`` (middle chunks see the first chunk and their own
chunk, the final ``R`` tokens see everything: linear in ``L``). Dense and mesa pairs have their own
price. The defaults below were measured on 2 CPU cores (SmolLM2-135M, bf16, eager); a run's own
results re-scale them (:meth:`CostModel.calibrated`): the ratio of measured to estimated time,
separately for the dense and the mesa cells, so a plan made from an output folder that already
has results uses that machine's speed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CostModel:
    per_token: float = 1.0e-3  # MLP, projections, norms: seconds per prompt token
    per_dense_pair: float = 4.9e-7  # seconds per query-key pair, vLLM's default attention
    per_mesa_pair: float = 2.5e-7  # seconds per query-key pair, mesa passes (incl. merges)
    per_gen_token: float = 0.05  # seconds per generated token (per sequence, at 8k)
    per_logprob_token: float = 1.5e-3  # extra seconds per prompt token with prompt_logprobs
    engine_start: float = 40.0  # seconds to build one engine
    dense_scale: float = 1.0
    mesa_scale: float = 1.0

    def sample_seconds(self, kind: str, length: int, gen_tokens: int, cached: int = 0,
                       geometry: dict | None = None, trained_len: int = 8192,
                       logprobs: bool = False) -> float:
        L = int(length)
        c = min(int(cached), L)
        new = L - c
        decode = self.per_gen_token * gen_tokens * (1 + L / 8192)
        if logprobs:  # log-softmax over the vocabulary at every prompt position
            decode += self.per_logprob_token * L
        if kind == "mesa" and L > trained_len and geometry:
            width = geometry["F"] + geometry["C"] / 2 + geometry["R"]
            cost = self.per_token * new + self.per_mesa_pair * new * width + decode
            return cost * self.mesa_scale
        cost = self.per_token * new + self.per_dense_pair * (L * L - c * c) / 2 + decode
        return cost * self.dense_scale

    def calibrated(self, rows: list[dict], trained_len: int = 8192) -> CostModel:
        """This model re-scaled by measured rows (those with ``seconds``); unchanged without any."""
        sums = {"dense": [0.0, 0.0], "mesa": [0.0, 0.0]}
        base = replace(self, dense_scale=1.0, mesa_scale=1.0)
        for row in rows:
            seconds = row.get("seconds")
            if not seconds or row.get("error") or row.get("backend") != "vllm":
                continue
            geometry = (row.get("engine") or {}).get("mesa")
            kind = row.get("kind", "")
            est = base.sample_seconds(kind, row["length"], row.get("gen_tokens", 0),
                                      row.get("cached_tokens", 0), geometry, trained_len,
                                      logprobs=row.get("task") == "ppl")
            group = "mesa" if kind == "mesa" and row["length"] > trained_len else "dense"
            sums[group][0] += seconds
            sums[group][1] += est
        scale = {g: (s[0] / s[1] if s[1] > 0 and s[0] > 0 else None) for g, s in sums.items()}
        dense = scale["dense"] or scale["mesa"] or self.dense_scale
        mesa = scale["mesa"] or scale["dense"] or self.mesa_scale
        return replace(self, dense_scale=dense, mesa_scale=mesa)
