"""The benchmark harness's engine-free parts: plan and estimate, resume from JSON lines,
per-cell figures from traces, summary and ratios, targets, Markdown, plot, profile parsing."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mesa_vllm.bench import metrics, summary
from mesa_vllm.bench.config import (
    BenchConfig, ModelShape, parse_duration, parse_length, parse_lengths, parse_reps_at,
    prompt_seed)
from mesa_vllm.bench.plan import (
    CostModel, build_groups, dense_pairs, format_plan, mesa_pairs)
from mesa_vllm.bench.profile import parse_collapsed, top_frames
from mesa_vllm.bench.store import BenchStore, append_rows
from mesa_vllm.rule import MesaGeometry, relative_positions

pytestmark = pytest.mark.cpu

SHAPE = ModelShape()  # SmolLM2-135M: 30 layers, 3 KV heads, head size 64, T = 8192


# --------------------------------------------------------------------------------------
# config
def test_parsers():
    assert parse_length("16k") == 16384
    assert parse_length("2048") == 2048
    assert parse_length("1.5k") == 1536
    assert parse_lengths("64k, 8k,8192,16k") == [8192, 16384, 65536]
    assert parse_reps_at("32k=2,64k=1") == {32768: 2, 65536: 1}
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90m") == 5400
    assert parse_duration("45") == 45
    assert parse_duration(None) is None
    for bad in ("abc", "1.3", "0"):
        with pytest.raises(ValueError):
            parse_length(bad)
    with pytest.raises(ValueError):
        parse_duration("8 hours")
    with pytest.raises(ValueError):
        parse_reps_at("64k")


def test_mesa_overrides_parsed_or_refused_without_traceback():
    from mesa_vllm.bench.cli import _parse_mesa

    assert _parse_mesa("R=2048, E=6,log_n=false,stair=linear") == {
        "R": 2048, "E": 6, "log_n": False, "stair": "linear"}
    assert _parse_mesa("") == {}
    for bad, named in (('{"R": 3074}', "unknown mesa parameter"), ("R=big", "R")):
        with pytest.raises(SystemExit) as refused:
            _parse_mesa(bad)
        message = str(refused.value)
        assert named in message and "NAME=VALUE" in message


def test_config_derived_values():
    config = BenchConfig(lengths=(8192, 65536), decode_tokens=64, max_num_batched_tokens=8192,
                         oracle_lengths=(512,))
    assert config.max_tokens(8192, 1) == 65
    # the batch's first request decodes while the 3 others prefill (8 chunks each at 64k)
    assert config.max_tokens(65536, 4) == 65 + 3 * 9 + 2
    assert config.resolved_max_model_len() % 256 == 0
    assert config.resolved_max_model_len() >= 65536 + config.max_tokens(65536, 4)
    # oracle-only lengths run the single request only
    assert config.vllm_lengths() == [512, 8192, 65536]
    assert config.scenarios_for(512) == ["single"]
    assert config.scenarios_for(8192) == ["single", "batch4"]
    # KV pool: mesa's 1.5x bytes per token for 4 x (64k + generated), whole GiB
    assert SHAPE.kv_bytes_per_token("default") == 23040
    assert SHAPE.kv_bytes_per_token("mesa") == 34560
    need = 4 * (65536 + config.max_tokens(65536, 4)) * 34560
    gib = config.resolved_kv_cache_gib(SHAPE)
    assert need <= gib * (1 << 30) < need * 1.05 + (2 << 30)


def test_config_fingerprint_and_roundtrip():
    a = BenchConfig(reps_at={65536: 1}, batch_lengths=(8192,))
    assert BenchConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    # what is measured changes the fingerprint, how many times does not
    assert a.fingerprint(SHAPE) == BenchConfig(reps=7, batch_lengths=(8192,)).fingerprint(SHAPE)
    assert a.fingerprint(SHAPE) != BenchConfig(max_num_batched_tokens=4096).fingerprint(SHAPE)
    assert a.fingerprint(SHAPE) != BenchConfig(compile=True).fingerprint(SHAPE)
    assert a.fingerprint(SHAPE) != BenchConfig(mesa={"E": 16}).fingerprint(SHAPE)
    # same prompts for both backends, distinct across repetitions and requests
    seeds = {prompt_seed(8192, r, i) for r in range(3) for i in range(4)}
    assert len(seeds) == 12


# --------------------------------------------------------------------------------------
# plan
@pytest.mark.parametrize("L", [40, 64, 65, 100, 157, 240])
def test_mesa_pairs_match_the_dense_rule(L):
    """The plan's count of attention pairs equals the visible pairs of the rule itself."""
    geometry = MesaGeometry(T=64, F=4, C=16, R=8, E=4)
    positions = torch.arange(L)
    _, visible = relative_positions(geometry, L, positions, positions)
    assert mesa_pairs(L, geometry) == int(visible.sum())
    assert mesa_pairs(L, None) == dense_pairs(L) == L * (L + 1) // 2


def test_mesa_pairs_are_linear_past_T():
    geometry = MesaGeometry(T=8192, F=130, C=2048, R=1030, E=10)
    p32, p64 = mesa_pairs(32768, geometry), mesa_pairs(65536, geometry)
    assert p64 / p32 < 2.3  # linear in L (the stair rows see all keys: R * L)
    assert dense_pairs(65536) / p64 > 5


def test_groups_order_done_and_budget():
    config = BenchConfig(lengths=(8192, 16384), reps=2, reps_at={16384: 1},
                         oracle_lengths=(512,), oracle_reps=1)
    groups = build_groups(config, done=set())
    names = [g.name for g in groups]
    assert names == ["mesa@512", "default@512", "mesa@8k", "default@8k", "mesa@16k",
                     "default@16k", "oracle@512"]
    by_name = {g.name: g for g in groups}
    assert by_name["mesa@8k"].cells == [("single", 0), ("batch4", 0), ("single", 1),
                                        ("batch4", 1)]
    assert by_name["mesa@16k"].cells == [("single", 0), ("batch4", 0)]
    assert by_name["mesa@512"].cells == [("single", 0), ("single", 1)]

    done = {("mesa", "single", 8192, 0), ("mesa", "batch4", 8192, 0), ("oracle", "single", 512, 0)}
    groups = build_groups(config, done=done)
    by_name = {g.name: g for g in groups}
    assert by_name["mesa@8k"].cells == [("single", 1), ("batch4", 1)]
    assert by_name["mesa@8k"].done == 2
    assert by_name["oracle@512"].cells == []

    geometry = MesaGeometry(T=8192, F=130, C=2048, R=1030, E=10)
    cost = CostModel()
    unlimited = build_groups(config, set(), cost, SHAPE, geometry)
    assert all(g.fits and g.estimate_s > 0 for g in unlimited)
    # the default backend costs more than mesa past T (quadratic vs linear attention)
    est = {g.name: g.estimate_s for g in unlimited}
    assert est["default@16k"] > est["mesa@16k"]
    budget = sum(g.estimate_s for g in unlimited[:4]) + 1
    limited = build_groups(config, set(), cost, SHAPE, geometry, budget_s=budget)
    assert [g.fits for g in limited[:5]] == [True, True, True, True, False]
    text = format_plan(limited, budget, cost)
    assert "over budget" in text and "estimated run time" in text


def test_cost_model_calibration():
    cost = CostModel()
    rows = [
        {"backend": "mesa", "wall_s": 30.0, "estimate_s": 10.0},
        {"backend": "mesa", "wall_s": 10.0, "estimate_s": 10.0},
        {"backend": "default", "wall_s": 5.0, "estimate_s": 10.0},
        {"backend": "default", "wall_s": 99.0, "estimate_s": 1.0, "error": "boom"},
    ]
    scaled = cost.calibrated(rows)
    assert scaled.scale["mesa"] == pytest.approx(2.0)
    assert scaled.scale["default"] == pytest.approx(0.5)
    assert scaled.scale["oracle"] == pytest.approx(1.25)  # mean of the measured ones
    assert cost.calibrated([]).scale == cost.scale


# --------------------------------------------------------------------------------------
# store / resume
def _row(backend, scenario, length, rep, fp="fp", **extra):
    return {"type": "cell", "backend": backend, "scenario": scenario, "length": length,
            "rep": rep, "fingerprint": fp, **extra}


def test_store_resume(tmp_path):
    path = tmp_path / "r.jsonl"
    store = BenchStore(path)
    append_rows(path, [_row("mesa", "single", 8192, 0, prefill_s=1.0),
                       _row("mesa", "single", 8192, 1, error="engine died"),
                       _row("default", "single", 8192, 0, fp="other"),
                       _row("oracle", "single", 512, 0, fp="ofp"),
                       {"type": "engine", "backend": "mesa", "fingerprint": "fp", "kv": {}}])
    with path.open("a") as f:
        f.write('{"type": "cell", "backend": "mesa", "sce')  # killed mid-line
    append_rows(path, [_row("mesa", "batch4", 8192, 0, prefill_s=2.0)])
    fps = {"vllm": "fp", "oracle": "ofp"}
    done = store.done_keys(fps)
    assert done == {("mesa", "single", 8192, 0), ("mesa", "batch4", 8192, 0),
                    ("oracle", "single", 512, 0)}
    assert len(store.engine_rows(fps)) == 1
    # the last row of a key wins: a retry that succeeds replaces the error
    append_rows(path, [_row("mesa", "single", 8192, 1, prefill_s=1.5)])
    assert ("mesa", "single", 8192, 1) in store.done_keys(fps)
    config = BenchConfig(lengths=(8192,), reps=2, backends=("mesa",), oracle_lengths=())
    groups = build_groups(config, store.done_keys(fps))
    assert groups[0].cells == [("batch4", 1)]


# --------------------------------------------------------------------------------------
# figures from traces
def test_cell_metrics_single():
    trace = {"t_submit": 100.0, "t_end": 112.5,
             "requests": {"0": {"queued_ts": 100.01, "scheduled_ts": 100.02, "prompt_len": 8000}},
             "tokens": {"0": [110.02, 110.52, 111.02, 111.52, 112.02]}}
    m = metrics.cell_metrics(trace)
    assert m["prefill_s"] == pytest.approx(10.0)
    assert m["prefill_tok_s"] == pytest.approx(800.0)
    assert m["ttft_s"] == pytest.approx(10.02)
    assert m["decode_tokens"] == 4
    assert m["decode_tok_s"] == pytest.approx(2.0)
    assert m["decode_step_ms"] == pytest.approx(500.0)
    assert m["wall_s"] == pytest.approx(12.5)


def test_cell_metrics_batch_window():
    """Decode counts only the window in which all requests decode together."""
    # (vLLM leaves an unset timestamp at 0.0, so real ones here start at 100)
    trace = {"t_submit": 100.0,
             "requests": {"a": {"scheduled_ts": 100.0, "prompt_len": 100},
                          "b": {"scheduled_ts": 101.0, "prompt_len": 100}},
             # a decodes alone while b prefills (steps at 1.5, 2.0), then both at 3, 4, 5
             "tokens": {"a": [101.0, 101.5, 102.0, 103.0, 104.0, 105.0],
                        "b": [102.0, 103.0, 104.0, 105.0, 106.0]}}
    m = metrics.cell_metrics(trace)
    assert m["prefill_s"] == pytest.approx(2.0)  # until the last first token
    assert m["prefill_tok_s"] == pytest.approx(100.0)
    assert m["ttft_s"] == pytest.approx(2.0) and m["ttft_median_s"] == pytest.approx(1.5)
    # window (2, 5]: a at 3, 4, 5 and b at 3, 4, 5
    assert m["decode_tokens"] == 6
    assert m["decode_tok_s"] == pytest.approx(2.0)
    assert m["decode_step_ms"] == pytest.approx(1000.0)


def test_cell_metrics_no_decode_window_and_missing_tokens():
    one = {"t_submit": 0.0, "requests": {"0": {"scheduled_ts": 0.0, "prompt_len": 10}},
           "tokens": {"0": [1.0]}}
    m = metrics.cell_metrics(one)
    assert m["decode_tok_s"] is None and m["prefill_s"] == 1.0
    none = {"t_submit": 0.0, "requests": {"0": {}}, "tokens": {"0": []}}
    assert "error" in metrics.cell_metrics(none)


# --------------------------------------------------------------------------------------
# summary
def _cells():
    rows = []
    for rep, (mp, dp) in enumerate([(10.0, 20.0), (12.0, 22.0), (11.0, 30.0)]):
        rows.append(_row("mesa", "single", 32768, rep, prefill_s=mp, prefill_tok_s=32768 / mp,
                         decode_tok_s=20.0, peak_rss=5e9, kv_bytes_per_token=34560))
        rows.append(_row("default", "single", 32768, rep, prefill_s=dp, prefill_tok_s=32768 / dp,
                         decode_tok_s=25.0, peak_rss=4e9, kv_bytes_per_token=23040))
    rows.append(_row("mesa", "single", 65536, 0, prefill_s=23.0, prefill_tok_s=65536 / 23.0))
    rows.append(_row("default", "single", 65536, 0, prefill_s=80.0, prefill_tok_s=65536 / 80.0))
    rows.append(_row("mesa", "single", 65536, 1, error="oom"))
    return rows


def test_summary_stats_ratios_targets_markdown(tmp_path):
    rows = _cells()
    agg = summary.aggregate(rows)
    s = agg[("mesa", "single", 32768)]["prefill_s"]
    assert (s["min"], s["median"], s["max"], s["best"], s["n"]) == (10.0, 11.0, 12.0, 10.0, 3)
    rate = agg[("mesa", "single", 32768)]["prefill_tok_s"]
    assert rate["best"] == rate["max"]
    assert agg[("mesa", "single", 65536)]["reps"] == 1  # the error row is left out

    r = summary.ratios(agg, "single", 32768, "prefill_tok_s")
    assert r["median"] == pytest.approx((32768 / 11.0) / (32768 / 22.0))
    assert r["best"] == pytest.approx((32768 / 10.0) / (32768 / 20.0))

    targets = {t["name"]: t for t in summary.evaluate_targets(agg)}
    assert targets["prefill_32k"]["status"] == "met"  # 2.0x
    assert targets["prefill_64k"]["status"] == "met"  # 80/23 = 3.5x
    assert targets["linear_prefill"]["value"] == pytest.approx(23.0 / 11.0)
    assert targets["linear_prefill"]["status"] == "met"
    assert targets["decode_32k"]["value"] == pytest.approx(0.8)
    assert targets["decode_32k"]["status"] == "MISSED"
    assert targets["kv_per_token"]["value"] == pytest.approx(1.5)
    assert targets["kv_per_token"]["status"] == "met"
    assert targets["memory_64k"]["status"] == "not measured"

    full = summary.build_summary(rows, [], {"engine": {"max_model_len": 65792}})
    text = summary.markdown(full, command="mesa-vllm bench --lengths 32k,64k")
    assert "mesa-vllm bench --lengths 32k,64k" in text
    assert "| 32k | 3/3 |" in text
    assert "MISSED" in text
    failed = [line for line in text.splitlines() if line.startswith("- mesa@64k single rep")]
    assert len(failed) == 1 and "error" not in full["table"][0]  # listed, not averaged in
    json.dumps(full)  # serialisable

    from mesa_vllm.bench.plot import plot

    out = plot(full, tmp_path / "p.png", title="test")
    assert out.stat().st_size > 1000


def test_report_without_the_run_flags_uses_the_last_run(tmp_path):
    """``mesa-vllm bench --report`` alone derives other settings (another KV size) than the
    run's flags did; it reports the last run's rows instead of an empty table."""
    from mesa_vllm.bench import runner

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "max_position_embeddings": 8192, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "hidden_size": 576}))
    paths = runner.Paths(tmp_path / "out", "perf")
    paths.out_dir.mkdir()
    engine = {"max_model_len": 65792, "kv_cache_gib": 3}
    append_rows(paths.results, [_row("mesa", "single", 65536, 0, fp="old", engine=engine,
                                     prefill_s=20.0, prefill_tok_s=65536 / 20.0)]
                + [dict(r, fingerprint="run", engine=engine) for r in _cells()])
    report = runner.report(BenchConfig(), paths, str(model))
    assert report["meta"]["fingerprints"]["vllm"] == "run"
    assert report["meta"]["engine"] == engine
    assert "| 32k | 3/3 |" in paths.markdown.read_text()
    # with flags whose rows are stored, those rows are reported, not the last run's
    mine = BenchConfig()
    append_rows(paths.results, [_row("mesa", "single", 8192, 0, fp=mine.fingerprint(SHAPE),
                                     prefill_s=4.0, prefill_tok_s=8192 / 4.0)])
    report = runner.report(mine, paths, str(model))
    assert report["meta"]["fingerprints"]["vllm"] == mine.fingerprint(SHAPE)
    assert "| 32k |" not in paths.markdown.read_text()


# --------------------------------------------------------------------------------------
# profile parsing
def test_pyspy_collapsed_summary():
    raw = "\n".join([
        "main (run.py:1);step (engine.py:10);forward (backend.py:50) 30",
        "main (run.py:1);step (engine.py:10);forward (backend.py:51) 10",
        "main (run.py:1);step (engine.py:12) 60",
        "garbage line",
    ])
    stacks = parse_collapsed(raw)
    assert len(stacks) == 3
    top = top_frames(stacks, "function")
    assert top["samples"] == 100
    self_ = {e["frame"]: e["percent"] for e in top["self"]}
    assert self_["forward (backend.py)"] == pytest.approx(40.0)
    assert self_["step (engine.py)"] == pytest.approx(60.0)
    incl = {e["frame"]: e["percent"] for e in top["inclusive"]}
    assert incl["main (run.py)"] == pytest.approx(100.0)
    by_line = top_frames(stacks, "line")
    assert by_line["self"][0]["frame"] == "step (engine.py:12)"


def test_long_steps_timeout_raised_unless_set(monkeypatch):
    """vLLM's 300 s step limit killed default@64k; bench/eval engines raise it, a user's value wins."""
    from mesa_vllm.engine import LONG_STEP_TIMEOUT_S, allow_long_steps

    monkeypatch.delenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", raising=False)
    allow_long_steps()
    assert int(os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"]) == LONG_STEP_TIMEOUT_S > 300
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "900")
    allow_long_steps()
    assert os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "900"
