"""The dense oracle (mesa_vllm/oracle.py): right against Hugging Face, and the rule's behaviour.

Tiny random models (T = 64, fp32), CPU only, no vLLM.

Tolerances (fp32 models, logits of magnitude ~10):
- oracle vs Hugging Face at positions < T: 1e-4 abs. The oracle scores in float64 with
  float64 angles, Hugging Face in fp32; the rest of the network is the same code.
- oracle vs Hugging Face at positions up to 3T (plain attention): 5e-4 abs, since HF's
  fp32 angles ``position * inv_freq`` lose precision as positions grow.
- incremental decode vs full recompute: 2e-4 abs (same attention math, fp32 projections
  over different batch shapes).
- "does not change": bitwise equal (the same rows go through the same arithmetic).
- "changes": more than 2e-5 abs somewhere in the logits row: 20x the fp32 rounding of
  logits of this size, while rows that must not change are bitwise equal. (One token among
  hundreds of stair keys can move a far query's logits by only ~1e-4.)
"""

from __future__ import annotations

import pytest
import torch

from mesa_vllm import params
from mesa_vllm.oracle import (
    MesaOracle,
    UnsupportedModelError,
    family_for,
    load_oracle,
    trained_length,
)
from mesa_vllm.testing import (
    MAX_GREEDY_TIES,
    TINY_VOCAB,
    check_greedy_result,
    greedy_mismatches,
    greedy_mismatches_vs_oracle,
    make_tiny_llama,
    random_prompt,
)

pytestmark = pytest.mark.cpu

T = 64
HF_ATOL = 1e-4
HF_FAR_ATOL = 5e-4
DECODE_ATOL = 2e-4
CHANGED = 2e-5

# F, C, R, E on a grid small enough that a 5T prompt has many middle chunks and the
# window moves several times during generation. Stair capacity 8 * (63 - 16) = 376.
SHAPE = {"F": 8, "C": 16, "R": 16, "E": 8}
GEOMETRY = params.resolve_geometry(T, 376, SHAPE)
GEOMETRY_NO_LOG = params.resolve_geometry(T, 376, {**SHAPE, "log_n": False})
LONG = 5 * T  # 320: b = 8 * ceil((320 - 16) / 8) = 304


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors: one thread is as fast, and far steadier on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def hf_models(model_dir):
    from transformers import AutoModelForCausalLM

    return {
        impl: AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=impl
        ).eval()
        for impl in ("eager", "sdpa")
    }


@pytest.fixture(scope="module")
def plain(model_dir):
    return MesaOracle(model_dir, None)


@pytest.fixture(scope="module")
def mesa(model_dir):
    return MesaOracle(model_dir, GEOMETRY)


@pytest.fixture(scope="module")
def mesa_no_log(model_dir):
    return MesaOracle(model_dir, GEOMETRY_NO_LOG)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def max_diff(a, b):
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------
# The oracle's attention + RoPE math against Hugging Face's own
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("length", [1, 17, T])
def test_plain_and_mesa_match_hf_within_T(hf_models, plain, mesa, impl, length):
    ids = random_prompt(length, seed=length)
    reference = hf_logits(hf_models[impl], ids)
    assert max_diff(plain.logits(ids), reference) < HF_ATOL
    assert max_diff(mesa.logits(ids), reference) < HF_ATOL


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_plain_oracle_matches_hf_past_T(hf_models, plain, impl):
    ids = random_prompt(3 * T, seed=3)
    assert max_diff(plain.logits(ids), hf_logits(hf_models[impl], ids)) < HF_FAR_ATOL


def test_model_object_is_restored(hf_models):
    model = hf_models["eager"]
    ids = random_prompt(40, seed=4)
    before = hf_logits(model, ids)
    rotary = model.model.rotary_emb
    oracle = MesaOracle(model, GEOMETRY)
    assert max_diff(oracle.logits(ids), before) < HF_ATOL
    assert model.model.rotary_emb is rotary
    assert model.config._attn_implementation == "eager"
    assert torch.equal(hf_logits(model, ids), before)


def test_prompt_logprobs(plain):
    ids = random_prompt(30, seed=5)
    logprobs = plain.prompt_logprobs(ids)
    assert len(logprobs) == 30 and logprobs[0] is None
    expected = torch.log_softmax(plain.logits(ids).double(), dim=-1)
    for i in range(1, 30):
        assert logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-9)
        assert logprobs[i] <= 0


# --------------------------------------------------------------------------------------
# Incremental decoding == recompute from scratch, at every step
def _check_decode_against_recompute(oracle, prompt, steps):
    ids, logprobs, step_logits = oracle.generate(prompt, steps)
    assert len(ids) == steps and len(logprobs) == steps
    assert oracle.greedy(prompt, steps) == ids
    assert oracle.greedy_with_logprobs(prompt, steps) == (ids, logprobs)
    for i in range(steps):
        recomputed = oracle.logits(prompt + ids[:i], prompt_len=len(prompt))[-1]
        assert int(recomputed.argmax()) == ids[i], f"step {i}"
        assert max_diff(recomputed, step_logits[i]) < DECODE_ATOL, f"step {i}"
        expected_lp = float(torch.log_softmax(recomputed.double(), -1)[ids[i]])
        assert logprobs[i] == pytest.approx(expected_lp, abs=DECODE_ATOL)
    return ids


def test_greedy_equals_recompute_long_prompt(mesa):
    # L = 5T; generated positions 320..359 cross window moves at 320, 336, 352.
    prompt = random_prompt(LONG, seed=6)
    ids = _check_decode_against_recompute(mesa, prompt, 40)
    assert len(set(ids)) > 5  # a real sequence, not one token repeated


def test_greedy_equals_recompute_short_prompt_past_T(mesa):
    # L = 40: generated positions 40..63 are PLAIN, 64..99 STAIR (anchors 64, 80, 96).
    prompt = random_prompt(40, seed=7)
    _check_decode_against_recompute(mesa, prompt, 60)


def test_short_prompt_generation_within_T_equals_plain(mesa, plain):
    prompt = random_prompt(30, seed=8)
    ids, logprobs, step_logits = mesa.generate(prompt, 30)  # positions < T only
    ids_p, logprobs_p, step_logits_p = plain.generate(prompt, 30)
    assert ids == ids_p
    assert torch.equal(step_logits, step_logits_p)


def test_eos_stops_generation(mesa):
    prompt = random_prompt(20, seed=9)
    ids = mesa.greedy(prompt, 10)
    stop = ids[3]
    first = ids.index(stop)
    assert mesa.greedy(prompt, 10, eos_token_id=stop) == ids[: first + 1]


def test_greedy_check_accepts_only_near_ties(mesa):
    """The engine tests' greedy check: the oracle's own continuation passes, a token that is
    not (near-)top fails with its position, and near-ties are counted, not hidden."""
    prompt = random_prompt(LONG, seed=10)
    ids = mesa.greedy(prompt, 12)
    assert greedy_mismatches_vs_oracle(mesa, prompt, ids) == ([], 0)
    steps = mesa.logits(prompt + ids, prompt_len=len(prompt))[len(prompt) - 1 : -1].double()
    worst = int(steps[5].argmin())
    problems, _ = greedy_mismatches_vs_oracle(mesa, prompt, ids[:5] + [worst] + ids[6:])
    assert len(problems) >= 1 and problems[0].startswith("generated token 5:")
    # With a tolerance wider than every gap, every differing token counts as a tie.
    second = [int(row.topk(2).indices[1]) for row in steps]
    problems, ties = greedy_mismatches(steps, second, tie_tol=float("inf"))
    assert problems == [] and ties == len(ids)
    with pytest.raises(AssertionError, match="near-ties"):
        check_greedy_result([], MAX_GREEDY_TIES + 1, "x")


# --------------------------------------------------------------------------------------
# Behaviour of the rule
def _perturb(ids, position):
    out = list(ids)
    out[position] = 3 + (out[position] - 3 + 101) % (TINY_VOCAB - 3)
    assert out[position] != ids[position]
    return out


@pytest.fixture(scope="module")
def long_case(mesa):
    prompt = random_prompt(LONG, seed=10)
    return prompt, mesa.logits(prompt)


def test_long_prompt_roles(long_case):
    prompt, _ = long_case
    assert GEOMETRY.final_start(len(prompt)) == 304
    assert GEOMETRY.chunk_start(130) == 120


def test_middle_query_ignores_other_middle_chunks(mesa, long_case):
    prompt, base = long_case
    # Query 130 (chunk [120, 136)) sees [0, 8) and [120, 130] only.
    other_chunk = mesa.logits(_perturb(prompt, 60))  # chunk [56, 72)
    assert torch.equal(other_chunk[120:136], base[120:136])
    assert torch.equal(other_chunk[:60], base[:60])  # causality
    assert max_diff(other_chunk[60], base[60]) > CHANGED  # the token itself changed
    assert max_diff(other_chunk[71], base[71]) > CHANGED  # its own chunk sees it
    assert torch.equal(other_chunk[72:88], base[72:88])  # the next chunk does not


def test_middle_query_depends_on_first_chunk_and_own_chunk(mesa, long_case):
    prompt, base = long_case
    for position in (0, 3, 7, 120, 125):
        changed = mesa.logits(_perturb(prompt, position))
        assert max_diff(changed[130], base[130]) > CHANGED, position
    # A first-chunk token reaches every later token.
    changed = mesa.logits(_perturb(prompt, 3))
    for p in (10, 50, 200, 303, 304, 319):
        assert max_diff(changed[p], base[p]) > CHANGED, p


def test_stair_query_depends_on_all_earlier_tokens(mesa, long_case):
    prompt, base = long_case
    # One far key among ~300 can carry a tiny attention weight in this random model, so
    # its effect on the logits may be ~1e-6: any difference counts, which is sound
    # because rows that do not depend on a token stay bitwise equal (tests above).
    for position in (0, 7, 8, 30, 100, 215, 290, 303, 304, 310):
        changed = mesa.logits(_perturb(prompt, position))
        assert not torch.equal(changed[311], base[311]), position
        assert not torch.equal(changed[319], base[319]), position
        assert torch.equal(changed[:position], base[:position])
        if position >= 304:  # inside the exact window: a strong effect
            assert max_diff(changed[311], base[311]) > CHANGED, position


def test_prompts_within_T_are_plain_attention(mesa, plain, mesa_no_log):
    for length in (5, 33, T):
        ids = random_prompt(length, seed=11 + length)
        reference = plain.logits(ids)
        assert torch.equal(mesa.logits(ids), reference)
        assert torch.equal(mesa_no_log.logits(ids), reference)


def test_log_n_changes_stair_outputs_only(mesa, mesa_no_log, long_case):
    prompt, base = long_case
    b = GEOMETRY.final_start(LONG)
    no_log = mesa_no_log.logits(prompt)
    assert torch.equal(no_log[:b], base[:b])
    for p in range(b, LONG):  # every stair query here is past T, so scaled
        assert max_diff(no_log[p], base[p]) > CHANGED, p
    # Short prompt, generation past T: positions < T agree, stair positions differ.
    seq = random_prompt(100, seed=12)
    with_log = mesa.logits(seq, prompt_len=40)
    without = mesa_no_log.logits(seq, prompt_len=40)
    assert torch.equal(with_log[:T], without[:T])
    assert all(max_diff(with_log[p], without[p]) > CHANGED for p in range(T, 100))


# --------------------------------------------------------------------------------------
# Loading, T, refusals
def test_load_oracle_uses_default_geometry(model_dir):
    oracle = load_oracle(model_dir)
    assert oracle.geometry == params.resolve_geometry(T, 4 * T)
    custom = load_oracle(model_dir, max_model_len=376, E=8, R=16, F=8, C=16, log_n=False)
    assert custom.geometry == GEOMETRY_NO_LOG
    with pytest.raises(params.MesaConfigError):
        load_oracle(model_dir, max_model_len=100 * T)


def test_sequence_past_capacity_is_refused(mesa):
    with pytest.raises(ValueError, match="capacity"):
        mesa.greedy(random_prompt(370, seed=13), 10)
    with pytest.raises(ValueError, match="prompt_len"):
        mesa.logits([5, 6, 7], prompt_len=4)


def test_trained_length_from_config():
    from transformers import LlamaConfig

    assert trained_length(LlamaConfig(max_position_embeddings=4096)) == 4096
    scaled = LlamaConfig(
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 16.0,
            "rope_theta": 500000.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    assert trained_length(scaled) == 8192


def test_unsupported_models_are_refused():
    from transformers import GPT2Config, MistralConfig

    with pytest.raises(UnsupportedModelError, match="not supported"):
        family_for(GPT2Config())
    sliding = MistralConfig(sliding_window=4096)
    with pytest.raises(UnsupportedModelError, match="sliding"):
        family_for(sliding).check(sliding)


# --------------------------------------------------------------------------------------
# Rope-scaled configs and other families (same attention code path in transformers 5.x)
def _tiny_config(kind):
    from transformers import (
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=T, initializer_range=0.25,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    gqa = dict(common, num_key_value_heads=2)
    rope = {"rope_theta": 10000.0}
    return {
        "llama_linear": lambda: LlamaConfig(
            **gqa, rope_parameters={"rope_type": "linear", "factor": 2.0, **rope}
        ),
        # attention_scaling != 1 (YaRN): enters the scores squared.
        "llama_yarn": lambda: LlamaConfig(
            **gqa,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, **rope,
                             "original_max_position_embeddings": 16},
        ),
        "mistral": lambda: MistralConfig(**gqa, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**gqa, use_sliding_window=False),
        "qwen3": lambda: Qwen3Config(**gqa, head_dim=16),
        # partial rotary: only the first channels rotate
        "phi3": lambda: Phi3Config(**gqa, sliding_window=None, partial_rotary_factor=0.5),
        "gpt_neox": lambda: GPTNeoXConfig(**common, rotary_pct=0.25),
    }[kind]()


@pytest.mark.parametrize(
    "kind", ["llama_linear", "llama_yarn", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox"]
)
def test_other_configs_match_hf(kind):
    from transformers import AutoModelForCausalLM

    config = _tiny_config(kind)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    T_model = trained_length(config)
    geometry = params.resolve_geometry(T_model, 3 * T_model + 4)
    plain_oracle = MesaOracle(model, None)
    mesa_oracle = MesaOracle(model, geometry)
    for length in (5, T_model):
        ids = random_prompt(length, seed=length)
        reference = hf_logits(model, ids)
        assert max_diff(plain_oracle.logits(ids), reference) < HF_ATOL
        assert max_diff(mesa_oracle.logits(ids), reference) < HF_ATOL
    # Past T the rule runs; decoding stays consistent with recompute.
    prompt = random_prompt(3 * T_model, seed=1)
    ids, _, step_logits = mesa_oracle.generate(prompt, 4)
    full = mesa_oracle.logits(prompt + ids, prompt_len=len(prompt))
    assert max_diff(full[len(prompt) - 1 : -1], step_logits) < DECODE_ATOL


def test_oracle_from_path_builds_fresh_model(tmp_path):
    path = make_tiny_llama(tmp_path / "m", trained_len=32, seed=3, num_layers=1)
    oracle = load_oracle(path)
    assert oracle.trained_len == 32 and oracle.geometry.T == 32
    assert len(oracle.greedy(random_prompt(70, seed=1), 3)) == 3
