"""The evaluation harness without vLLM: grid, methods -> engine settings, plan, results store,
resume, report and plots, and the endpoint mode end to end against a small fake
OpenAI-compatible server (an "oracle" that reads the needle out of the prompt)."""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mesa_vllm.evaluation import report
from mesa_vllm.evaluation.cli import _split, parse_duration
from mesa_vllm.evaluation.cost import CostModel
from mesa_vllm.evaluation.grid import (
    PRESETS,
    Grid,
    depth_for,
    format_length,
    parse_length,
    parse_samples,
)
from mesa_vllm.evaluation.harness import ModelFacts, RunOptions, Runner, format_plan, make_plan
from mesa_vllm.evaluation.methods import MethodError, engine_config, parse_method
from mesa_vllm.evaluation.store import ResultStore, prompt_sha, read_rows

pytestmark = pytest.mark.cpu

T = 8192
ROPE = {"rope_theta": 100000.0, "rope_type": "default"}


# ---------------------------------------------------------------------------------------------
# Grid and parsing
def test_parse_length_samples_duration_split():
    assert parse_length("16k") == 16384 and parse_length("12288") == 12288
    assert parse_length(" 2K ") == 2048 and format_length(65536) == "64k"
    with pytest.raises(ValueError):
        parse_length("abc")
    assert parse_samples("20") == {"*": 20}
    assert parse_samples("passkey=20, ppl=6") == {"passkey": 20, "ppl": 6}
    with pytest.raises(ValueError, match="unknown task"):
        parse_samples("nope=3")
    assert parse_duration("3h") == 10800 and parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90 and parse_duration(None) is None
    assert _split(["mesa:E=4,R=512,origin", "yarn:factor=4,ntk"]) == [
        "mesa:E=4,R=512", "origin", "yarn:factor=4", "ntk"]
    assert _split(["2k,4k", "8k"]) == ["2k", "4k", "8k"]


def test_depths_spread_and_independent_of_sample_count():
    depths = [depth_for("passkey", 0, i) for i in range(20)]
    assert all(0.0 <= d < 1.0 for d in depths)
    # Any prefix of 5 covers the five fifths of [0, 1) at least 4 times out of 5.
    assert len({int(d * 5) for d in depths[:5]}) >= 4
    assert len({int(d * 20) for d in depths}) >= 15
    assert depth_for("passkey", 0, 7) == depths[7]
    assert depth_for("passkey", 1, 7) != depths[7]
    assert depth_for("niah_single", 0, 7) != depths[7]


def test_presets_are_valid():
    for name in PRESETS:
        grid = Grid.from_options(preset=name)
        assert grid.cells()
    issue4 = Grid.from_options(preset="issue4")
    assert issue4.lengths == [2048, 4096, 8192, 16384, 32768, 65536]
    assert [m.label for m in issue4.methods] == ["origin", "yarn", "ntk", "mesa"]
    assert issue4.samples_for("passkey") >= 20 and issue4.samples_for("niah_multikey") >= 20
    capped = Grid.from_options(preset="issue4", max_samples_per_cell=3)
    assert capped.samples_for("passkey") == 3
    with pytest.raises(ValueError, match="listed twice"):
        Grid.from_options(methods=["mesa", "mesa"])


def test_every_sweep_point_runs_somewhere():
    """A sweep variant that the rule refuses at every length would silently measure nothing."""
    from mesa_vllm.params import MesaConfigError, resolve_geometry

    sweep = Grid.from_options(preset="sweep")
    for method in sweep.methods:
        feasible = []
        for length in sweep.lengths:
            try:
                resolve_geometry(T, length, method.param_dict)
                feasible.append(length)
            except MesaConfigError:
                pass
        assert feasible, f"{method.label} is refused at every length of the sweep"


# ---------------------------------------------------------------------------------------------
# Methods -> engines
def test_parse_method():
    m = parse_method("mesa:e=4, R=512,log_n=false")
    assert m.label == "mesa:E=4,R=512,log_n=false" and m.kind == "mesa"
    assert m.param_dict == {"E": 4, "R": 512, "log_n": False} and m.is_variant
    assert parse_method("yarn:factor=4").param_dict == {"factor": 4}
    assert not parse_method("origin").is_variant
    assert parse_method("mesa:stair=Linear").param_dict == {"stair": "linear"}
    for bad in ("rope", "mesa:X=1", "origin:factor=2", "yarn:factor", "mesa:stair=ramp", "mesa:E=x"):
        with pytest.raises(MethodError):
            parse_method(bad)


def test_engine_configs():
    origin_short = engine_config(parse_method("origin"), 4096, T, ROPE)
    assert origin_short.llm_kwargs == {} and origin_short.max_model_len == 4096
    origin_long = engine_config(parse_method("origin"), 32768, T, ROPE)
    assert origin_long.llm_kwargs == {"hf_overrides": {"max_position_embeddings": 32768}}
    # yarn / ntk: factor matched to the length; the origin engine at L <= T.
    for kind in ("yarn", "ntk"):
        short = engine_config(parse_method(kind), 8192, T, ROPE)
        assert short.key == engine_config(parse_method("origin"), 8192, T, ROPE).key
        assert short.info["same_as"] == "origin"
    yarn = engine_config(parse_method("yarn"), 32768, T, ROPE)
    rope = yarn.llm_kwargs["hf_overrides"]["rope_parameters"]
    assert rope == {"rope_theta": 100000.0, "rope_type": "yarn", "factor": 4.0,
                    "original_max_position_embeddings": T}
    assert yarn.llm_kwargs["hf_overrides"]["max_position_embeddings"] == 32768
    ntk = engine_config(parse_method("ntk"), 65536, T, ROPE)
    assert ntk.llm_kwargs["hf_overrides"]["rope_parameters"]["rope_type"] == "dynamic"
    assert ntk.llm_kwargs["hf_overrides"]["rope_parameters"]["factor"] == 8.0
    assert ntk.llm_kwargs["hf_overrides"]["rope_parameters"]["max_trained_positions"] == T
    assert ntk.llm_kwargs["hf_overrides"]["max_position_embeddings"] == 65536
    fixed = engine_config(parse_method("yarn:factor=4"), 4096, T, ROPE)
    assert fixed.llm_kwargs["hf_overrides"]["rope_parameters"]["factor"] == 4
    assert "serves at most" in engine_config(parse_method("yarn:factor=2"), 32768, T,
                                             ROPE).infeasible
    # mesa: the defaults for max_model_len = L; overrides through additional_config.
    mesa = engine_config(parse_method("mesa"), 16384, T, ROPE)
    assert mesa.llm_kwargs == {"attention_backend": "mesa"}
    assert mesa.info["mesa"]["E"] == 5  # default R = T/2: 4 * (8191 - 4096) < 16384 <= 5 * ...
    variant = engine_config(parse_method("mesa:E=8,R=512"), 32768, T, ROPE)
    assert variant.llm_kwargs["additional_config"] == {"mesa": {"E": 8, "R": 512}}
    assert variant.info["mesa"]["E"] == 8 and variant.key != mesa.key
    # A fixed engine length (a server's): E and the matched factors follow it, not the cell.
    served = engine_config(parse_method("mesa:max_len=64k"), 16384, T, ROPE)
    assert parse_method("mesa:max_len=65536").label == "mesa:max_len=64k"
    assert served.max_model_len == 65536 and served.info["max_model_len"] == 65536
    served_e = engine_config(parse_method("mesa"), 65536, T, ROPE).info["mesa"]["E"]
    assert served.info["mesa"]["E"] == served_e > mesa.info["mesa"]["E"]
    assert engine_config(parse_method("yarn:max_len=32k"), 16384, T, ROPE).info["factor"] == 4.0
    assert "shorter than" in engine_config(parse_method("origin:max_len=8k"), 16384, T,
                                           ROPE).infeasible
    too_fine = engine_config(parse_method("mesa:E=4"), 32768, T, ROPE)
    assert too_fine.infeasible and "E * (T - 1 - R)" in too_fine.infeasible


# ---------------------------------------------------------------------------------------------
# Store, plan, cost
def _row(task="passkey", method="mesa", length=4096, index=0, score=1.0, **extra):
    row = {"task": task, "method": method, "kind": method.split(":")[0], "length": length,
           "index": index, "seed": index, "score": score, "prompt_sha": "x", "backend": "vllm"}
    row.update(extra)
    return row


def test_store_resume_torn_line_errors_and_sha(tmp_path):
    store = ResultStore(tmp_path)
    store.append([_row(index=0), _row(index=1, error="boom", score=None)])
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"task": "passkey", "meth')  # a run killed mid-write
    again = ResultStore(tmp_path)
    assert again.done(("passkey", "mesa", 4096, 0))
    assert again.done(("passkey", "mesa", 4096, 0), "x")
    assert not again.done(("passkey", "mesa", 4096, 0), "other-prompt")
    assert not again.done(("passkey", "mesa", 4096, 1))  # errors are retried
    again.append([_row(index=1, score=0.0)])
    assert ResultStore(tmp_path).done(("passkey", "mesa", 4096, 1))
    assert len(read_rows(tmp_path / "results.jsonl")) == 3
    assert prompt_sha([1, 2, 3]) == prompt_sha([1, 2, 3]) != prompt_sha([1, 2, 4])


def test_plan_shares_engines_and_counts_done(tmp_path):
    grid = Grid.from_options(tasks=["passkey"], methods=["origin", "yarn", "mesa", "mesa:E=4"],
                             lengths=["4k", "32k"], samples=3)
    store = ResultStore(tmp_path)
    store.append([_row(method="origin", length=4096, index=i) for i in range(2)])
    facts = ModelFacts(T, ROPE, 23040)
    plan = make_plan(grid, store, facts, CostModel())
    cells = {(c.method.label, c.length): c for c in plan.cells}
    assert cells[("origin", 4096)].done == 2 and cells[("origin", 4096)].remaining == [2]
    # yarn shares the origin engine at 4k: sample 2 runs once for both, 0 and 1 for yarn only.
    per = cells[("origin", 4096)].est_seconds
    assert cells[("yarn", 4096)].est_seconds == pytest.approx(2 * per)
    assert cells[("mesa:E=4", 32768)].infeasible
    # Engines: origin@4k (+yarn), mesa@4k, mesa:E=4@4k, origin@32k, yarn@32k, mesa@32k.
    assert len(plan.groups) == 6
    assert [g.length for g in plan.groups] == sorted(g.length for g in plan.groups)
    shared = next(g for g in plan.groups if g.length == 4096 and g.kind == "dense")
    assert [m.label for m in shared.methods] == ["origin", "yarn"]
    assert [m.label for m in shared.items[("passkey", 2)]] == ["origin", "yarn"]
    assert [m.label for m in shared.items[("passkey", 0)]] == ["yarn"]
    text = format_plan(plan, grid, time_budget=3600)
    assert "infeasible" in text and "=origin" in text and "time budget" in text
    assert plan.total_seconds > 0


def test_rows_of_another_engine_are_stale(tmp_path):
    # "mesa" resolves to a geometry; rows made when a default gave another one are not done,
    # and the report counts only the newest engine of each cell.
    from mesa_vllm.evaluation.methods import engine_config, parse_method

    info = engine_config(parse_method("mesa"), 32768, T, ROPE).info
    old = {"mesa": {**info["mesa"], "R": info["mesa"]["R"] + 1}}
    store = ResultStore(tmp_path)
    store.append([_row(length=32768, index=i, engine=old, score=0.0, time="2026-01-01")
                  for i in range(3)])
    store.append([_row(length=32768, index=0, engine=info, score=1.0, time="2026-02-01")])
    grid = Grid.from_options(tasks=["passkey"], methods=["mesa"], lengths=["32k"], samples=3)
    cell = make_plan(grid, store, ModelFacts(T, ROPE, 23040), CostModel()).cells[0]
    assert cell.done == 1 and cell.remaining == [1, 2]
    # Rows from before the stair shape was recorded had the step stair.
    from mesa_vllm.evaluation.store import same_engine
    no_stair = {"mesa": {k: v for k, v in info["mesa"].items() if k != "stair"}}
    assert info["mesa"]["stair"] == "step" and same_engine({"engine": no_stair}, info)
    assert not same_engine({"engine": no_stair}, {"mesa": {**info["mesa"], "stair": "linear"}})
    assert store.done(("passkey", "mesa", 32768, 1))  # without an engine: any scored row
    assert not store.done(("passkey", "mesa", 32768, 1), engine=info)
    rows, runs, stale = report.load(tmp_path)
    assert [r["index"] for r in rows] == [0] and stale == {("passkey", "mesa", 32768): 2}
    # With T known, a cell holding only old rows is stale too (it is not "the newest engine").
    info16 = engine_config(parse_method("mesa"), 16384, T, ROPE).info
    store.append([_row(length=16384, index=0, engine={"mesa": {**info16["mesa"], "E": 99}})])
    store.append([_row(method="mesa:R=8", length=16384, index=0,
                       engine=engine_config(parse_method("mesa:R=8"), 16384, T, ROPE).info)])
    store.log_run({"trained_len": T})
    written = report.write_report(tmp_path, plots=False)
    md = written["md"].read_text()
    assert "| mesa |  | 1.00 (1) |" in md and "| mesa:R=8 | 1.00 (1) |  |" in md
    assert "passkey, mesa, 32k: 2 rows" in md and "passkey, mesa, 16k: 1 rows" in md


def test_identical_engines_reuse_rows(tmp_path, smollm2_dir):
    # "mesa:R=<default R>" resolves to the same engine as "mesa": its rows are copied for
    # "mesa" instead of run again; a sweep point with another window is not a twin.
    from mesa_vllm.evaluation.methods import engine_config, parse_method
    from mesa_vllm.params import DEFAULT_R_FRACTION

    T_model = 8192
    twin = f"mesa:R={int(T_model * DEFAULT_R_FRACTION)}"
    info = engine_config(parse_method(twin), 32768, T_model).info
    assert info == engine_config(parse_method("mesa"), 32768, T_model).info
    other = engine_config(parse_method("mesa:R=512"), 32768, T_model).info
    store = ResultStore(tmp_path)
    store.append([_row(method=twin, length=32768, index=0, engine=info, model=str(smollm2_dir)),
                  _row(method="mesa:R=512", length=32768, index=1, engine=other,
                       model=str(smollm2_dir))])
    grid = Grid.from_options(tasks=["passkey"], methods=["mesa"], lengths=["32k"], samples=2)
    shifted = Runner(grid, RunOptions(out_dir=tmp_path, model=str(smollm2_dir), seed=5,
                                      progress=False, log=lambda *_: None))
    assert shifted.plan.cells[0].done == 0  # other seeds: other prompts, no twin
    logs = []
    runner = Runner(grid, RunOptions(out_dir=tmp_path, model=str(smollm2_dir), progress=False,
                                     log=logs.append))
    cell = runner.plan.cells[0]
    assert cell.done == 1 and cell.remaining == [1]
    copied = runner.store.rows[("passkey", "mesa", 32768, 0)]
    assert copied["same_engine_as"] == twin and copied["score"] == 1.0
    assert any("reusing 1 samples" in line for line in logs)
    # Planning alone writes nothing; the copy is written when the run starts.
    assert len(read_rows(tmp_path / "results.jsonl")) == 2
    runner.plan.groups.clear()  # no engine to start here: only the copies are written
    runner.run()
    assert ResultStore(tmp_path).rows[("passkey", "mesa", 32768, 0)]["same_engine_as"] == twin


def test_cost_model_scales_and_calibrates():
    cost = CostModel()
    geometry = {"F": 128, "C": 2048, "R": 1024, "E": 8}
    dense = [cost.sample_seconds("dense", L, 16) for L in (8192, 16384, 32768)]
    mesa = [cost.sample_seconds("mesa", L, 16, geometry=geometry) for L in (16384, 32768)]
    assert dense[2] / dense[1] > 2.05  # quadratic attention shows
    assert mesa[1] / mesa[0] < 2.02  # mesa is linear
    assert cost.sample_seconds("dense", 8192, 16, cached=4096) < dense[0]
    rows = [_row(method="origin", kind="origin", length=8192, gen_tokens=16,
                 seconds=2 * cost.sample_seconds("dense", 8192, 16)),
            _row(method="mesa", length=16384, gen_tokens=16, engine={"mesa": geometry},
                 seconds=0.5 * cost.sample_seconds("mesa", 16384, 16, geometry=geometry))]
    tuned = cost.calibrated(rows)
    assert tuned.dense_scale == pytest.approx(2.0) and tuned.mesa_scale == pytest.approx(0.5)
    assert cost.calibrated([]).dense_scale == 1.0


# ---------------------------------------------------------------------------------------------
# Report
def _synthetic_results(tmp_path):
    store = ResultStore(tmp_path)
    rows = []
    for method, acc in (("origin", [1, 1, 1, 0]), ("mesa", [1, 1, 1, 1]),
                        ("mesa:E=8", [1, 1, 0, 0])):
        for L, a in zip((4096, 8192, 16384, 32768), acc):
            for i in range(4):
                score = float(a if i < 3 else 1 - a)
                rows.append(_row("passkey", method, L, i, score, depth=i / 4,
                                 output=str(score)))
                rows.append(_row("niah_multivalue", method, L, i, 0.25 * i, depth=i / 4,
                                 output=f"{0.25 * i}"))
            for i in range(2):
                nll = (1.0 if method != "origin" or L <= 8192 else 5.0)
                rows.append(_row("ppl", method, L, i, None, nll_sum=nll * (L - 1),
                                 n_scored=L - 1, tail_nll_sum=nll * 1024, tail_n=1024,
                                 bucket_size=1024, bucket_nll=[[b, nll * 1024, 1024]
                                                               for b in range(L // 1024)]))
    rows.append(_row("passkey", "yarn", 32768, 0, None, error="server down"))
    store.append(rows)
    store.log_run({"trained_len": T, "planned": [["passkey", "mesa", 32768, 6]],
                   "infeasible": [["passkey", "mesa:E=4", 32768, "stair too short"]]})
    return rows


def test_report_tables_and_plots(tmp_path):
    _synthetic_results(tmp_path)
    written = report.write_report(tmp_path)
    for name in ("csv", "md", "accuracy", "perplexity", "ppl_position", "sweep",
                 "depth_passkey"):
        assert written[name].is_file() and written[name].stat().st_size > 0, name
    for name in ("accuracy", "perplexity", "sweep"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows, runs, stale = report.load(tmp_path)
    assert stale == {}
    records = {(r["task"], r["method"], r["length"]): r for r in report.aggregate(rows, runs)}
    assert records[("passkey", "origin", 4096)]["mean"] == 0.75
    assert records[("passkey", "mesa", 32768)]["n"] == 4
    assert records[("passkey", "mesa", 32768)]["planned"] == 6
    assert records[("niah_multivalue", "mesa", 4096)]["mean"] == pytest.approx(0.375)
    assert records[("ppl", "origin", 32768)]["ppl"] == pytest.approx(math.exp(5.0))
    assert records[("ppl", "mesa", 32768)]["tail_ppl"] == pytest.approx(math.e)
    assert records[("passkey", "yarn", 32768)]["errors"] == 1
    assert records[("passkey", "mesa:E=4", 32768)]["infeasible"] == "stair too short"
    md = written["md"].read_text()
    assert "### passkey: accuracy" in md
    assert "| origin | 0.75 (4) | 0.75 (4) | 0.75 (4) | 0.25 (4) |" in md
    assert "| yarn |  |  |  | errors (1) |" in md
    assert "| mesa:E=4 |  |  |  | infeasible |" in md
    assert "0.75 (4/6)" in md  # fewer scored than planned is shown
    assert "### ppl: perplexity, whole window" in md and "infeasible" in md
    assert md.index("### passkey") < md.index("### niah_multivalue") < md.index("### ppl")
    assert "| mesa | 4k | 10 / 10 | 0.00% |" in md  # same outputs as origin within T
    assert "| mesa:E=8 | 8k | 10 / 10 |" in md and "| mesa:E=8 | 16k |" not in md
    csv_text = written["csv"].read_text().splitlines()
    assert csv_text[0].startswith("task,method,length,n,planned")


def test_accuracy_plot_keeps_each_method_colour_across_panels(tmp_path, monkeypatch):
    # origin has passkey points only; mesa must be drawn in the same colour in both panels,
    # not in the first free colour of the panel where origin is absent.
    records = [
        {"task": "passkey", "method": "origin", "length": 4096, "n": 4, "mean": 1.0},
        {"task": "passkey", "method": "mesa", "length": 4096, "n": 4, "mean": 1.0},
        {"task": "niah_multikey", "method": "mesa", "length": 32768, "n": 4, "mean": 0.5},
    ]
    figures = []
    plt = report._plt()
    monkeypatch.setattr(plt, "close", figures.append)
    assert report.plot_accuracy(records, tmp_path / "accuracy.png", trained_len=T)
    passkey_ax, multikey_ax = figures[0].axes[:2]
    # errorbar() labels its container; the container's first line is the data line
    colour = {ax.get_title(): {c.get_label(): c.lines[0].get_color() for c in ax.containers}
              for ax in (passkey_ax, multikey_ax)}
    assert colour["niah_multikey"]["mesa"] == colour["passkey"]["mesa"]
    assert colour["passkey"]["mesa"] != colour["passkey"]["origin"]


# ---------------------------------------------------------------------------------------------
# Endpoint mode against a fake OpenAI-compatible server
class _Oracle(BaseHTTPRequestHandler):
    tokenizer = None
    requests: list = []

    def log_message(self, *args):
        pass

    def _send(self, body, code=200):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        else:
            self._send({"error": "not found"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        if self.path != "/v1/completions" or body.get("model") != "fake-model":
            return self._send({"error": {"message": "bad request"}}, 400)
        prompt = body["prompt"]
        n = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        if body.get("echo"):
            return self._send({"choices": [{"text": "x", "logprobs": {
                "token_logprobs": [None] + [-1.0] * (n - 1) + [-0.1]}}],
                "usage": {"prompt_tokens": n, "completion_tokens": 1}})
        text = self.tokenizer.decode(prompt) if isinstance(prompt, list) else prompt
        if "pass key" in text:
            answer = re.search(r"The pass key is (\d+)\.", text).group(1)
        else:
            key = re.search(r"magic number for (\S+) mentioned", text).group(1)
            answer = re.search(rf"for {re.escape(key)} is: (\d+)\.", text).group(1)
        self._send({"choices": [{"text": f" {answer}.", "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": n, "completion_tokens": 3,
                              "prompt_tokens_details": {"cached_tokens": 0}}})


@pytest.fixture
def fake_server(smollm2_tokenizer):
    _Oracle.tokenizer = smollm2_tokenizer
    _Oracle.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Oracle)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_endpoint_run_resume_and_report(tmp_path, fake_server, smollm2_dir, monkeypatch):
    from mesa_vllm.evaluation.methods import Method
    from mesa_vllm.tasks import perplexity

    # Small stand-in novels for the perplexity task (the real text is tested elsewhere).
    monkeypatch.setattr(perplexity, "MAX_WINDOW", 2048)
    monkeypatch.setattr(perplexity, "tokenized_novels", lambda tok: {
        n: list(range(100, 2600 + i)) for i, n in enumerate(perplexity.NOVELS)})
    grid = Grid(["passkey", "niah_single", "ppl"], [Method("served", "endpoint")],
                [1024, 2048], {"*": 3, "ppl": 2})
    options = RunOptions(out_dir=tmp_path, model=str(smollm2_dir), progress=False,
                         endpoint={"url": fake_server, "label": "served", "concurrency": 3},
                         engine_kwargs={"max_num_seqs": 4}, log=lambda *_: None)
    runner = Runner(grid, options)
    assert "served" in format_plan(runner.plan, grid)
    stats = runner.run()
    assert stats["samples"] == 2 * (3 + 3 + 2) and stats["stopped"] is None
    header = read_rows(tmp_path / "runs.jsonl")[0]  # what made the rows is on record
    assert header["engine_args"] == {"max_num_seqs": 4} and header["endpoint"]["label"] == "served"
    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 16 and all(r["backend"] == "endpoint" for r in rows)
    assert all(r["model"] == "fake-model" for r in rows)
    gen = [r for r in rows if r["task"] != "ppl"]
    assert all(r["score"] == 1.0 for r in gen), [r["output"] for r in gen]
    ppl = [r for r in rows if r["task"] == "ppl"]
    assert all(r["ppl"] == pytest.approx(math.e) for r in ppl)
    assert {r["n_scored"] for r in ppl} == {1022, 2046}  # windows of L - 1 tokens
    # Prompts went out as token ids of the planned length.
    sent = [r for r in _Oracle.requests if not r.get("echo")]
    assert all(isinstance(r["prompt"], list) and len(r["prompt"]) <= 2048 for r in sent)
    # A second run finds everything done and sends nothing.
    before = len(_Oracle.requests)
    again = Runner(grid, options)
    assert all(not c.remaining for c in again.plan.cells)
    assert again.run()["samples"] == 0 and len(_Oracle.requests) == before
    written = report.write_report(tmp_path, T)
    assert "served" in written["md"].read_text()
    assert written["accuracy"].is_file() and written["perplexity"].is_file()


def test_endpoint_errors_are_recorded_and_retried(tmp_path, smollm2_dir):
    from mesa_vllm.evaluation.backends import EndpointError, normalise_base_url
    from mesa_vllm.evaluation.methods import Method

    assert normalise_base_url("http://h:1/") == "http://h:1/v1"
    assert normalise_base_url("http://h:1/v1/completions") == "http://h:1/v1"
    grid = Grid(["passkey"], [Method("served", "endpoint")], [1024], {"*": 1})
    options = RunOptions(out_dir=tmp_path, model=str(smollm2_dir), progress=False,
                         endpoint={"url": "http://127.0.0.1:9", "model": "m", "timeout": 2},
                         log=lambda *_: None)
    Runner(grid, options).run()
    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 1 and "cannot reach" in rows[0]["error"] and rows[0]["score"] is None
    assert Runner(grid, options).plan.cells[0].remaining == [0]  # retried next time
    with pytest.raises(EndpointError):
        from mesa_vllm.evaluation.backends import EndpointClient

        EndpointClient("http://127.0.0.1:9", timeout=2)  # no model given: /models unreachable


def test_caps_per_cell():
    grid = Grid.from_options(tasks=["passkey", "ppl"], methods=["origin", "yarn:factor=8", "mesa"],
                             lengths=["4k", "64k"], samples="passkey=20,ppl=6",
                             caps=["origin@64k=3,ppl@64k=2", "yarn@64k=5"])
    n = {(c.task, c.method.label, c.length): c.samples for c in grid.cells()}
    assert n[("passkey", "origin", 4096)] == 20 and n[("passkey", "origin", 65536)] == 3
    assert n[("ppl", "origin", 65536)] == 2 and n[("ppl", "mesa", 65536)] == 2
    assert n[("passkey", "yarn:factor=8", 65536)] == 5  # a kind matches its variants
    assert n[("passkey", "mesa", 65536)] == 20 and n[("ppl", "mesa", 4096)] == 6
    with pytest.raises(ValueError):
        Grid.from_options(caps=["origin@64k"])
