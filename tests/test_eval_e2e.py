"""``mesa-vllm eval`` end to end on real vLLM engines (embedded SmolLM2, T = 8192).

Slow (three engine starts): opt in with ``-m slow``. At a length that fits ``T``, mesa leaves
the prompts untouched, so its outputs must equal origin's token for token; yarn/ntk at that
length share origin's engine (factor 1); a second run resumes with nothing left to do.
"""

from __future__ import annotations

import pytest

from mesa_vllm.evaluation.grid import Grid
from mesa_vllm.evaluation.harness import RunOptions, Runner
from mesa_vllm.evaluation.report import write_report
from mesa_vllm.evaluation.store import read_rows

pytestmark = [pytest.mark.cpu, pytest.mark.e2e, pytest.mark.slow]


def test_offline_grid_mesa_equals_origin_within_T(tmp_path, smollm2_dir):
    grid = Grid.from_options(tasks=["passkey", "niah_multikey"],
                             methods=["origin", "yarn", "mesa"], lengths=["2k"], samples=3)
    options = RunOptions(out_dir=tmp_path, model=str(smollm2_dir), progress=False,
                         kv_cache_gib=1.0, log=lambda *_: None)
    runner = Runner(grid, options)
    assert len(runner.plan.groups) == 2  # origin+yarn share one engine, mesa has its own
    stats = runner.run()
    assert stats["stopped"] is None and stats["engines"] == 2
    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 2 * 3 * 3
    by = {(r["task"], r["method"], r["index"]): r for r in rows}
    for (task, method, index), row in by.items():
        assert row["num_tokens"] <= 2048 - 24 and not row.get("error")
        assert row["output"] == by[(task, "origin", index)]["output"], (task, method, index)
    # The small model finds a passkey in 2k tokens.
    assert sum(by[("passkey", "origin", i)]["score"] for i in range(3)) >= 2
    assert Runner(grid, options).run()["samples"] == 0
    written = write_report(tmp_path)
    assert written["accuracy"].is_file()
