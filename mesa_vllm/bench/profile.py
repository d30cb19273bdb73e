"""``mesa-vllm bench --profile``: where one prefill and one decode window spend their time.

The engine runs **in-process** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
``distributed_executor_backend="uni"``) so that the model, the attention backend and the
scheduler all run in one Python thread that both tools can see:

- **py-spy** (``py-spy record -f raw --pid``) samples Python stacks; it is attached for the
  prefill phase and again for the decode phase only (the child waits for it at each phase), so
  engine start-up and warm-up are not in the profile. Summaries: top frames by self time (the
  innermost Python frame: the line that called into torch) and by inclusive time, per function.
- the **torch profiler** (``torch.profiler``, CPU activities) records every op in a second,
  identical prefill and decode window (fresh prompt): the top ops by self CPU time show what
  the time goes to (matmuls, copies, index/gather, masks, rotations).

Outputs in OUT: ``profile_<backend>_<len>.md`` (summary tables), ``profile_<backend>_<len>.json``
(timings and top entries), and the raw py-spy samples ``profile_<backend>_<len>_<phase>.pyspy``
(collapsed stacks, one ``frame;frame;... count`` per line; for flame graph tools).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from mesa_vllm.bench.config import BenchConfig, format_length

PHASES = ("prefill", "decode")


# --------------------------------------------------------------------------------------
# py-spy raw output (pure)
def _frame_key(frame: str, by: str) -> str:
    """``"func (path/file.py:123)"`` -> ``"func (file.py)"`` (by function) or as is (by line)."""
    if by == "line":
        return frame
    name, _, rest = frame.partition(" (")
    path = rest.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(path.split("/")[-2:]) if path else ""
    return f"{name} ({short})" if short else name


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        out.append((stack.split(";"), n))
    return out


def top_frames(stacks: list[tuple[list[str], int]], by: str = "function", limit: int = 25
               ) -> dict:
    """Self and inclusive sample counts per frame (``by``: "function" or "line")."""
    total = sum(n for _, n in stacks)
    self_counts: Counter = Counter()
    incl_counts: Counter = Counter()
    for frames, n in stacks:
        if not frames:
            continue
        keys = [_frame_key(f, by) for f in frames]
        self_counts[keys[-1]] += n
        for key in set(keys):
            incl_counts[key] += n
    def rows(counter):
        return [{"frame": k, "samples": v, "percent": 100.0 * v / total if total else 0.0}
                for k, v in counter.most_common(limit)]
    return {"samples": total, "self": rows(self_counts), "inclusive": rows(incl_counts)}


def _frames_md(title: str, entries: list[dict]) -> list[str]:
    lines = [f"*{title}*", "", "| % | samples | frame |", "|---:|---:|---|"]
    for e in entries:
        lines.append(f"| {e['percent']:.1f} | {e['samples']} | `{e['frame']}` |")
    return lines + [""]


# --------------------------------------------------------------------------------------
# Parent
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _start_pyspy(pid: int, out: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists() and not shutil.which(exe):
        return None
    proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw",
                             "--output", str(out), "--rate", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2.0)  # attach before the phase starts
    return proc


def _stop_pyspy(proc: subprocess.Popen | None) -> str:
    if proc is None:
        return "py-spy not found"
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return (err or b"").decode(errors="replace")[-500:]


def run(config: BenchConfig, out_dir: Path, model: str, *, backend: str = "mesa",
        length: int = 32768, decode_tokens: int = 64, tools: list[str] | None = None,
        verbose: bool = False) -> int:
    tools = tools or ["py-spy", "torch"]
    # The benchmark's max_model_len (so mesa resolves the same geometry), a KV pool for the
    # one request profiled.
    config = replace(config, max_model_len=config.resolved_max_model_len(), lengths=(length,),
                     scenarios=("single",), oracle_lengths=(), decode_tokens=decode_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"profile_{backend}_{format_length(length)}"
    sync = Path(tempfile.mkdtemp(prefix="mesa-profile-"))
    spec = {"config": config.to_dict(), "model": model, "backend": backend, "length": length,
            "decode_tokens": decode_tokens, "tools": tools, "sync": str(sync),
            "out": str(out_dir / f"{stem}.json"), "verbose": verbose}
    spec_path = sync / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    child = subprocess.Popen([sys.executable, "-m", "mesa_vllm.bench.profile", str(spec_path)],
                             env=env, start_new_session=True)
    pyspy_notes = {}
    try:
        if "py-spy" in tools:
            for phase in PHASES:
                if not _wait_for(sync / f"ready_{phase}", child, 7200):
                    print(f"[profile] child did not reach the {phase} phase", file=sys.stderr)
                    break
                raw = out_dir / f"{stem}_{phase}.pyspy"
                spy = _start_pyspy(child.pid, raw)
                (sync / f"go_{phase}").touch()
                _wait_for(sync / f"done_{phase}", child, 7200)
                pyspy_notes[phase] = _stop_pyspy(spy)
        child.wait()
    except KeyboardInterrupt:
        os.killpg(child.pid, signal.SIGTERM)
        raise
    if child.returncode:
        print(f"[profile] child exited with {child.returncode}", file=sys.stderr)
        return 1
    result = json.loads((out_dir / f"{stem}.json").read_text())
    for phase in PHASES:
        raw = out_dir / f"{stem}_{phase}.pyspy"
        if raw.exists():
            stacks = parse_collapsed(raw.read_text())
            result.setdefault("pyspy", {})[phase] = {
                "by_function": top_frames(stacks, "function"),
                "by_line": top_frames(stacks, "line", limit=15),
                "note": pyspy_notes.get(phase, "")[-300:],
            }
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = profile_markdown(result)
    (out_dir / f"{stem}.md").write_text(md)
    print(md)
    print(f"[profile] wrote {out_dir / (stem + '.md')}")
    return 0


def profile_markdown(result: dict) -> str:
    lines = [f"# Profile: {result['backend']} at {format_length(result['length'])} tokens", ""]
    lines.append(f"Engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor), "
                 f"settings {result.get('engine')}.")
    if result.get("loadavg"):
        lines.append(f"Load average during the profile: {result['loadavg']}.")
    lines.append("")
    for tool, runs in (("py-spy", result.get("timings_pyspy")),
                       ("torch profiler", result.get("timings_torch"))):
        if runs:
            lines.append(f"Under {tool}: prefill {runs['prefill_s']:.2f} s, decode "
                         f"{runs['decode_steps']} steps in {runs['decode_s']:.2f} s "
                         f"({1000 * runs['decode_s'] / max(1, runs['decode_steps']):.1f} ms/step).")
    lines.append("")
    for phase in PHASES:
        spy = (result.get("pyspy") or {}).get(phase)
        if spy:
            byf = spy["by_function"]
            lines += [f"## {phase}: py-spy ({byf['samples']} samples)", ""]
            lines += _frames_md("self time by function", byf["self"][:20])
            lines += _frames_md("inclusive time by function", byf["inclusive"][:25])
            lines += _frames_md("self time by line", spy["by_line"]["self"][:15])
        ops = (result.get("torch_ops") or {}).get(phase)
        if ops:
            lines += [f"## {phase}: torch profiler, top ops by self CPU time", "",
                      "| op | calls | self CPU ms | % | CPU total ms |", "|---|---:|---:|---:|---:|"]
            for op in ops:
                lines.append(f"| `{op['name']}` | {op['calls']} | {op['self_ms']:.1f} "
                             f"| {op['percent']:.1f} | {op['total_ms']:.1f} |")
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Child
def _phase_gate(sync: Path, phase: str, enabled: bool) -> None:
    if not enabled:
        return
    (sync / f"ready_{phase}").touch()
    while not (sync / f"go_{phase}").exists():
        time.sleep(0.1)


def _phase_done(sync: Path, phase: str, enabled: bool) -> None:
    if enabled:
        (sync / f"done_{phase}").touch()


def _profiled_request(llm, prompt: list[int], decode_tokens: int, sync: Path | None,
                      profiler_factory=None) -> tuple[dict, dict]:
    """One request: prefill until its first token, then ``decode_tokens`` steps, each phase
    under its own gate (py-spy) or profiler. Returns timings and the per-phase profilers."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=1 + decode_tokens, temperature=0.0, ignore_eos=True,
                            detokenize=False)
    profs = {}

    def gen_count() -> int:
        states = list(engine.output_processor.request_states.values())
        return states[0].stats.num_generation_tokens if states else -1

    gate = sync is not None
    _phase_gate(sync, "prefill", gate)
    prof = profiler_factory() if profiler_factory else None
    if prof:
        prof.__enter__()
    t0 = time.monotonic()
    llm.enqueue([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    while engine.has_unfinished_requests() and gen_count() < 1:
        engine.step()
    t1 = time.monotonic()
    if prof:
        prof.__exit__(None, None, None)
        profs["prefill"] = prof
    _phase_done(sync, "prefill", gate)
    _phase_gate(sync, "decode", gate)
    prof = profiler_factory() if profiler_factory else None
    if prof:
        prof.__enter__()
    t2 = time.monotonic()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    t3 = time.monotonic()
    if prof:
        prof.__exit__(None, None, None)
        profs["decode"] = prof
    _phase_done(sync, "decode", gate)
    return {"prefill_s": t1 - t0, "decode_s": t3 - t2, "decode_steps": steps}, profs


def _top_ops(prof, limit: int = 30) -> list[dict]:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return [{"name": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1000,
             "total_ms": e.cpu_time_total / 1000,
             "percent": 100.0 * e.self_cpu_time_total / total} for e in ranked]


def child_main(spec: dict) -> int:
    from mesa_vllm.bench.config import ModelShape

    config = BenchConfig.from_dict(spec["config"])
    shape = ModelShape.from_config(json.loads((Path(spec["model"]) / "config.json").read_text()))
    backend, length = spec["backend"], int(spec["length"])
    settings = config.engine_settings(shape)
    from mesa_vllm.bench.engine_run import _set_env, engine_kwargs

    _set_env(config, settings, spec.get("verbose", False))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM

    from mesa_vllm.llm_utils import shutdown_llm
    from mesa_vllm.testing import random_prompt

    kwargs = engine_kwargs(backend, config, settings)
    kwargs["distributed_executor_backend"] = "uni"
    llm = LLM(model=spec["model"], **kwargs)
    sync = Path(spec["sync"])
    tools = spec["tools"]
    result = {"backend": backend, "length": length, "engine": settings,
              "decode_tokens": spec["decode_tokens"], "torch_threads": torch.get_num_threads()}
    try:
        if config.warmup_tokens:
            _profiled_request(llm, random_prompt(config.warmup_tokens, 999_999, vocab=40000), 4,
                              None)
        if "py-spy" in tools:
            timings, _ = _profiled_request(llm, random_prompt(length, 424_242, vocab=40000),
                                           spec["decode_tokens"], sync)
            result["timings_pyspy"] = timings
            print(f"[profile] py-spy window: {timings}", flush=True)
        if "torch" in tools:
            from torch.profiler import ProfilerActivity, profile

            timings, profs = _profiled_request(
                llm, random_prompt(length, 434_343, vocab=40000), spec["decode_tokens"], None,
                profiler_factory=lambda: profile(activities=[ProfilerActivity.CPU]))
            result["timings_torch"] = timings
            result["torch_ops"] = {phase: _top_ops(p) for phase, p in profs.items()}
            print(f"[profile] torch profiler window: {timings}", flush=True)
        result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutdown_llm(llm)
        del llm
    Path(spec["out"]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(json.loads(Path(sys.argv[1]).read_text())))
