"""Passkey retrieval, in the format of Mesa-Extrapolation (Ma et al., 2024) and Landmark attention
(Mohtashami & Jaggi, 2023).

The prompt is the task description, filler text repeated to the wanted length with the needle
("The pass key is N. Remember it. N is the pass key.") at a chosen depth, then the question
"What is the pass key? The pass key is". The parts are joined by newlines, as in the reference
code. The filler is cut at sentence boundaries, so a prompt lands within a few tokens of its target
length (never above it). A model answers right when the key appears, as a whole number, in what
it generates.
"""

from __future__ import annotations

import random
import re

from mesa_vllm.tasks.base import Sample, encode, largest_fitting

TASK = "passkey"
TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# The reference code draws the key from [1, 50000].
KEY_RANGE = (1, 50000)

_FILLER_SENTENCES = [s if s.endswith(".") else s + "." for s in FILLER.split(". ")]


def filler_text(start: int, count: int) -> str:
    """``count`` filler sentences, continuing the repeating cycle at sentence ``start``."""
    n = len(_FILLER_SENTENCES)
    return " ".join(_FILLER_SENTENCES[(start + i) % n] for i in range(count))


def build_prompt(key: int | str, n_sentences: int, depth: float) -> tuple[str, int]:
    """The prompt text with ``n_sentences`` of filler and the needle after ``round(depth * n)`` of
    them; also the character offset where the needle starts."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    before = round(depth * n_sentences)
    parts = [TASK_DESCRIPTION]
    if before:
        parts.append(filler_text(0, before))
    needle_at = len("\n".join(parts)) + 1
    parts.append(NEEDLE.format(key=key))
    if n_sentences - before:
        parts.append(filler_text(before, n_sentences - before))
    parts.append(QUESTION)
    return "\n".join(parts), needle_at


def make_passkey_sample(
    tokenizer,
    target_len: int,
    *,
    seed: int = 0,
    depth: float | None = None,
    key: int | None = None,
    add_special_tokens: bool = True,
) -> Sample:
    """One passkey prompt of at most ``target_len`` tokens (within a few tokens of it).

    ``depth`` (0 = needle right after the task description, 1 = right before the question) and
    ``key`` are drawn from ``seed`` when not given. The same arguments give the same prompt.
    """
    rng = random.Random(seed)
    drawn_key = rng.randint(*KEY_RANGE)
    drawn_depth = rng.random()
    key = drawn_key if key is None else key
    depth = drawn_depth if depth is None else depth

    def ids_for(n: int) -> list[int]:
        return encode(tokenizer, build_prompt(key, n, depth)[0], add_special_tokens)

    if len(ids_for(0)) > target_len:
        raise ValueError(
            f"target_len={target_len} is shorter than the passkey frame without filler "
            f"({len(ids_for(0))} tokens)"
        )
    # A guess from the filler's average sentence length only speeds the search up.
    per_sentence = len(encode(tokenizer, filler_text(0, 500), False)) / 500
    guess = int((target_len - len(ids_for(0))) / per_sentence)
    n = largest_fitting(ids_for, target_len, hi=max(1, target_len), guess=guess)
    prompt, needle_at = build_prompt(key, n, depth)
    token_ids = encode(tokenizer, prompt, add_special_tokens)
    needle_token = len(encode(tokenizer, prompt[:needle_at], add_special_tokens))
    return Sample(
        task=TASK,
        prompt=prompt,
        token_ids=token_ids,
        answer=str(key),
        target_len=target_len,
        seed=seed,
        meta={
            "depth": depth,
            "filler_sentences": n,
            "needle_char": needle_at,
            "needle_token": needle_token,
        },
    )


def make_passkey_samples(
    tokenizer,
    target_len: int,
    num: int,
    *,
    seed: int = 0,
    depths: list[float] | None = None,
    add_special_tokens: bool = True,
) -> list[Sample]:
    """``num`` prompts, keys drawn from ``seed + i``. Unless given, the depths are the midpoints of
    ``num`` equal slices of [0, 1] (4 prompts: 0.125, 0.375, 0.625, 0.875)."""
    if depths is None:
        depths = [(i + 0.5) / num for i in range(num)]
    if len(depths) != num:
        raise ValueError(f"got {len(depths)} depths for {num} samples")
    return [
        make_passkey_sample(tokenizer, target_len, seed=seed + i, depth=d,
                            add_special_tokens=add_special_tokens)
        for i, d in enumerate(depths)
    ]


def score_passkey(generated: str, answer: str | int) -> bool:
    """True when the key appears in ``generated`` as a whole number (not inside a longer one)."""
    return re.search(rf"(?<!\d){re.escape(str(answer))}(?!\d)", generated) is not None
