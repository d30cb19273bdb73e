"""Perplexity on long natural text: windows of Jane Austen's novels (:mod:`mesa_vllm.tasks.texts`).

A sample is a window of token ids cut from one novel. Windows are *end-aligned across lengths*:
sample ``seed`` picks a novel (``seed % 6``) and an end position drawn from the seed, and the
window of length ``L`` is the ``L`` tokens that end there. So every length scores the same final
tokens with more or less context before them, and the "tail" perplexity (last ``TAIL`` tokens)
compares like with like across lengths. The end is drawn from ``[MAX_WINDOW, len(novel)]``, so a
window of up to ``MAX_WINDOW`` tokens always fits.

The text is normalised before tokenising: Project Gutenberg's hard line wraps are joined within
paragraphs, paragraphs are separated by one blank line.

Statistics (:func:`ppl_stats`) come from per-token log-probabilities (vLLM ``prompt_logprobs``,
or an OpenAI-compatible endpoint's ``echo`` + ``logprobs``): the sum and count of negative
log-likelihoods over the whole window (every token after the first), over the tail, and per
bucket of ``BUCKET`` positions (for perplexity against position).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

from mesa_vllm.tasks.base import Sample
from mesa_vllm.tasks.texts import NOVELS, austen_novels

TASK = "ppl"
MAX_WINDOW = 65536
TAIL = 1024
BUCKET = 1024

_TOKENIZED: dict[tuple, dict[str, list[int]]] = {}


def normalise(text: str) -> str:
    """Join hard-wrapped lines within paragraphs; one blank line between paragraphs."""
    paragraphs = re.split(r"\n\s*\n", text.strip())
    joined = [re.sub(r"\s*\n\s*", " ", p).strip() for p in paragraphs]
    return "\n\n".join(p for p in joined if p) + "\n"


def tokenized_novels(tokenizer) -> dict[str, list[int]]:
    """Each novel (normalised) as token ids, cached per tokenizer."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), id(tokenizer))
    if key not in _TOKENIZED:
        _TOKENIZED[key] = {
            name: list(tokenizer(normalise(text), add_special_tokens=False)["input_ids"])
            for name, text in austen_novels().items()
        }
    return _TOKENIZED[key]


def make_ppl_sample(tokenizer, target_len: int, *, seed: int = 0, depth: float | None = None,
                    novels: dict[str, list[int]] | None = None) -> Sample:
    """The window of ``target_len`` tokens ending at sample ``seed``'s end position.

    ``depth`` is ignored (perplexity has no needle); it is accepted so every task has the same
    signature. ``novels`` (name -> token ids) replaces the Austen novels, for tests.
    """
    if target_len < 2:
        raise ValueError(f"a perplexity window needs at least 2 tokens, got {target_len}")
    if target_len > MAX_WINDOW:
        raise ValueError(f"windows are at most MAX_WINDOW={MAX_WINDOW} tokens, got {target_len}")
    novels = tokenized_novels(tokenizer) if novels is None else novels
    names = [n for n in NOVELS if n in novels] or sorted(novels)
    name = names[seed % len(names)]
    ids = novels[name]
    if len(ids) < MAX_WINDOW:
        raise ValueError(f"{name} has {len(ids)} tokens, fewer than MAX_WINDOW={MAX_WINDOW}")
    end = random.Random(f"{TASK}:{seed}").randint(MAX_WINDOW, len(ids))
    window = ids[end - target_len:end]
    return Sample(
        task=TASK,
        prompt="",
        token_ids=window,
        answer="",
        target_len=target_len,
        seed=seed,
        meta={"novel": name, "title": NOVELS.get(name, name), "start": end - target_len,
              "end": end},
    )


def ppl_stats(token_logprobs: Sequence[float | None], tail: int = TAIL,
              bucket: int = BUCKET) -> dict:
    """Negative log-likelihood sums from per-position log-probabilities.

    ``token_logprobs[i]`` is log p(token i | tokens before it); position 0 has none (``None``)
    and is skipped, as is any other ``None``. ``tail`` counts the last positions of the window.
    A non-finite log-probability makes the window's perplexity infinite (kept as such).
    """
    n = len(token_logprobs)
    nll = 0.0
    count = 0
    tail_nll = 0.0
    tail_count = 0
    buckets: dict[int, list[float]] = {}
    for i, lp in enumerate(token_logprobs):
        if i == 0 or lp is None:
            continue
        value = -float(lp) if math.isfinite(lp) else math.inf
        nll += value
        count += 1
        if i >= n - tail:
            tail_nll += value
            tail_count += 1
        b = buckets.setdefault(i // bucket, [0.0, 0])
        b[0] += value
        b[1] += 1
    return {
        "nll_sum": nll,
        "n_scored": count,
        "tail_nll_sum": tail_nll,
        "tail_n": tail_count,
        "bucket_size": bucket,
        "bucket_nll": [[k, v[0], v[1]] for k, v in sorted(buckets.items())],
    }


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count and math.isfinite(nll_sum) else math.inf
