"""The orchestrating process: plan, launch one child per group, track progress, report.

This process never imports vLLM. Each group runs in a fresh child process
(``python -m mesa_vllm.bench.engine_run`` or ``... oracle_run``) in its own session, so its
engine's process tree (EngineCore, worker) and its memory belong to one backend, and an
interrupt here stops exactly that tree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mesa_vllm.bench.config import BenchConfig, ModelShape
from mesa_vllm.bench.plan import CostModel, build_groups, format_plan, format_seconds, geometry_for
from mesa_vllm.bench.store import BenchStore

# Lines of a child's output shown without --verbose.
_SHOW = ("[bench]", "Traceback", "Error", "error", "Killed")


@dataclass
class Paths:
    out_dir: Path
    name: str

    @property
    def results(self) -> Path:
        return self.out_dir / f"{self.name}.jsonl"

    @property
    def summary(self) -> Path:
        return self.out_dir / f"{self.name}.json"

    @property
    def markdown(self) -> Path:
        return self.out_dir / f"{self.name}.md"

    @property
    def png(self) -> Path:
        return self.out_dir / f"{self.name}.png"

    @property
    def specs(self) -> Path:
        return self.out_dir / f".{self.name}.specs"


def model_shape(model: str) -> ModelShape:
    return ModelShape.from_config(json.loads((Path(model) / "config.json").read_text()))


def fingerprints(config: BenchConfig, shape: ModelShape) -> dict[str, str]:
    return {"vllm": config.fingerprint(shape), "oracle": config.oracle_fingerprint(shape)}


def plan(config: BenchConfig, paths: Paths, shape: ModelShape, budget_s: float | None,
         include_oracle: bool = True, cost: CostModel | None = None):
    store = BenchStore(paths.results)
    fps = fingerprints(config, shape)
    cost = (cost or CostModel()).calibrated(store.cell_rows(fps))
    geometry = geometry_for(config, shape)
    groups = build_groups(config, store.done_keys(fps), cost, shape, geometry, budget_s,
                          include_oracle=include_oracle)
    return groups, cost, geometry


def _pump(stream, verbose: bool, write) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip()
        if verbose or any(tag in line for tag in _SHOW):
            write(line)


def _stop_tree(proc: subprocess.Popen) -> None:
    """Stop the child's session (the child and the engine processes it started)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(config: BenchConfig, paths: Paths, model: str, *, budget_s: float | None = None,
        include_oracle: bool = True, verbose: bool = False, command: str | None = None) -> int:
    from tqdm import tqdm

    shape = model_shape(model)
    groups, cost, geometry = plan(config, paths, shape, budget_s, include_oracle)
    print(format_plan(groups, budget_s, cost), flush=True)
    todo = [g for g in groups if g.cells and g.fits]
    fps = fingerprints(config, shape)
    store = BenchStore(paths.results)
    run_id = uuid.uuid4().hex[:8]
    deadline = time.time() + budget_s if budget_s else None
    paths.specs.mkdir(parents=True, exist_ok=True)
    status = 0
    total = sum(g.estimate_s for g in todo)
    # Without a terminal the bar would flood the log: the [bench] lines carry the progress.
    bar = tqdm(total=round(total), unit="s", desc="bench (estimated seconds of work)",
               dynamic_ncols=True, smoothing=0.0, mininterval=2.0,
               disable=not sys.stderr.isatty())
    try:
        for group in todo:
            cost = CostModel().calibrated(store.cell_rows(fps))
            scale = cost.scale.get(group.backend, 1.0)
            estimate = (cost.startup_seconds(group.backend, config, geometry)
                        + sum(group.cell_estimates.values())) * scale
            if deadline is not None and time.time() + \
                    sum(group.cell_estimates.values()) * scale / len(group.cells) > deadline:
                bar.write(f"[bench] {group.name}: skipped, not even one cell fits the budget")
                bar.update(round(group.estimate_s))
                continue
            spec = {
                "config": config.to_dict(), "shape": shape.__dict__, "model": model,
                "backend": group.backend, "length": group.length,
                "cells": [[s, r, group.cell_estimates[(s, r)]] for s, r in group.cells],
                "results": str(paths.results), "deadline": deadline, "scale": scale,
                "fingerprint": fps["oracle" if group.backend == "oracle" else "vllm"],
                "run_id": run_id, "verbose": verbose,
            }
            spec_path = paths.specs / f"{group.backend}-{group.length}.json"
            spec_path.write_text(json.dumps(spec, indent=1))
            module = "oracle_run" if group.backend == "oracle" else "engine_run"
            left = sum(g.estimate_s for g in todo[todo.index(group):])
            bar.write(f"[bench] {time.strftime('%H:%M:%S')} {group.name}: {len(group.cells)} "
                      f"cells, estimated {format_seconds(estimate)}; about "
                      f"{format_seconds(left)} of the run left")
            proc = subprocess.Popen(
                [sys.executable, "-m", f"mesa_vllm.bench.{module}", str(spec_path)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            pump = threading.Thread(target=_pump, args=(proc.stdout, verbose, bar.write),
                                    daemon=True)
            pump.start()
            credited = 0.0
            started = time.monotonic()
            try:
                while proc.poll() is None:
                    time.sleep(2.0)
                    # progress: startup first, then each finished cell's estimate
                    finished = [r for r in store.cell_rows(fps) if r.get("run_id") == run_id
                                and r.get("backend") == group.backend
                                and int(r.get("length", -1)) == group.length]
                    target = min(group.estimate_s,
                                 sum(float(r.get("estimate_s") or 0) * scale for r in finished)
                                 + min(time.monotonic() - started,
                                       cost.startup_seconds(group.backend, config, geometry)
                                       * scale))
                    if target > credited:
                        bar.update(round(target - credited))
                        credited = round(target)
                    if deadline is not None and time.time() > deadline + max(900, 0.5 * estimate):
                        bar.write(f"[bench] {group.name}: far past the time budget; stopping it")
                        _stop_tree(proc)
            except KeyboardInterrupt:
                _stop_tree(proc)
                raise
            pump.join(timeout=5)
            bar.update(max(0, round(group.estimate_s - credited)))
            if proc.returncode:
                status = 1
                bar.write(f"[bench] {group.name}: child exited with {proc.returncode}")
    except KeyboardInterrupt:
        bar.write("[bench] interrupted; finished cells are kept, run again to resume")
        status = 130
    finally:
        bar.close()
    report(config, paths, model, command=command)
    return status


def report(config: BenchConfig, paths: Paths, model: str, command: str | None = None) -> dict:
    """Summary JSON, Markdown table and PNG from the results file (this run's settings)."""
    from mesa_vllm.bench.summary import build_summary, markdown

    shape = model_shape(model)
    store = BenchStore(paths.results)
    fps = fingerprints(config, shape)
    rows = store.cell_rows(fps)
    engine_settings = config.engine_settings(shape)
    if not rows and store.latest_fingerprints():
        # No row has these flags' settings (``--report`` alone derives a default workload, and
        # with it another KV size): report the last run's settings instead of an empty table.
        fps = {**fps, **store.latest_fingerprints()}
        rows = store.cell_rows(fps)
        print(f"[bench] no rows in {paths.results} match these flags' settings; reporting the "
              f"last run's (fingerprint {fps['vllm']})", flush=True)
        recorded = next((r.get("engine") for r in reversed(rows) if r.get("engine")), None)
        engine_settings = recorded or engine_settings
    engine_rows = store.engine_rows(fps)
    geometry = next((r.get("mesa_geometry") for r in engine_rows
                     if r.get("backend") == "mesa" and r.get("mesa_geometry")), None)
    loads = [max(r.get("loadavg_after") or [0]) for r in rows]
    note = None
    if loads and max(loads) > (os.cpu_count() or 1) * 1.5:
        note = (f"**Warning:** load average reached {max(loads):.1f} on {os.cpu_count()} CPUs "
                "during this run: timings are unreliable (other work competed for the cores).")
    meta = {
        "name": paths.name, "model": Path(model).name, "config": config.to_dict(),
        "engine": engine_settings, "mesa_geometry": geometry,
        "fingerprints": fps, "command": command, "note": note,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "cells": len(rows),
    }
    summary = build_summary(rows, engine_rows, meta)
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    paths.summary.write_text(json.dumps(summary, indent=1, sort_keys=True))
    paths.markdown.write_text(markdown(summary, command))
    if rows:
        try:
            from mesa_vllm.bench.plot import plot

            plot(summary, paths.png, title=f"mesa vs default, {Path(model).name}, "
                 f"{os.cpu_count()} CPUs" + (" (under load)" if note else ""))
        except Exception as error:  # matplotlib missing or a degenerate run
            print(f"[bench] no plot: {error!r}", file=sys.stderr)
    print(f"[bench] wrote {paths.summary}, {paths.markdown}"
          + (f", {paths.png}" if rows else ""), flush=True)
    return summary
