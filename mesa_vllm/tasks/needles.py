"""RULER-style needle tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), generated locally: no download, deterministic from a seed.

The haystack is RULER's "noise" haystack, the same repeated filler as the passkey task ("The grass
is green. The sky is blue. ..."). Needles are RULER's "special magic number" sentences with a
word key (``adjective-noun``, e.g. ``brave-lantern``) and a 7-digit value. Every inserted sentence
sits on its own line, as in the passkey prompt. The prompt ends with the question and the start
of the answer, so a base or instruct model continues with the answer (plain completion, no chat
template, like the passkey task).

Tasks:

- ``niah_single``: one needle at a controlled depth; answer: its value.
- ``niah_multikey``: the needle plus ``distractors`` needles with other keys (RULER's
  ``niah_multikey_1``: 1 + 3 keys); the question names one key; answer: that key's value.
- ``niah_multivalue``: ``values`` needles with the same key and different values (RULER's
  ``niah_multivalue``: 4); answer: all of them; score: the fraction found.
- ``vt`` (variable tracking): a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of ``hops``
  hops (RULER's default: one chain, 4 hops) spread through the text in order; answer: every
  variable that holds the value; score: the fraction named.

Scores are in ``[0, 1]``: 1 or 0 for the single-answer tasks, recall for the list answers (RULER's
``string_match_all``). Numbers must appear as whole numbers and names as whole words.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mesa_vllm.tasks.base import Sample, encode, largest_fitting
from mesa_vllm.tasks.passkey import filler_text

# Word keys, as RULER's ``adjective-noun`` keys (RULER draws them from the wonderwords lists).
ADJECTIVES = (
    "able", "ancient", "bitter", "blue", "brave", "bright", "calm", "clever", "cold", "cosmic",
    "curious", "dark", "eager", "early", "fancy", "fierce", "gentle", "giant", "golden", "grand",
    "happy", "hidden", "honest", "humble", "icy", "jolly", "keen", "lazy", "little", "lively",
    "loud", "lucky", "mighty", "modern", "narrow", "noble", "odd", "polite", "proud", "quiet",
    "rapid", "rare", "rich", "rustic", "sharp", "shiny", "silent", "silver", "simple", "sleepy",
    "smooth", "solid", "spicy", "steady", "sturdy", "sunny", "swift", "tall", "tender", "tiny",
    "vast", "violet", "warm", "wild", "wise", "witty", "young", "zealous",
)
NOUNS = (
    "anchor", "apple", "arrow", "badge", "basket", "beacon", "bell", "bridge", "button", "canyon",
    "castle", "cedar", "comet", "compass", "copper", "cottage", "crystal", "desert", "dolphin",
    "dragon", "engine", "falcon", "feather", "forest", "fountain", "garden", "glacier", "harbor",
    "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "marble", "meadow",
    "mirror", "monkey", "needle", "orchard", "otter", "pepper", "pillow", "planet", "pocket",
    "rabbit", "river", "rocket", "saddle", "scarf", "shadow", "spider", "summit", "teapot",
    "thunder", "tiger", "tower", "tulip", "valley", "violin", "wagon", "walnut", "whistle",
    "window", "wizard", "yacht", "zebra",
)
VALUE_RANGE = (1_000_000, 9_999_999)  # RULER: 7-digit numbers
VT_VALUE_RANGE = (10_000, 99_999)

NIAH_HEAD = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION_ONE = (
    "What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
QUESTION_ALL = (
    "What are all the special magic numbers for {key} mentioned in the provided text? "
    "The special magic numbers for {key} mentioned in the provided text are"
)
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_FIRST = "VAR {name} = {value}."
VT_HOP = "VAR {name} = VAR {previous}."
VT_QUESTION = (
    "Question: Find all variables that are assigned the value {value} in the text above. "
    "Answer: According to the chain(s) of variable assignment in the text above, {count} "
    "variables are assigned the value {value}, they are:"
)


@dataclass(frozen=True)
class Insert:
    """A sentence put into the haystack after ``round(depth * n)`` of its ``n`` filler sentences."""

    depth: float
    text: str
    role: str = "needle"


def build_haystack(head: str, inserts: Sequence[Insert], n_sentences: int,
                   tail: str) -> tuple[str, list[int]]:
    """``head``, ``n_sentences`` of filler with ``inserts`` on their own lines, then ``tail``; all
    parts joined by newlines. Returns the text and the character offset of each insert (in the
    order given). Inserts at the same place keep their given order."""
    for insert in inserts:
        if not 0.0 <= insert.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {insert.depth}")
    order = sorted(range(len(inserts)), key=lambda i: (round(inserts[i].depth * n_sentences), i))
    parts = [head]
    offsets = [0] * len(inserts)
    done = 0
    for i in order:
        at = round(inserts[i].depth * n_sentences)
        if at > done:
            parts.append(filler_text(done, at - done))
            done = at
        offsets[i] = len("\n".join(parts)) + 1
        parts.append(inserts[i].text)
    if n_sentences > done:
        parts.append(filler_text(done, n_sentences - done))
    parts.append(tail)
    return "\n".join(parts), offsets


_TOKENS_PER_SENTENCE: dict[int, float] = {}


def _tokens_per_sentence(tokenizer) -> float:
    key = id(tokenizer)
    if key not in _TOKENS_PER_SENTENCE:
        _TOKENS_PER_SENTENCE[key] = len(encode(tokenizer, filler_text(0, 500), False)) / 500
    return _TOKENS_PER_SENTENCE[key]


def fit_haystack(tokenizer, target_len: int, head: str, inserts: Sequence[Insert], tail: str,
                 add_special_tokens: bool = True) -> tuple[str, list[int], list[int], int]:
    """The longest haystack prompt of at most ``target_len`` tokens.

    Returns ``(prompt, token_ids, insert_token_positions, n_sentences)``; the token position of
    an insert is the index of its first token (counted as the tokens of the text before it).
    """

    def ids_for(n: int) -> list[int]:
        return encode(tokenizer, build_haystack(head, inserts, n, tail)[0], add_special_tokens)

    frame = len(ids_for(0))
    if frame > target_len:
        raise ValueError(
            f"target_len={target_len} is shorter than the prompt without filler ({frame} tokens)"
        )
    guess = int((target_len - frame) / _tokens_per_sentence(tokenizer))
    n = largest_fitting(ids_for, target_len, hi=max(1, target_len), guess=guess)
    prompt, offsets = build_haystack(head, inserts, n, tail)
    token_ids = encode(tokenizer, prompt, add_special_tokens)
    positions = [len(encode(tokenizer, prompt[:o], add_special_tokens)) for o in offsets]
    return prompt, token_ids, positions, n


def _rng(task: str, seed: int) -> random.Random:
    return random.Random(f"{task}:{seed}")


def _keys(rng: random.Random, count: int) -> list[str]:
    pairs = rng.sample([(a, n) for a in ADJECTIVES for n in NOUNS], count)
    return [f"{a}-{n}" for a, n in pairs]


def _values(rng: random.Random, count: int, low_high=VALUE_RANGE) -> list[int]:
    values: list[int] = []
    while len(values) < count:
        v = rng.randint(*low_high)
        if v not in values:
            values.append(v)
    return values


def _check_depth(depth: float) -> float:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return depth


def _sample(task, tokenizer, target_len, seed, head, inserts, tail, answer, meta,
            add_special_tokens) -> Sample:
    prompt, ids, positions, n = fit_haystack(tokenizer, target_len, head, inserts, tail,
                                             add_special_tokens)
    meta = dict(meta)
    meta.update({
        "filler_sentences": n,
        "inserts": [
            {"role": ins.role, "depth": ins.depth, "token": pos, "text": ins.text}
            for ins, pos in zip(inserts, positions)
        ],
    })
    return Sample(task=task, prompt=prompt, token_ids=ids, answer=answer, target_len=target_len,
                  seed=seed, meta=meta)


def make_niah_single(tokenizer, target_len: int, *, seed: int = 0, depth: float | None = None,
                     add_special_tokens: bool = True) -> Sample:
    """One needle ``One of the special magic numbers for KEY is: VALUE.`` at ``depth`` (drawn
    from ``seed`` when not given); answer: VALUE."""
    rng = _rng("niah_single", seed)
    key, = _keys(rng, 1)
    value, = _values(rng, 1)
    drawn = rng.random()
    depth = _check_depth(drawn if depth is None else depth)
    inserts = [Insert(depth, NEEDLE.format(key=key, value=value))]
    return _sample("niah_single", tokenizer, target_len, seed, NIAH_HEAD, inserts,
                   QUESTION_ONE.format(key=key), str(value),
                   {"depth": depth, "key": key}, add_special_tokens)


def make_niah_multikey(tokenizer, target_len: int, *, seed: int = 0, depth: float | None = None,
                       distractors: int = 3, add_special_tokens: bool = True) -> Sample:
    """The asked needle at ``depth`` plus ``distractors`` needles with other keys and values at
    random depths; answer: the asked key's value."""
    rng = _rng("niah_multikey", seed)
    keys = _keys(rng, 1 + distractors)
    values = _values(rng, 1 + distractors)
    drawn = rng.random()
    other_depths = [rng.random() for _ in range(distractors)]
    depth = _check_depth(drawn if depth is None else depth)
    inserts = [Insert(depth, NEEDLE.format(key=keys[0], value=values[0]))]
    inserts += [Insert(d, NEEDLE.format(key=k, value=v), "distractor")
                for d, k, v in zip(other_depths, keys[1:], values[1:])]
    return _sample("niah_multikey", tokenizer, target_len, seed, NIAH_HEAD, inserts,
                   QUESTION_ONE.format(key=keys[0]), str(values[0]),
                   {"depth": depth, "key": keys[0],
                    "distractor_values": [str(v) for v in values[1:]]}, add_special_tokens)


def make_niah_multivalue(tokenizer, target_len: int, *, seed: int = 0, depth: float | None = None,
                         values: int = 4, add_special_tokens: bool = True) -> Sample:
    """``values`` needles with one key and different values; the first at ``depth``, the others
    at random depths; answer: all values (space-separated in ``answer``)."""
    rng = _rng("niah_multivalue", seed)
    key, = _keys(rng, 1)
    numbers = _values(rng, values)
    drawn = rng.random()
    other_depths = [rng.random() for _ in range(values - 1)]
    depth = _check_depth(drawn if depth is None else depth)
    inserts = [Insert(d, NEEDLE.format(key=key, value=v))
               for d, v in zip([depth, *other_depths], numbers)]
    return _sample("niah_multivalue", tokenizer, target_len, seed, NIAH_HEAD, inserts,
                   QUESTION_ALL.format(key=key), " ".join(str(v) for v in numbers),
                   {"depth": depth, "key": key}, add_special_tokens)


def _var_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names and name != "VAR":
            names.append(name)
    return names


def make_vt(tokenizer, target_len: int, *, seed: int = 0, depth: float | None = None,
            hops: int = 4, add_special_tokens: bool = True) -> Sample:
    """Variable tracking: ``VAR X1 = V.``, then ``VAR X(i+1) = VAR Xi.`` for ``hops`` hops, in
    text order; the first statement at ``depth`` (drawn when not given), the hops spread evenly
    after it. Answer: the ``hops + 1`` names (space-separated in ``answer``)."""
    rng = _rng("vt", seed)
    names = _var_names(rng, hops + 1)
    value, = _values(rng, 1, VT_VALUE_RANGE)
    drawn = rng.random()
    depth = _check_depth(drawn if depth is None else depth)
    # The chain starts at `depth` and its statements are spread over the rest of the text, so the
    # last hop never lands after the question (RULER spreads them over the whole haystack).
    depths = [depth + (1.0 - depth) * i / (hops + 1) for i in range(hops + 1)]
    inserts = [Insert(depths[0], VT_FIRST.format(name=names[0], value=value), "chain")]
    inserts += [Insert(d, VT_HOP.format(name=n, previous=p), "chain")
                for d, n, p in zip(depths[1:], names[1:], names[:-1])]
    return _sample("vt", tokenizer, target_len, seed, VT_HEAD, inserts,
                   VT_QUESTION.format(value=value, count=hops + 1), " ".join(names),
                   {"depth": depth, "value": str(value)}, add_special_tokens)


def _has_number(text: str, number: str) -> bool:
    return re.search(rf"(?<!\d){re.escape(number)}(?!\d)", text) is not None


def _has_name(text: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", text) is not None


def score_value(generated: str, answer: str) -> float:
    """1.0 when the value appears in ``generated`` as a whole number, else 0.0."""
    return 1.0 if _has_number(generated, str(answer).strip()) else 0.0


def score_all_values(generated: str, answer: str) -> float:
    """Fraction of the (space-separated) values in ``answer`` found as whole numbers."""
    wanted = str(answer).split()
    return sum(_has_number(generated, v) for v in wanted) / len(wanted) if wanted else 0.0


def score_all_names(generated: str, answer: str) -> float:
    """Fraction of the (space-separated) variable names in ``answer`` found as whole words."""
    wanted = str(answer).split()
    return sum(_has_name(generated, n) for n in wanted) / len(wanted) if wanted else 0.0
