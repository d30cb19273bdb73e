"""The Mesa-Extrapolation attention rule: the one home of the chunk and stair math.

Everything that decides *which* keys a query sees and at *which* relative position lives
here, and is used by both the dense oracle (``mesa_vllm.oracle``) and the vLLM backend
(``mesa_vllm.attention``). The contract is ``docs/mesa-spec.md`` (a copy of the shared
spec); the names follow it:

- ``T`` trained length, ``F`` first chunk, ``C`` middle chunk width, ``R`` stair window,
  ``E`` stair step, ``log_n`` query scaling for stair tokens.
- ``stair``: ``"step"`` is the spec's stair (every ``E`` keys before the window share one
  relative position); ``"linear"`` is an opt-in variant outside the spec that spreads them
  evenly instead (``r`` falls by ``1/E`` per key, a fractional position), the same
  interpolation beyond the window as Su's "leaky ReRoPE". Same capacity and validity.
- ``L`` prompt length, ``p`` query position, ``j`` key position, ``r`` relative position.

Two views of the same rule are offered:

- :func:`relative_positions` writes the rule down densely, pair by pair, exactly as the
  spec states it. The oracle uses it and nothing else.
- :class:`MesaGeometry` exposes the pieces the backend composes into passes over
  contiguous key ranges (final-region start ``b``, window anchor ``a``, middle chunk start
  ``s``, stair rotation positions). ``tests/test_rule.py`` checks that the passes
  reproduce the dense form for every pair.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

# Roles of a query token (spec, "The rule").
PLAIN = 0  # L <= T and p < T: full causal attention at true relative positions
FIRST = 1  # L > T and p < F
MIDDLE = 2  # L > T and F <= p < b
STAIR = 3  # p >= b (final prompt region and generated tokens past T)

STAIR_STEP = "step"  # the spec: r = (p - a + 1) + floor((a - 1 - j) / E) before the window
STAIR_LINEAR = "linear"  # variant: r = (p - a) + (a - j) / E, equal to the step at j = a - kE
STAIR_SHAPES = (STAIR_STEP, STAIR_LINEAR)

ROLE_NAMES = {PLAIN: "plain", FIRST: "first", MIDDLE: "middle", STAIR: "stair"}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class MesaGeometry:
    """Validated Mesa parameters for one model. Build it with ``mesa_vllm.params``."""

    T: int
    F: int
    C: int
    R: int
    E: int
    log_n: bool = True
    stair: str = STAIR_STEP

    def __post_init__(self):
        if self.stair not in STAIR_SHAPES:
            raise ValueError(f"stair={self.stair!r}; the stair shapes are {', '.join(STAIR_SHAPES)}.")

    # ----------------------------------------------------------------------------------
    # Capacity
    @property
    def max_supported_len(self) -> int:
        """Longest sequence (prompt + generation) whose stair stays below ``T``."""
        return self.E * (self.T - 1 - self.R)

    def as_dict(self) -> dict:
        return asdict(self)

    # ----------------------------------------------------------------------------------
    # Scalar pieces of the rule
    def final_start(self, prompt_len: int) -> int:
        """``b``: first position of the final (stair) region for a prompt of ``prompt_len``.

        A prompt that fits ``T`` is treated as if it were ``T`` long, so its generated
        tokens past ``T`` find the same stair as everyone else's.
        """
        if prompt_len > self.T:
            return max(self.F, self.E * _ceil_div(prompt_len - self.R, self.E))
        return self.E * _ceil_div(self.T - self.R, self.E)

    def is_long(self, prompt_len: int) -> bool:
        return prompt_len > self.T

    def anchor(self, p: int, b: int) -> int:
        """``a``: start of the exact window of stair token ``p`` (moves by ``R``)."""
        return b + self.R * ((p - b) // self.R)

    def chunk_start(self, p: int) -> int:
        """``s``: start of the middle chunk that holds position ``p`` (``p >= F``)."""
        return self.F + self.C * ((p - self.F) // self.C)

    def role(self, p: int, prompt_len: int) -> int:
        if prompt_len <= self.T:
            return PLAIN if p < self.T else STAIR
        if p < self.F:
            return FIRST
        if p < self.final_start(prompt_len):
            return MIDDLE
        return STAIR

    def plain_end(self, prompt_len: int) -> int:
        """Positions below this attend exactly like full causal attention.

        For a long prompt that is the first chunk plus the first middle chunk (whose
        chunk start is ``F``, so its shifted positions are its true ones), cut at ``b``.
        """
        if prompt_len <= self.T:
            return self.T
        return min(self.F + self.C, self.final_start(prompt_len))

    def middle_first_chunk_query_position(self, p: int) -> int:
        """Where a middle query is rotated when it looks at the first chunk."""
        return self.F + p - self.chunk_start(p)

    def stair_query_position(self, p: int, a: int) -> int:
        """Where a stair query is rotated for keys before its anchor.

        Keys ``j < a`` are stored rotated at :meth:`stair_key_position`; then
        ``r = (p - a + a/E) - stair_key_position(j)``. For the step that is the spec's stair
        distance because ``a`` is a multiple of ``E``; for the linear stair it is
        ``(p - a) + (a - j) / E``. Both shapes share this (integer) query position.
        """
        return p - a + a // self.E

    def stair_key_position(self, j: int) -> int | float:
        """Rotation of key ``j`` in the stair plane: ``j // E`` (step) or ``j / E`` (linear)."""
        return j / self.E if self.stair == STAIR_LINEAR else j // self.E

    def query_scale(self, p: int) -> float:
        """``log_n`` factor of a stair query (1.0 when off or inside ``T``)."""
        if not self.log_n:
            return 1.0
        return max(1.0, math.log(p + 1) / math.log(self.T))

    # ----------------------------------------------------------------------------------
    # Prefix caching: which cached blocks may be shared between two requests.
    def cache_role_key(self, prompt_len: int, block_end: int) -> tuple | None:
        """A key that two requests share exactly when their KV for a block is identical.

        The KV of a token depends on its role, and roles depend on the prompt length, so
        token ids alone (vLLM's block hash) do not identify it. Tokens of a block ending at
        ``block_end`` (with all earlier tokens) have the same KV in two requests when:

        - the block ends inside the part every request attends plainly
          (``plain_end`` of both): key ``None``, shared with everyone;
        - both prompts fit ``T`` (all plain, then the common stair past ``T``);
        - both prompts are long and the block ends before either final region
          (first and middle chunks do not depend on ``L``);
        - both prompts are long with the same final-region start ``b`` (the stair, and
          every window anchor after it, depend on ``L`` only through ``b``).
        """
        if prompt_len <= self.T:
            return None if block_end <= min(self.F + self.C, self.T) else ("mesa", "short")
        b = self.final_start(prompt_len)
        if block_end <= min(self.F + self.C, b):
            return None
        if block_end <= b:
            return ("mesa", "chunked")
        return ("mesa", "stair", b)


# --------------------------------------------------------------------------------------
# Dense statement of the rule (the oracle's view)
def relative_positions(
    geom: MesaGeometry,
    prompt_len: int,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative position ``r`` and visibility of every (query, key) pair.

    Returns ``(rel, visible)``, both ``[num_queries, num_keys]``; ``rel`` is only
    meaningful where ``visible``. A direct, pair-by-pair transcription of the spec; ``rel``
    is integer, or float64 for the linear stair (fractional distances before the window).
    """
    p = query_positions.long().view(-1, 1)
    j = key_positions.long().view(1, -1)
    F, C, R, E = geom.F, geom.C, geom.R, geom.E
    b = geom.final_start(prompt_len)
    causal = j <= p
    plain_rel = p - j

    if prompt_len <= geom.T:
        is_stair_query = p >= geom.T
        is_first = torch.zeros_like(p, dtype=torch.bool)
        is_middle = torch.zeros_like(p, dtype=torch.bool)
    else:
        is_first = p < F
        is_stair_query = p >= b
        is_middle = ~is_first & ~is_stair_query

    # MIDDLE: keys [0, F) seen from F + p - s, keys [s, p] at their true distance.
    s = F + C * torch.div(p - F, C, rounding_mode="floor")
    middle_first = (j < F) & causal
    middle_own = (j >= s) & causal
    middle_rel = torch.where(j < F, (F + p - s) - j, plain_rel)

    # STAIR: every key; exact inside the window [a, p], stair before it.
    a = b + R * torch.div(p - b, R, rounding_mode="floor")
    if geom.stair == STAIR_LINEAR:
        stair_rel = torch.where(j >= a, plain_rel.double(), (p - a) + (a - j).double() / E)
        plain_rel, middle_rel = plain_rel.double(), middle_rel.double()
    else:
        stair_rel = torch.where(
            j >= a, plain_rel, (p - a + 1) + torch.div(a - 1 - j, E, rounding_mode="floor")
        )

    rel = torch.where(is_stair_query, stair_rel, torch.where(is_middle, middle_rel, plain_rel))
    visible = torch.where(
        is_middle, middle_first | middle_own, causal
    )
    return rel, visible


def query_scales(geom: MesaGeometry, prompt_len: int, query_positions: torch.Tensor) -> torch.Tensor:
    """``log_n`` factor per query (1.0 for non-stair queries or when ``log_n`` is off)."""
    p = query_positions.double()
    b = geom.final_start(prompt_len)
    stair_from = geom.T if prompt_len <= geom.T else b
    scale = torch.ones_like(p)
    if geom.log_n:
        scale = torch.clamp(torch.log(p + 1) / math.log(geom.T), min=1.0)
        scale = torch.where(query_positions >= stair_from, scale, torch.ones_like(p))
    return scale
