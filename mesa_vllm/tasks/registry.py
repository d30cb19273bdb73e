"""The evaluation tasks by name: how to build a sample, how many tokens to generate, how to score.

Every builder has the signature ``make(tokenizer, prompt_len, *, seed, depth)`` and returns a
:class:`~mesa_vllm.tasks.base.Sample` of at most ``prompt_len`` tokens. A generation task scores
the generated text (``score(text, sample) -> float in [0, 1]``); the perplexity task is scored
from prompt log-probabilities instead (``kind == "logprobs"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from mesa_vllm.tasks import needles, passkey, perplexity
from mesa_vllm.tasks.base import Sample


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "generate" or "logprobs"
    max_new_tokens: int
    make: Callable[..., Sample]
    score: Callable[[str, Sample], float] | None
    description: str
    uses_depth: bool = True


def _passkey_make(tokenizer, prompt_len, *, seed, depth=None):
    return passkey.make_passkey_sample(tokenizer, prompt_len, seed=seed, depth=depth)


def _score_with(fn):
    return lambda text, sample: float(fn(text, sample.answer))


TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec(
        "passkey", "generate", 16, _passkey_make, _score_with(passkey.score_passkey),
        "passkey retrieval in the Mesa-Extrapolation paper's format"),
    "niah_single": TaskSpec(
        "niah_single", "generate", 24, needles.make_niah_single,
        _score_with(needles.score_value), "RULER-style single needle at a controlled depth"),
    "niah_multikey": TaskSpec(
        "niah_multikey", "generate", 24, partial(needles.make_niah_multikey, distractors=3),
        _score_with(needles.score_value), "RULER-style needle among 3 distractor needles"),
    "niah_multivalue": TaskSpec(
        "niah_multivalue", "generate", 64, partial(needles.make_niah_multivalue, values=4),
        _score_with(needles.score_all_values), "RULER-style key with 4 values; recall"),
    "vt": TaskSpec(
        "vt", "generate", 40, partial(needles.make_vt, hops=4), _score_with(
            needles.score_all_names), "RULER-style variable tracking, 1 chain of 4 hops; recall"),
    "ppl": TaskSpec(
        "ppl", "logprobs", 1, perplexity.make_ppl_sample, None,
        "perplexity on Jane Austen's novels (Debian r-cran-janeaustenr), end-aligned windows",
        uses_depth=False),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}") from None
