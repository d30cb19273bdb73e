"""The Mesa rule (mesa_vllm/rule.py) and its parameters (mesa_vllm/params.py) against the spec.

No vLLM, no model: pure integer math, checked against a scalar, pair-by-pair
transcription of ``docs/mesa-spec.md`` written independently here (``spec_*`` below),
over many seeded random geometries and lengths.
"""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from mesa_vllm import params, rule
from mesa_vllm.params import MesaConfigError, resolve_geometry, validate_geometry
from mesa_vllm.rule import FIRST, MIDDLE, PLAIN, STAIR, MesaGeometry

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small integer tensors: one thread is as fast, and steadier on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# The spec, transcribed scalar by scalar (independent of rule.py)
def spec_b(g: MesaGeometry, L: int) -> int:
    if L > g.T:
        return max(g.F, g.E * math.ceil((L - g.R) / g.E))
    return g.E * math.ceil((g.T - g.R) / g.E)


def spec_role(g: MesaGeometry, L: int, p: int) -> int:
    if L <= g.T:
        return PLAIN if p < g.T else STAIR
    if p < g.F:
        return FIRST
    if p < spec_b(g, L):
        return MIDDLE
    return STAIR


def spec_anchor(g: MesaGeometry, L: int, p: int) -> int:
    b = spec_b(g, L)
    return b + g.R * math.floor((p - b) / g.R)


def spec_r(g: MesaGeometry, L: int, p: int, j: int) -> int | None:
    """Relative position of key ``j`` for query ``p``, or None when not visible."""
    if j > p:
        return None
    role = spec_role(g, L, p)
    if role in (PLAIN, FIRST):
        return p - j
    if role == MIDDLE:
        s = g.F + g.C * math.floor((p - g.F) / g.C)
        if j < g.F:
            return (g.F + p - s) - j
        if j >= s:
            return p - j
        return None
    a = spec_anchor(g, L, p)
    if j >= a:
        return p - j
    return (p - a + 1) + math.floor((a - 1 - j) / g.E)


def spec_scale(g: MesaGeometry, L: int, p: int) -> float:
    if g.log_n and spec_role(g, L, p) == STAIR:
        return max(1.0, math.log(p + 1) / math.log(g.T))
    return 1.0


def dense(g: MesaGeometry, L: int, n: int, queries=None):
    q = torch.arange(n) if queries is None else torch.as_tensor(queries)
    rel, visible = rule.relative_positions(g, L, q, torch.arange(n))
    return q, rel, visible


def random_geometry(rng: random.Random, T_max: int = 96) -> MesaGeometry:
    """A valid geometry (by the spec's limits) with at least one token of capacity."""
    while True:
        T = rng.randint(8, T_max)
        E = rng.choice([1, 1, 2, 3, 4, 5, 8])
        R = E * rng.randint(1, max(1, (T - 2) // E))
        F = E * rng.randint(0, (T - 1) // E)
        if R >= T - 1 or F >= T:
            continue
        C = rng.randint(1, T - F)
        g = MesaGeometry(T=T, F=F, C=C, R=R, E=E, log_n=rng.random() < 0.7)
        if g.max_supported_len > T:
            validate_geometry(g, g.max_supported_len)
            return g


def interesting_lengths(g: MesaGeometry, rng: random.Random, n: int = 6) -> list[int]:
    cap = g.max_supported_len
    fixed = [1, g.T - 1, g.T, g.T + 1, g.T + g.E, cap]
    picks = [rng.randint(1, cap) for _ in range(n)]
    return sorted({x for x in fixed + picks if 1 <= x <= cap})


# --------------------------------------------------------------------------------------
# Worked example
def test_worked_example_figure1():
    # q9 over k0..k9, 4 exact keys, E = 2 -> 6 6 5 5 4 4 3 2 1 0. Map: R = 4 (the window),
    # L = 10 > T so b = max(F, 2 * ceil((10 - 4) / 2)) = 6, anchor of p = 9 is 6 + 4 * 0 = 6.
    g = MesaGeometry(T=8, F=2, C=4, R=4, E=2)
    assert g.final_start(10) == 6
    assert g.anchor(9, 6) == 6
    assert g.role(9, 10) == STAIR
    rel, visible = rule.relative_positions(g, 10, torch.tensor([9]), torch.arange(10))
    assert visible.all()
    assert rel[0].tolist() == [6, 6, 5, 5, 4, 4, 3, 2, 1, 0]
    # Keys rotated at j // E with the query at p - a + a/E give the same distances.
    qpos = g.stair_query_position(9, 6)
    assert [qpos - g.stair_key_position(j) for j in range(6)] == [6, 6, 5, 5, 4, 4]


# --------------------------------------------------------------------------------------
# Dense rule == spec, pair by pair
def test_dense_rule_matches_spec_pair_by_pair():
    rng = random.Random(1234)
    checked = 0
    for _ in range(40):
        g = random_geometry(rng, T_max=40)
        for L in interesting_lengths(g, rng, n=3):
            n = min(g.max_supported_len, L + rng.randint(0, 2 * g.T), 160)
            if n < 1:
                continue
            q, rel, visible = dense(g, L, n)
            for p in range(n):
                for j in range(n):
                    want = spec_r(g, L, p, j)
                    assert bool(visible[p, j]) == (want is not None), (g, L, p, j)
                    if want is not None:
                        assert int(rel[p, j]) == want, (g, L, p, j)
                checked += 1
            scales = rule.query_scales(g, L, q)
            expected = torch.tensor([spec_scale(g, L, p) for p in range(n)], dtype=torch.float64)
            torch.testing.assert_close(scales, expected, rtol=1e-12, atol=0)
            for p in range(n):
                assert g.query_scale(p) == pytest.approx(
                    max(1.0, math.log(p + 1) / math.log(g.T)) if g.log_n else 1.0
                )
    assert checked > 1000


# --------------------------------------------------------------------------------------
# Validity: every visible r in [0, T) up to max_supported_len
def _assert_in_range(g: MesaGeometry, L: int, n: int, queries=None):
    q, rel, visible = dense(g, L, n, queries)
    causal = torch.arange(n)[None, :] <= q[:, None]
    assert not (visible & ~causal).any(), "a query sees a future key"
    vis_rel = rel[visible]
    assert int(vis_rel.min()) >= 0, (g, L)
    assert int(vis_rel.max()) < g.T, (g, L, int(vis_rel.max()))
    # Each query sees itself at r = 0, and key 0 (the sink) unless there is no first chunk.
    assert visible[torch.arange(q.numel()), q].all()
    assert (rel[torch.arange(q.numel()), q] == 0).all()
    if g.F > 0:
        assert visible[:, 0].all()


def test_relative_positions_below_T_random_geometries():
    rng = random.Random(7)
    for _ in range(50):
        g = random_geometry(rng)
        cap = g.max_supported_len
        for L in interesting_lengths(g, rng, n=4):
            queries = None
            if cap > 300:  # keep the dense matrix small: boundaries plus a random sample
                b = g.final_start(L)
                picks = {0, g.F, b - 1, b, g.T - 1, g.T, cap - 1, L - 1, L}
                picks |= {rng.randrange(cap) for _ in range(64)}
                queries = sorted(x for x in picks if 0 <= x < cap)
            _assert_in_range(g, L, cap, queries)


@pytest.mark.parametrize("T", [64, 128, 4096, 8192])
def test_defaults_valid_and_below_T(T):
    rng = random.Random(T)
    for mult in (0.5, 1, 3, 4, 8):
        mml = int(mult * T)
        g = resolve_geometry(T, mml)
        validate_geometry(g, mml)
        assert g.max_supported_len >= mml
        assert g.F + g.C <= T and g.F % g.E == 0 and g.R % g.E == 0 and g.R >= g.E
        assert 0 <= g.F < T and 1 <= g.C and g.R < T - 1
        for L in {T, T + 1, mml}:
            L = max(1, min(L, mml))
            b = g.final_start(L)
            # The farthest-reaching queries: last position, anchor edges, chunk ends.
            picks = {mml - 1, b, min(mml - 1, b + g.R - 1), g.F + g.C - 1, T - 1, T}
            picks |= {rng.randrange(mml) for _ in range(16)}
            _assert_in_range(g, L, mml, sorted(x for x in picks if 0 <= x < mml))


# --------------------------------------------------------------------------------------
# Roles and boundaries
def test_roles_and_final_start_match_spec():
    rng = random.Random(99)
    for _ in range(200):
        g = random_geometry(rng)
        for L in interesting_lengths(g, rng):
            b = g.final_start(L)
            assert b == spec_b(g, L)
            assert b % g.E == 0  # on the stair grid (F is a multiple of E)
            if L > g.T:
                # the last R prompt tokens, or up to E - 1 fewer; never before F
                assert b >= g.F
                if b > g.F:
                    assert L - g.R <= b < L - g.R + g.E
                assert b < L  # at least one prompt token is STAIR
            else:
                # a prompt that fits is treated as T long
                assert b == spec_b(g, g.T) and g.T - g.R <= b < g.T - g.R + g.E
            for p in range(0, min(g.max_supported_len, L + 2 * g.T)):
                assert g.role(p, L) == spec_role(g, L, p), (g, L, p)
                if spec_role(g, L, p) == MIDDLE:
                    assert g.chunk_start(p) == g.F + g.C * ((p - g.F) // g.C)
                if spec_role(g, L, p) == STAIR:
                    assert g.anchor(p, b) == spec_anchor(g, L, p)


def test_role_boundaries_explicit():
    g = MesaGeometry(T=64, F=8, C=16, R=16, E=8)
    # Long prompt L = 100: b = max(8, 8 * ceil(84 / 8)) = 88.
    assert g.final_start(100) == 88
    roles = [g.role(p, 100) for p in range(120)]
    assert roles[:8] == [FIRST] * 8
    assert roles[8:88] == [MIDDLE] * 80
    assert roles[88:] == [STAIR] * 32
    # Rounding to the grid: L - R = 85 -> 88; L - R = 88 -> 88; 89 -> 96.
    assert [g.final_start(L) for L in (101, 104, 105)] == [88, 88, 96]
    # b never below F.
    assert MesaGeometry(T=64, F=48, C=16, R=16, E=8).final_start(65) == 56 > 48
    assert MesaGeometry(T=64, F=56, C=8, R=16, E=8).final_start(65) == 56
    # Short prompts: all PLAIN below T, b = E * ceil((T - R) / E) = 48 for the stair past T.
    for L in (1, 40, 64):
        assert g.final_start(L) == 48
        assert [g.role(p, L) for p in range(70)] == [PLAIN] * 64 + [STAIR] * 6
    g2 = MesaGeometry(T=64, F=6, C=16, R=18, E=6)
    assert g2.final_start(10) == 48  # 6 * ceil(46 / 6)


def test_short_prompt_is_plain_attention():
    rng = random.Random(5)
    for _ in range(30):
        g = random_geometry(rng)
        for L in (1, rng.randint(1, g.T), g.T):
            _, rel, visible = dense(g, L, g.T)
            p = torch.arange(g.T)
            causal = p[None, :] <= p[:, None]
            assert torch.equal(visible, causal)
            assert torch.equal(rel[causal], (p[:, None] - p[None, :])[causal])
            assert (rule.query_scales(g, L, p) == 1).all()


def test_plain_end_rows_are_plain():
    rng = random.Random(13)
    for _ in range(40):
        g = random_geometry(rng)
        for L in interesting_lengths(g, rng, n=2):
            end = g.plain_end(L)
            assert end == (g.T if L <= g.T else min(g.F + g.C, g.final_start(L)))
            n = min(end, g.max_supported_len)
            _, rel, visible = dense(g, L, n)
            p = torch.arange(n)
            causal = p[None, :] <= p[:, None]
            assert torch.equal(visible, causal)
            assert torch.equal(rel[causal], (p[:, None] - p[None, :])[causal])


def test_middle_chunk_visibility_exact():
    rng = random.Random(11)
    for _ in range(40):
        g = random_geometry(rng)
        if g.max_supported_len <= g.T + 2 * g.R:
            continue
        L = rng.randint(g.T + 1, min(g.max_supported_len, 4 * g.T))
        b = g.final_start(L)
        _, rel, visible = dense(g, L, L)
        for p in range(g.F, b):
            s = g.F + g.C * ((p - g.F) // g.C)
            assert g.chunk_start(p) == s
            seen = set(torch.nonzero(visible[p]).flatten().tolist())
            assert seen == set(range(g.F)) | set(range(s, p + 1)), (g, L, p)
            for j in range(g.F):
                assert int(rel[p, j]) == (g.F + p - s) - j
                assert int(rel[p, j]) == g.middle_first_chunk_query_position(p) - j
            for j in range(s, p + 1):
                assert int(rel[p, j]) == p - j
            # The chunk sits right after the first chunk: no gap, no overlap.
            assert int(rel[p, g.F - 1]) == p - s + 1 if g.F else True


def test_stair_window_exact_and_anchor_moves_by_R():
    rng = random.Random(21)
    for _ in range(40):
        g = random_geometry(rng)
        cap = g.max_supported_len
        L = rng.choice([rng.randint(1, g.T), rng.randint(g.T + 1, max(g.T + 1, cap // 2))])
        L = min(L, cap)
        b = g.final_start(L)
        start = b if L > g.T else g.T
        n = min(cap, start + 3 * g.R + 2)
        _, rel, visible = dense(g, L, n)
        prev_a = None
        for p in range(start, n):
            a = spec_anchor(g, L, p)
            assert g.anchor(p, b) == a
            assert a <= p < a + g.R and a % g.E == 0 and (a - b) % g.R == 0
            if prev_a is not None:
                # The window moves only at p = b + k R, and then by exactly R.
                assert a - prev_a == (g.R if (p - b) % g.R == 0 else 0)
            prev_a = a
            assert visible[p, : p + 1].all() and not visible[p, p + 1 :].any()
            window = rel[p, a : p + 1]
            assert window.tolist() == list(range(p - a, -1, -1))
            stair = rel[p, :a].tolist()
            assert stair == [(p - a + 1) + (a - 1 - j) // g.E for j in range(a)]
            # every E keys (aligned to the grid) share one distance, one apart per group
            for j in range(a):
                assert stair[j] == p - a + a // g.E - j // g.E
                assert stair[j] == g.stair_query_position(p, a) - g.stair_key_position(j)


def test_stair_during_generation_short_and_long():
    g = MesaGeometry(T=64, F=8, C=16, R=16, E=8)
    # Short prompt (L = 40): generated tokens at 40..63 are PLAIN, from 64 on STAIR with
    # b = 48, so anchors are 64, 80, 96, ...
    assert [g.role(p, 40) for p in (40, 63, 64)] == [PLAIN, PLAIN, STAIR]
    assert [g.anchor(p, 48) for p in (64, 79, 80, 95, 96)] == [64, 64, 80, 80, 96]
    # Long prompt (L = 100, b = 88): prompt tokens 88..99 and generated 100..103 share
    # anchor 88; 104 starts the next window.
    assert [g.anchor(p, 88) for p in (88, 99, 103, 104, 119, 120)] == [88, 88, 88, 104, 104, 120]


# --------------------------------------------------------------------------------------
# Prefix-cache keys
def _rows_signature(g: MesaGeometry, L: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, rel, visible = dense(g, L, n)
    return torch.where(visible, rel, torch.full_like(rel, -1)), rule.query_scales(g, L, q)


def _first_divergence(sig1, sig2) -> int:
    """First position whose attention row (or query scale) differs between two requests."""
    (m1, s1), (m2, s2) = sig1, sig2
    differs = (m1 != m2).any(dim=1) | (s1 != s2)
    idx = torch.nonzero(differs).flatten()
    return int(idx[0]) if idx.numel() else m1.shape[0]


def test_cache_role_key_is_sound():
    """Equal keys => every token of the block and before it has an identical attention row.

    The KV of a token (at every layer) is a function of the rows of all tokens up to it,
    so identical rows up to the block end are exactly what makes sharing safe.
    """
    rng = random.Random(3)
    pairs_checked = 0
    for _ in range(30):
        g = random_geometry(rng, T_max=64)
        n = min(g.max_supported_len, 4 * g.T)
        lengths = sorted({rng.randint(1, g.T), g.T, rng.randint(1, n), g.T + 1,
                          rng.randint(g.T + 1, max(g.T + 1, n)), n} - {0})
        lengths = [L for L in lengths if L <= n]
        sigs = {L: _rows_signature(g, L, n) for L in lengths}
        for L1 in lengths:
            for L2 in lengths:
                d = _first_divergence(sigs[L1], sigs[L2])
                for block_end in range(1, n + 1):
                    if g.cache_role_key(L1, block_end) == g.cache_role_key(L2, block_end):
                        assert block_end <= d, (g, L1, L2, block_end, d)
                        pairs_checked += 1
                # None means "plain": shared with every request, whatever its length.
                for block_end in range(1, n + 1):
                    if g.cache_role_key(L1, block_end) is None:
                        m, _ = sigs[L1]
                        p = torch.arange(block_end)
                        plain = torch.where(p[None, :] <= p[:, None], p[:, None] - p[None, :], -1)
                        assert torch.equal(m[:block_end, :block_end], plain)
    assert pairs_checked > 1000


def test_cache_role_key_expected_sharing():
    g = MesaGeometry(T=64, F=8, C=16, R=16, E=8)
    plain_end = g.F + g.C  # 24
    long_a, long_b, long_c = 200, 199, 300  # b = 184, 184, 288
    assert g.final_start(long_a) == g.final_start(long_b) == 184 and g.final_start(long_c) == 288
    # Blocks ending within min(F + C, b) are shared by everyone, short or long.
    for L in (1, 30, 64, long_a, long_c):
        for block_end in range(1, min(plain_end, g.final_start(L)) + 1):
            assert g.cache_role_key(L, block_end) is None
    # Past F + C, short prompts share among themselves only.
    assert g.cache_role_key(30, 40) == g.cache_role_key(64, 40) == g.cache_role_key(10, 100)
    assert g.cache_role_key(30, 40) != g.cache_role_key(long_a, 40)
    # Chunked blocks of two long prompts share keys (up to the first final region).
    for block_end in range(plain_end + 1, 185):
        assert g.cache_role_key(long_a, block_end) == g.cache_role_key(long_c, block_end)
        assert g.cache_role_key(long_a, block_end) is not None
    # Final-region blocks: equal b -> shared, different b -> not.
    for block_end in range(185, 260):
        assert g.cache_role_key(long_a, block_end) == g.cache_role_key(long_b, block_end)
        assert g.cache_role_key(long_a, block_end) != g.cache_role_key(long_c, block_end)
    # A long prompt whose final region starts before F + C: nothing past b is None.
    g2 = MesaGeometry(T=64, F=8, C=56, R=56, E=8)
    b = g2.final_start(65)
    assert b < g2.F + g2.C
    assert g2.cache_role_key(65, b) is None and g2.cache_role_key(65, b + 1) is not None


# --------------------------------------------------------------------------------------
# Parameters: defaults, overrides, refusals
@pytest.mark.parametrize("T", [64, 128, 4096, 8192])
def test_resolve_geometry_defaults(T):
    for mml in sorted({1, T // 3, T, 2 * T, 4 * T, 8 * T - 1, 8 * T}):
        g = resolve_geometry(T, mml)
        validate_geometry(g, mml)
        assert g.T == T and g.log_n is True
        assert g.max_supported_len >= mml
    assert resolve_geometry(T, params.default_max_model_len(T)).max_supported_len >= 4 * T


def test_overrides_applied_and_parsed():
    g = resolve_geometry(64, 256, {"e": "8", "R": 16, "F": "8", "C": 16, "LOG_N": "off"})
    assert (g.F, g.C, g.R, g.E, g.log_n) == (8, 16, 16, 8, False)
    env = {"MESA_E": "4", "MESA_LOG_N": "true"}
    assert params.read_overrides({"E": 8}, environ=env) == {"E": 8, "log_n": True}
    with pytest.raises(MesaConfigError, match="unknown mesa parameter"):
        params.read_overrides({"G": 1}, environ={})
    with pytest.raises(MesaConfigError, match="whole number"):
        params.read_overrides({"E": "eight"}, environ={})
    with pytest.raises(MesaConfigError, match="boolean"):
        params.read_overrides({"log_n": "maybe"}, environ={})


_FIX_PATTERNS = (
    # "Use E=5 (with R=10, F=5)"
    (r"Use E=(\d+) \(with R=(\d+), F=(\d+)\)", lambda m: {"E": m[1], "R": m[2], "F": m[3]}),
    (r"F=(\d+) with C=(\d+)", lambda m: {"F": m[1], "C": m[2]}),
    (r"(?:try|works:) ([FCRE])=(\d+)", lambda m: {m[1]: m[2]}),
    (r"--max-model-len (\d+)", lambda m: {"max_model_len": m[1]}),
)


def _suggested_fixes(message: str) -> list[dict]:
    fixes = []
    for pattern, build in _FIX_PATTERNS:
        for m in re.finditer(pattern, message):
            fixes.append({k: int(v) for k, v in build(m).items()})
    # "F=.. with C=.." also matches "works: F=..": keep the fuller fix only.
    if any(set(f) == {"F", "C"} for f in fixes):
        fixes = [f for f in fixes if set(f) != {"F"}]
    return fixes


@pytest.mark.parametrize(
    ("T", "mml", "overrides", "limit"),
    [
        (64, 1024, {"E": 4}, "max_model_len <= E * (T - 1 - R)"),
        (64, 300, {"E": 5, "R": 10, "F": 5}, "max_model_len <= E * (T - 1 - R)"),
        (4096, 8 * 4096, {"E": 4}, "max_model_len <= E * (T - 1 - R)"),
        (64, 1024, {}, "max_model_len <= E * (T - 1 - R)"),  # no E can cover it
        (128, 128 * 40, {}, "max_model_len <= E * (T - 1 - R)"),
        (64, 256, {"C": 60, "F": 10, "E": 5, "R": 10}, "F + C <= T"),
        (64, 32, {"F": 64, "E": 1, "R": 8}, "F + C <= T"),
        (16, 50, {"R": 15, "F": 14}, "R < T - 1"),
        (64, 100, {"F": 64}, "F + C <= T"),
        (64, 200, {"F": 70, "E": 5, "R": 10}, "F + C <= T"),
        (64, 256, {"E": 8, "F": 12, "R": 8}, "multiple of E"),
        (64, 256, {"E": 8, "R": 12}, "multiple of E"),
        (64, 256, {"E": 8, "R": 4}, "at least E"),
        (64, 32, {"E": 1, "R": 63}, "R < T - 1"),
    ],
)
def test_invalid_settings_are_refused_with_a_working_value(T, mml, overrides, limit):
    with pytest.raises(MesaConfigError) as info:
        resolve_geometry(T, mml, overrides)
    message = str(info.value)
    assert limit in message, message
    fixes = _suggested_fixes(message)
    assert fixes, f"no value that works in: {message}"
    for fix in fixes:
        fixed = dict(overrides)
        fixed_mml = fix.pop("max_model_len", mml)
        fixed.update(fix)
        g = resolve_geometry(T, fixed_mml, fixed)  # must not raise
        validate_geometry(g, fixed_mml)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [({"E": 0}, "E=0 must be >= 1"), ({"C": 0}, "C=0 must be >= 1"), ({"F": -1}, "F=-1")],
)
def test_out_of_range_values_refused(overrides, needle):
    with pytest.raises(MesaConfigError, match=re.escape(needle)):
        resolve_geometry(64, 128, overrides)
    with pytest.raises(MesaConfigError, match="T=4"):
        resolve_geometry(4, 8)


def test_suggestion_chains_converge_for_random_bad_settings():
    """Any refusal's suggestion fixes the named limit; following them ends valid, fast."""
    rng = random.Random(17)
    refused = 0
    for _ in range(300):
        T = rng.choice([16, 64, 128, 4096])
        mml = rng.randint(1, 10 * T)
        overrides = {}
        for name, hi in (("E", T // 4), ("R", T), ("F", T), ("C", T)):
            if rng.random() < 0.5:
                overrides[name] = rng.randint(1, max(1, hi))
        for _step in range(6):
            try:
                resolve_geometry(T, mml, overrides)
                break
            except MesaConfigError as err:
                refused += 1
                fixes = _suggested_fixes(str(err))
                assert fixes, str(err)
                fix = dict(fixes[-1])  # prefer --max-model-len / the simplest fix
                mml = fix.pop("max_model_len", mml)
                overrides.update(fix)
        else:
            pytest.fail(f"suggestions did not converge: T={T} mml={mml} {overrides}")
    assert refused > 50


# --------------------------------------------------------------------------------------
# The linear stair (opt-in variant outside the spec)
def spec_r_linear(g: MesaGeometry, L: int, p: int, j: int) -> float | None:
    """As :func:`spec_r`, but keys before a stair token's window fall by 1/E each."""
    r = spec_r(g, L, p, j)
    if r is None or spec_role(g, L, p) != STAIR:
        return r
    a = spec_anchor(g, L, p)
    return r if j >= a else (p - a) + (a - j) / g.E


def test_linear_stair_worked_example():
    g = MesaGeometry(T=8, F=2, C=4, R=4, E=2, stair="linear")
    rel, _ = rule.relative_positions(g, 10, torch.tensor([9]), torch.arange(10))
    # Step: 6 6 5 5 4 4 | 3 2 1 0; linear meets it at j = a - kE and halves the steps between.
    assert rel[0].tolist() == [6, 5.5, 5, 4.5, 4, 3.5, 3, 2, 1, 0]
    qpos = g.stair_query_position(9, 6)
    assert [qpos - g.stair_key_position(j) for j in range(6)] == [6, 5.5, 5, 4.5, 4, 3.5]


def test_linear_stair_matches_spec_variant_pair_by_pair():
    rng = random.Random(31)
    for _ in range(25):
        step = random_geometry(rng, T_max=48)
        g = MesaGeometry(**{**step.as_dict(), "stair": "linear"})
        for L in interesting_lengths(g, rng, n=2):
            n = min(g.max_supported_len, L + 2 * g.R)
            _, rel, visible = dense(g, L, n)
            _, rel_step, visible_step = dense(step, L, n)
            assert torch.equal(visible, visible_step)
            for p in range(n):
                for j in range(p + 1):
                    want = spec_r_linear(g, L, p, j)
                    if want is None:
                        assert not visible[p, j]
                        continue
                    got = float(rel[p, j])
                    assert abs(got - want) < 1e-9, (g, L, p, j, got, want)
                    # never further than the step's distance, and below T
                    assert got <= float(rel_step[p, j]) and got < g.T
            # distinct distances for distinct keys of a stair query (the point of the shape)
            p = n - 1
            if g.role(p, L) == STAIR and g.E > 1:
                row = rel[p, : p + 1]
                assert torch.unique(row).numel() == p + 1


def test_stair_shape_parsed_and_refused():
    g = resolve_geometry(64, 256, {"stair": "LINEAR"})
    assert g.stair == "linear" and g.max_supported_len == resolve_geometry(64, 256).max_supported_len
    assert resolve_geometry(64, 256).stair == "step"
    assert params.read_overrides({}, environ={"MESA_STAIR": "linear"}) == {"stair": "linear"}
    with pytest.raises(MesaConfigError, match="stair='ramp' is not a stair shape; use one of step, linear"):
        resolve_geometry(64, 256, {"stair": "ramp"})
    with pytest.raises(ValueError, match="stair shapes"):
        MesaGeometry(T=64, F=8, C=16, R=16, E=8, stair="ramp")
