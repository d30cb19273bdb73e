"""Passkey prompts (``mesa_vllm.tasks.passkey``) with the embedded model's tokenizer; no engine."""

from __future__ import annotations

import re

import pytest

from mesa_vllm.tasks.base import encode
from mesa_vllm.tasks.passkey import (
    NEEDLE,
    QUESTION,
    TASK_DESCRIPTION,
    make_passkey_sample,
    make_passkey_samples,
    score_passkey,
)

pytestmark = pytest.mark.cpu

# One filler sentence is at most a handful of tokens, so a prompt lands this close below target.
LENGTH_TOLERANCE = 12


@pytest.mark.parametrize("target", [200, 1000, 4096, 8192, 12000])
def test_length_close_to_target_and_ids_match_text(smollm2_tokenizer, target):
    sample = make_passkey_sample(smollm2_tokenizer, target, seed=3)
    assert target - LENGTH_TOLERANCE <= sample.num_tokens <= target
    assert sample.token_ids == encode(smollm2_tokenizer, sample.prompt)
    assert sample.target_len == target and sample.task == "passkey"


def test_format_matches_the_paper(smollm2_tokenizer):
    sample = make_passkey_sample(smollm2_tokenizer, 600, seed=1, depth=0.5, key=4242)
    lines = sample.prompt.split("\n")
    assert lines[0] == TASK_DESCRIPTION
    assert lines[2] == NEEDLE.format(key=4242)
    assert lines[-1] == QUESTION
    assert len(lines) == 5
    # The filler repeats the paper's five sentences; after the needle it continues the cycle.
    assert lines[1].startswith("The grass is green. The sky is blue. The sun is yellow.")
    for filler in (lines[1], lines[3]):
        assert set(re.split(r"(?<=\.) ", filler)) <= {
            "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
            "There and back again.",
        }
    assert sample.answer == "4242"


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.8, 1.0])
def test_needle_once_at_requested_depth(smollm2_tokenizer, depth):
    sample = make_passkey_sample(smollm2_tokenizer, 4000, seed=11, depth=depth)
    needle = NEEDLE.format(key=sample.answer)
    assert sample.prompt.count(needle) == 1
    # The key appears only in the needle (twice: "The pass key is N. ... N is the pass key.").
    assert re.findall(r"\d+", sample.prompt) == [sample.answer, sample.answer]
    # Depth measured in tokens over the filler region, between description and question.
    start = len(encode(smollm2_tokenizer, TASK_DESCRIPTION))
    end = sample.num_tokens - len(encode(smollm2_tokenizer, QUESTION, add_special_tokens=False))
    measured = (sample.meta["needle_token"] - start) / (end - start)
    assert abs(measured - depth) < 0.02, (depth, measured)
    assert sample.meta["depth"] == depth


def test_deterministic_from_seed(smollm2_tokenizer):
    a = make_passkey_sample(smollm2_tokenizer, 1500, seed=5)
    b = make_passkey_sample(smollm2_tokenizer, 1500, seed=5)
    c = make_passkey_sample(smollm2_tokenizer, 1500, seed=6)
    assert a == b
    assert (a.answer, a.meta["depth"]) != (c.answer, c.meta["depth"])
    assert 1 <= int(a.answer) <= 50000 and 0.0 <= a.meta["depth"] <= 1.0


def test_samples_spread_depths_and_keys(smollm2_tokenizer):
    samples = make_passkey_samples(smollm2_tokenizer, 800, 4, seed=0)
    assert [s.meta["depth"] for s in samples] == [0.125, 0.375, 0.625, 0.875]
    assert len({s.answer for s in samples}) == 4
    assert all(792 - LENGTH_TOLERANCE <= s.num_tokens <= 800 for s in samples)
    assert [s.meta["depth"] for s in make_passkey_samples(
        smollm2_tokenizer, 300, 2, depths=[0.0, 1.0])] == [0.0, 1.0]
    with pytest.raises(ValueError):
        make_passkey_samples(smollm2_tokenizer, 300, 2, depths=[0.5])


def test_target_too_short_is_refused(smollm2_tokenizer):
    with pytest.raises(ValueError, match="shorter than the passkey frame"):
        make_passkey_sample(smollm2_tokenizer, 20, seed=0)
    with pytest.raises(ValueError, match="depth"):
        make_passkey_sample(smollm2_tokenizer, 300, seed=0, depth=1.5)


@pytest.mark.parametrize(
    ("generated", "answer", "ok"),
    [
        (" 25248. Remember it.", "25248", True),
        ("25248", 25248, True),
        ("The pass key is\n 8806.", "8806", True),
        (" 252480.", "25248", False),  # inside a longer number
        (" 125248", "25248", False),
        (" 2524", "25248", False),
        (" the pass key.", "25248", False),
        ("", "7", False),
    ],
)
def test_score(generated, answer, ok):
    assert score_passkey(generated, answer) is ok
