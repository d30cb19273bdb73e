"""RULER-style needle tasks, perplexity windows and the perplexity text source; no engine."""

from __future__ import annotations

import gzip
import math
import random
import re
import socket
import struct
import zlib

import pytest

from mesa_vllm.tasks import needles, perplexity, rdata
from mesa_vllm.tasks.base import encode, largest_fitting
from mesa_vllm.tasks.registry import TASKS

pytestmark = pytest.mark.cpu

LENGTH_TOLERANCE = 12
GEN_TASKS = [t for t, spec in TASKS.items() if spec.kind == "generate"]
NEEDLE_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "vt"]


# ---------------------------------------------------------------------------------------------
# Lengths, determinism
@pytest.mark.parametrize("task", GEN_TASKS)
@pytest.mark.parametrize("target", [400, 2000, 9000])
def test_length_close_to_target_and_ids_match_text(smollm2_tokenizer, task, target):
    sample = TASKS[task].make(smollm2_tokenizer, target, seed=5, depth=0.3)
    assert target - LENGTH_TOLERANCE <= sample.num_tokens <= target
    assert sample.token_ids == encode(smollm2_tokenizer, sample.prompt)
    assert sample.task == task and sample.target_len == target and sample.seed == 5


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_deterministic_from_seed(smollm2_tokenizer, task):
    make = TASKS[task].make
    a = make(smollm2_tokenizer, 800, seed=9, depth=0.5)
    b = make(smollm2_tokenizer, 800, seed=9, depth=0.5)
    c = make(smollm2_tokenizer, 800, seed=10, depth=0.5)
    assert a == b
    assert a.answer != c.answer
    # The drawn depth comes from the seed when none is given.
    assert make(smollm2_tokenizer, 800, seed=9).meta["depth"] == make(
        smollm2_tokenizer, 800, seed=9).meta["depth"]


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_too_short_and_bad_depth_refused(smollm2_tokenizer, task):
    with pytest.raises(ValueError, match="shorter than the prompt without filler"):
        TASKS[task].make(smollm2_tokenizer, 30, seed=0, depth=0.5)
    with pytest.raises(ValueError, match="depth"):
        TASKS[task].make(smollm2_tokenizer, 500, seed=0, depth=1.2)


def _measured_depth(tok, sample, head, tail_text):
    start = len(encode(tok, head))
    end = sample.num_tokens - len(encode(tok, tail_text, add_special_tokens=False))
    return (sample.meta["inserts"][0]["token"] - start) / (end - start)


# ---------------------------------------------------------------------------------------------
# Needle placement and content
@pytest.mark.parametrize("depth", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_single_needle_at_depth(smollm2_tokenizer, depth):
    s = needles.make_niah_single(smollm2_tokenizer, 4000, seed=2, depth=depth)
    key = s.meta["key"]
    needle = needles.NEEDLE.format(key=key, value=s.answer)
    assert s.prompt.count(needle) == 1
    assert s.prompt.count(key) == 3  # needle + twice in the question
    assert re.findall(r"\d+", s.prompt) == [s.answer]
    lines = s.prompt.split("\n")
    assert lines[0] == needles.NIAH_HEAD
    assert lines[-1] == needles.QUESTION_ONE.format(key=key)
    assert needle in lines
    tail = needles.QUESTION_ONE.format(key=key)
    assert abs(_measured_depth(smollm2_tokenizer, s, needles.NIAH_HEAD, tail) - depth) < 0.02
    # The token position recorded is where the needle's text starts.
    pos = s.meta["inserts"][0]["token"]
    assert smollm2_tokenizer.decode(s.token_ids[pos:pos + 6]).startswith("One of the special")


def test_multikey_distractors(smollm2_tokenizer):
    s = needles.make_niah_multikey(smollm2_tokenizer, 3000, seed=4, depth=0.7, distractors=3)
    inserts = s.meta["inserts"]
    assert [i["role"] for i in inserts] == ["needle"] + ["distractor"] * 3
    keys = [re.search(r"for (\S+) is:", i["text"]).group(1) for i in inserts]
    values = [re.search(r"is: (\d+)\.", i["text"]).group(1) for i in inserts]
    assert len(set(keys)) == 4 and len(set(values)) == 4
    assert keys[0] == s.meta["key"] and values[0] == s.answer
    assert s.meta["distractor_values"] == values[1:]
    for text in (i["text"] for i in inserts):
        assert s.prompt.count(text) == 1
    assert s.prompt.endswith(needles.QUESTION_ONE.format(key=keys[0]))
    assert abs(inserts[0]["depth"] - 0.7) < 1e-12
    # Every needle's recorded token position points at its own text.
    for ins in inserts:
        text = smollm2_tokenizer.decode(s.token_ids[ins["token"]:ins["token"] + 20])
        assert text.startswith("One of the special magic numbers for " + keys[inserts.index(ins)])


def test_multivalue_all_values(smollm2_tokenizer):
    s = needles.make_niah_multivalue(smollm2_tokenizer, 3000, seed=1, depth=0.1, values=4)
    values = s.answer.split()
    assert len(values) == len(set(values)) == 4
    for v in values:
        assert s.prompt.count(needles.NEEDLE.format(key=s.meta["key"], value=v)) == 1
    assert s.prompt.endswith(needles.QUESTION_ALL.format(key=s.meta["key"]))


def test_variable_tracking_chain_in_order(smollm2_tokenizer):
    s = needles.make_vt(smollm2_tokenizer, 3000, seed=7, depth=0.25, hops=4)
    names = s.answer.split()
    assert len(names) == len(set(names)) == 5
    assert all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = s.meta["value"]
    first = s.prompt.index(needles.VT_FIRST.format(name=names[0], value=value))
    positions = [first] + [s.prompt.index(needles.VT_HOP.format(name=n, previous=p))
                           for n, p in zip(names[1:], names[:-1])]
    assert positions == sorted(positions)
    assert s.prompt.count(value) == 3  # the first statement and twice in the question
    depths = [i["depth"] for i in s.meta["inserts"]]
    assert depths[0] == 0.25 and depths == sorted(depths) and depths[-1] < 1.0


def test_build_haystack_order_and_offsets():
    inserts = [needles.Insert(0.5, "B"), needles.Insert(0.0, "A"), needles.Insert(0.5, "C"),
               needles.Insert(1.0, "D")]
    text, offsets = needles.build_haystack("HEAD", inserts, 10, "TAIL")
    lines = text.split("\n")
    assert lines[0] == "HEAD" and lines[-1] == "TAIL"
    assert [line for line in lines if len(line) == 1] == ["A", "B", "C", "D"]
    for ins, off in zip(inserts, offsets):
        assert text[off:off + 1] == ins.text
    # Ten filler sentences in total, five before B and C.
    assert sum(line.count(".") for line in lines) == 10
    assert [line if len(line) < 5 else line.count(".") for line in lines] == [
        "HEAD", "A", 5, "B", "C", 5, "D", "TAIL"]
    with pytest.raises(ValueError):
        needles.build_haystack("H", [needles.Insert(-0.1, "x")], 3, "T")


# ---------------------------------------------------------------------------------------------
# Scoring edge cases
@pytest.mark.parametrize(("generated", "answer", "score"), [
    (" 1234567.", "1234567", 1.0),
    ("The number is 1234567", "1234567", 1.0),
    (" 12345678", "1234567", 0.0),  # inside a longer number
    (" 01234567", "1234567", 0.0),
    (" 123456", "1234567", 0.0),
    ("", "1234567", 0.0),
])
def test_score_value(generated, answer, score):
    assert needles.score_value(generated, answer) == score


@pytest.mark.parametrize(("generated", "score"), [
    ("1111111, 2222222, 3333333 and 4444444.", 1.0),
    ("2222222 and 4444444", 0.5),
    ("4444444 4444444 4444444", 0.25),  # repeating one value earns it once
    ("11111112 2222222", 0.25),
    ("none", 0.0),
])
def test_score_all_values_recall(generated, score):
    assert needles.score_all_values(generated, "1111111 2222222 3333333 4444444") == score


@pytest.mark.parametrize(("generated", "score"), [
    (" ABCDE, FGHIJ, KLMNO, PQRST, UVWXY", 1.0),
    (" ABCDE FGHIJ", 0.4),
    (" XABCDE", 0.0),  # a name inside a longer word does not count
    (" abcde", 0.0),
    ("VAR ABCDE = VAR FGHIJ", 0.4),
])
def test_score_all_names_recall(generated, score):
    assert needles.score_all_names(generated, "ABCDE FGHIJ KLMNO PQRST UVWXY") == score


def test_registry_scores_through_samples(smollm2_tokenizer):
    s = TASKS["niah_multivalue"].make(smollm2_tokenizer, 600, seed=0, depth=0.5)
    first_two = " ".join(s.answer.split()[:2])
    assert TASKS["niah_multivalue"].score(first_two, s) == 0.5
    p = TASKS["passkey"].make(smollm2_tokenizer, 600, seed=0, depth=0.5)
    assert TASKS["passkey"].score(f" {p.answer}.", p) == 1.0


def test_largest_fitting_guess_does_not_change_the_answer():
    rng = random.Random(0)
    for _ in range(300):
        widths = [rng.randint(1, 6) for _ in range(200)]
        prefix = [0]
        for w in widths:
            prefix.append(prefix[-1] + w)
        base = rng.randint(0, 30)

        def build(n):
            return [0] * (base + prefix[n])

        target, hi = rng.randint(0, 900), rng.randint(0, 200)
        want = largest_fitting(build, target, hi)
        for guess in (None, 1, hi - 1, rng.randint(0, hi), want, want + 3):
            assert largest_fitting(build, target, hi, guess=guess) == want


# ---------------------------------------------------------------------------------------------
# Perplexity
def test_ppl_stats_and_tail():
    lps = [None] + [-1.0] * 9 + [-3.0] * 2
    st = perplexity.ppl_stats(lps, tail=2, bucket=4)
    assert st["n_scored"] == 11 and st["nll_sum"] == pytest.approx(15.0)
    assert st["tail_n"] == 2 and st["tail_nll_sum"] == pytest.approx(6.0)
    assert st["bucket_nll"] == [[0, 3.0, 3], [1, 4.0, 4], [2, 8.0, 4]]
    assert perplexity.perplexity(st["tail_nll_sum"], st["tail_n"]) == pytest.approx(math.e ** 3)
    inf = perplexity.ppl_stats([None, -1.0, float("-inf")], tail=1)
    assert math.isinf(perplexity.perplexity(inf["nll_sum"], inf["n_scored"]))
    assert perplexity.perplexity(0.0, 0) == math.inf


def test_ppl_windows_end_aligned(monkeypatch):
    monkeypatch.setattr(perplexity, "MAX_WINDOW", 300)
    novels = {name: list(range(i * 1000, i * 1000 + 400 + 50 * i))
              for i, name in enumerate(perplexity.NOVELS)}
    windows = {L: perplexity.make_ppl_sample(None, L, seed=3, novels=novels)
               for L in (10, 100, 300)}
    ends = {w.meta["end"] for w in windows.values()}
    assert len(ends) == 1 and {w.meta["novel"] for w in windows.values()} == {
        list(perplexity.NOVELS)[3]}
    for L, w in windows.items():
        assert w.num_tokens == L and w.token_ids == windows[300].token_ids[-L:]
        assert 300 <= w.meta["end"] <= len(novels[w.meta["novel"]])
    assert perplexity.make_ppl_sample(None, 100, seed=3, novels=novels) == windows[100]
    assert perplexity.make_ppl_sample(None, 100, seed=4, novels=novels).meta["novel"] != \
        windows[100].meta["novel"]
    with pytest.raises(ValueError, match="MAX_WINDOW"):
        perplexity.make_ppl_sample(None, 301, seed=0, novels=novels)


def test_normalise_joins_wrapped_lines():
    text = "CHAPTER 1\n\n\nIt is a truth\nuniversally acknowledged.\n\n  Next   \nline.\n"
    assert perplexity.normalise(text) == (
        "CHAPTER 1\n\nIt is a truth universally acknowledged.\n\nNext line.\n")


# ---------------------------------------------------------------------------------------------
# R data reader (synthetic bytes) and the Austen text
def _xdr_int(v):
    return struct.pack(">i", v)


def _charsxp(s):
    b = s.encode()
    return _xdr_int(9 | (1 << 15)) + _xdr_int(len(b)) + b  # UTF-8 flag in the gp bits


def _strsxp(values, names=None):
    flags = 16 | ((1 << 9) if names else 0)
    out = _xdr_int(flags) + _xdr_int(len(values)) + b"".join(
        _charsxp(v) if v is not None else _xdr_int(9) + _xdr_int(-1) for v in values)
    if names:
        out += _attr_names(names)
    return out


def _attr_names(names):
    # pairlist node with tag: flags LISTSXP | has_tag; tag = SYMSXP(CHARSXP); value; then NIL
    sym = _xdr_int(1) + _charsxp("names")
    return (_xdr_int(2 | (1 << 10)) + sym + _strsxp(names) + _xdr_int(254))


def _header(version=3):
    out = b"X\n" + _xdr_int(version) + _xdr_int(0x040201) + _xdr_int(0x030500)
    if version == 3:
        out += _xdr_int(5) + b"UTF-8"
    return out


def test_unserialize_vectors():
    assert rdata.unserialize(_header(2) + _strsxp(["a", None, "ü"])) == ["a", None, "ü"]
    ints = _header() + _xdr_int(13) + _xdr_int(3) + b"".join(
        _xdr_int(v) for v in (1, -(2**31), 7))
    assert rdata.unserialize(ints) == [1, None, 7]
    named = rdata.unserialize(_header() + _strsxp(["x", "y"], names=["first", "second"]))
    assert named.as_dict() == {"first": "x", "second": "y"}
    with pytest.raises(rdata.RDataError):
        rdata.unserialize(b"A\n" + b"\0" * 12)
    with pytest.raises(rdata.RDataError):
        rdata.unserialize(_header() + _xdr_int(16) + _xdr_int(5))


def test_lazy_load_db(tmp_path):
    objects = {"alpha": _header() + _strsxp(["line one", "line two"]),
               "beta": _header() + _strsxp(["only"])}
    blob = b""
    offsets = {}
    for name, payload in objects.items():
        chunk = struct.pack(">I", len(payload)) + zlib.compress(payload)
        offsets[name] = (len(blob), len(chunk))
        blob += chunk
    (tmp_path / "Rdata.rdb").write_bytes(blob)

    def intvec(a, b):
        return _xdr_int(13) + _xdr_int(2) + _xdr_int(a) + _xdr_int(b)

    variables = (_xdr_int(19 | (1 << 9)) + _xdr_int(2) + intvec(*offsets["alpha"])
                 + intvec(*offsets["beta"]) + _attr_names(["alpha", "beta"]))
    index = (_header() + _xdr_int(19 | (1 << 9)) + _xdr_int(3) + variables + _xdr_int(254)
             + _xdr_int(10) + _xdr_int(1) + _xdr_int(1)
             + _attr_names(["variables", "references", "compressed"]))
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    db = rdata.LazyLoadDB(tmp_path / "Rdata")
    assert db.names == ["alpha", "beta"]
    assert db["alpha"] == ["line one", "line two"] and db["beta"] == ["only"]


def test_austen_novels_load_offline(monkeypatch):
    """The perplexity text (Debian r-cran-janeaustenr) reads with the network cut off."""
    from mesa_vllm.tasks import texts

    try:
        folder = texts.find_austen_dir()
    except texts.TextSourceError as error:
        pytest.skip(f"perplexity text not prepared here (run `mesa-vllm prepare-text`): {error}")

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    texts._load.cache_clear()
    novels = texts.austen_novels()
    assert list(novels) == list(texts.NOVELS)
    assert "It is a truth universally acknowledged" in novels["prideprejudice"][:400]
    assert novels["emma"].startswith("EMMA")
    assert "Project Gutenberg" not in novels["persuasion"]
    assert sum(len(t) for t in novels.values()) > 3_900_000
    assert (folder / "data" / "Rdata.rdb").is_file()


def test_austen_windows_fit_64k(smollm2_tokenizer):
    from mesa_vllm.tasks import texts

    try:
        texts.find_austen_dir()
    except texts.TextSourceError as error:
        pytest.skip(str(error))
    tokenized = perplexity.tokenized_novels(smollm2_tokenizer)
    assert min(len(ids) for ids in tokenized.values()) > perplexity.MAX_WINDOW
    w = perplexity.make_ppl_sample(smollm2_tokenizer, 65536, seed=0)
    assert w.num_tokens == 65536 and w.meta["title"] == "Sense and Sensibility"
