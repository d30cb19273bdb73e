"""Pieces shared by the evaluation tasks (passkey, RULER-style needles, perplexity).

A task turns ``(tokenizer, target length, seed)`` into :class:`Sample` objects: the prompt as text
*and* as token ids (send the ids to vLLM, so the length is exactly what was built), the expected
answer, and task-specific details. Scoring is a plain function of the generated text and the
sample, so it can be tested without an engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One prompt of a task, ready for an engine."""

    task: str
    prompt: str
    token_ids: list[int]
    answer: str
    target_len: int
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids the way vLLM tokenizes a text prompt (special tokens added by default)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def largest_fitting(
    build: Callable[[int], list[int]], target_len: int, hi: int, guess: int | None = None
) -> int:
    """Largest ``n`` in ``[0, hi]`` with ``len(build(n)) <= target_len`` (lengths grow with ``n``).

    ``build(n)`` returns the token ids of a prompt with ``n`` filler units. Returns 0 if even
    ``n = 0`` is too long; the caller decides whether that is an error. ``guess`` (an estimate of
    the answer) only makes the search faster: a bracket is grown around it, then bisected, so a
    good guess costs a handful of ``build`` calls instead of ``log2(hi)``. The answer does not
    depend on it.
    """
    lengths: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in lengths:
            lengths[n] = len(build(n))
        return lengths[n] <= target_len

    lo, up = 0, hi  # invariant: the answer is in [lo, up]; fits(lo) or lo == 0
    if guess is not None and 0 < guess < hi:
        step = 2
        if fits(guess):
            lo = guess
            while lo < hi:
                probe = min(hi, lo + step)
                if not fits(probe):
                    up = probe - 1
                    break
                lo, step = probe, step * 2
        else:
            up = guess - 1
            while up > 0:
                probe = max(0, up - step)
                if fits(probe):
                    lo = probe
                    break
                up, step = probe - 1, step * 2
            up = max(up, lo)
    while lo < up:
        mid = (lo + up + 1) // 2
        if fits(mid):
            lo = mid
        else:
            up = mid - 1
    return lo
