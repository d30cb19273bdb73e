"""From measured cells to the report: min/median over repetitions, mesa/default ratios from the
same run, the issue's targets, and the Markdown tables (engine-free, pure).

Every figure is summarised over its repetitions as ``min``, ``median`` and ``max``; its
**best** is the min for times and memory and the max for rates. A ratio is always
``mesa / default`` of the same figure, once of the medians and once of the bests. For rates
(tokens/s) a ratio above 1 means mesa is faster; for times and memory below 1 is better.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from mesa_vllm.bench.config import format_length

GIB = float(1 << 30)

# figure -> (higher is better, unit, label)
FIGURES = {
    "prefill_tok_s": (True, "tok/s", "prefill throughput"),
    "prefill_s": (False, "s", "prefill time"),
    "ttft_s": (False, "s", "time to first token"),
    "decode_tok_s": (True, "tok/s", "decode throughput"),
    "decode_step_ms": (False, "ms", "decode step"),
    "peak_rss": (False, "B", "peak RSS (process tree)"),
    "hwm_max": (False, "B", "peak RSS (largest process)"),
    "kv_bytes_per_token": (False, "B", "KV bytes per token"),
    "wall_s": (False, "s", "cell wall time"),
}

TARGETS = (
    # name, description, threshold, comparison
    ("prefill_32k", "mesa prefill throughput / default at 32k (single)", 1.3, ">="),
    ("prefill_64k", "mesa prefill throughput / default at 64k (single)", 2.0, ">="),
    ("linear_prefill", "mesa prefill time 64k / 32k (single)", 2.3, "<="),
    ("decode_32k", "mesa decode throughput / default at 32k (single)", 0.9, ">="),
    ("decode_32k_batch4", "mesa decode throughput / default at 32k (batch of 4)", 0.9, ">="),
    ("memory_64k", "mesa peak RSS / default at 64k (single)", 1.0, "<="),
    ("memory_64k_batch4", "mesa peak RSS / default at 64k (batch of 4)", 1.0, "<="),
    ("kv_per_token", "mesa KV bytes per token / default", 1.5, "<="),
)


def stats(values: list[float], higher_is_better: bool) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    lo, hi = min(values), max(values)
    return {"min": lo, "median": statistics.median(values), "max": hi,
            "best": hi if higher_is_better else lo, "n": len(values)}


def aggregate(rows: list[dict]) -> dict[tuple[str, str, int], dict]:
    """``(backend, scenario, length)`` -> figure -> stats over the repetitions (error rows and
    rows without the figure are left out)."""
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("type", "cell") != "cell" or row.get("error"):
            continue
        groups[(row["backend"], row["scenario"], int(row["length"]))].append(row)
    out = {}
    for key, members in groups.items():
        figures = {}
        for name, (higher, _, _) in FIGURES.items():
            s = stats([m.get(name) for m in members], higher)
            if s is not None:
                figures[name] = s
        figures["reps"] = len(members)
        figures["loadavg_max"] = max(
            (max(m.get("loadavg_after") or [0]) for m in members), default=None)
        out[key] = figures
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(agg: dict, scenario: str, length: int, figure: str) -> dict | None:
    mesa = agg.get(("mesa", scenario, length), {}).get(figure)
    default = agg.get(("default", scenario, length), {}).get(figure)
    if not mesa or not default:
        return None
    return {"median": ratio(mesa["median"], default["median"]),
            "best": ratio(mesa["best"], default["best"]),
            "mesa": mesa["median"], "default": default["median"]}


def _median(agg, backend, scenario, length, figure):
    return (agg.get((backend, scenario, length), {}).get(figure) or {}).get("median")


def evaluate_targets(agg: dict) -> list[dict]:
    def prefill(length, scenario="single"):
        r = ratios(agg, scenario, length, "prefill_tok_s")
        return r and r["median"]

    values = {
        "prefill_32k": prefill(32768),
        "prefill_64k": prefill(65536),
        "linear_prefill": ratio(_median(agg, "mesa", "single", 65536, "prefill_s"),
                                _median(agg, "mesa", "single", 32768, "prefill_s")),
        "decode_32k": (ratios(agg, "single", 32768, "decode_tok_s") or {}).get("median"),
        "decode_32k_batch4": (ratios(agg, "batch4", 32768, "decode_tok_s") or {}).get("median"),
        "memory_64k": (ratios(agg, "single", 65536, "peak_rss") or {}).get("median"),
        "memory_64k_batch4": (ratios(agg, "batch4", 65536, "peak_rss") or {}).get("median"),
        "kv_per_token": None,
    }
    kv = {}
    for (backend, _, _), figures in agg.items():
        if "kv_bytes_per_token" in figures:
            kv[backend] = figures["kv_bytes_per_token"]["median"]
    values["kv_per_token"] = ratio(kv.get("mesa"), kv.get("default"))
    out = []
    for name, description, threshold, op in TARGETS:
        value = values.get(name)
        if value is None:
            status = "not measured"
        elif (value >= threshold) if op == ">=" else (value <= threshold):
            status = "met"
        else:
            status = "MISSED"
        out.append({"name": name, "description": description, "target": f"{op} {threshold}",
                    "value": value, "status": status})
    return out


def build_summary(rows: list[dict], engine_rows: list[dict] | None = None,
                  meta: dict | None = None) -> dict:
    agg = aggregate(rows)
    lengths = sorted({k[2] for k in agg})
    scenarios = sorted({k[1] for k in agg}, key=lambda s: (s != "single", s))
    table = []
    for scenario in scenarios:
        for length in lengths:
            entry = {"scenario": scenario, "length": length}
            any_value = False
            for backend in ("mesa", "default", "oracle"):
                figures = agg.get((backend, scenario, length))
                if figures:
                    entry[backend] = figures
                    any_value = True
            if not any_value:
                continue
            entry["ratio"] = {f: ratios(agg, scenario, length, f) for f in FIGURES
                              if ratios(agg, scenario, length, f)}
            table.append(entry)
    kv = {}
    for row in engine_rows or []:
        per_token = (row.get("kv") or {}).get("kv_bytes_per_token")
        if per_token:
            kv[row["backend"]] = per_token
    # Cells that ran and failed stay in the report: a missing figure needs its reason.
    failures = [{k: row.get(k) for k in ("backend", "scenario", "length", "rep", "error")}
                for row in rows if row.get("type", "cell") == "cell" and row.get("error")]
    return {
        "meta": meta or {},
        "kv_bytes_per_token": kv,
        "table": table,
        "targets": evaluate_targets(agg),
        "scaling": scaling(agg),
        "failures": failures,
    }


def scaling(agg: dict) -> list[dict]:
    """Prefill time ratio between consecutive lengths (2x the length: 2 is linear, 4 is
    quadratic), per backend and scenario."""
    out = []
    for backend in ("mesa", "default", "oracle"):
        for scenario in ("single", "batch4"):
            points = sorted((length, f["prefill_s"]["median"])
                            for (b, s, length), f in agg.items()
                            if b == backend and s == scenario and "prefill_s" in f)
            for (l0, t0), (l1, t1) in zip(points, points[1:]):
                out.append({"backend": backend, "scenario": scenario, "from": l0, "to": l1,
                            "length_ratio": l1 / l0, "time_ratio": t1 / t0 if t0 else None})
    return out


# --------------------------------------------------------------------------------------
# Markdown
def _fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if unit == "B":
        return f"{value / GIB:.2f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _cell(entry: dict, backend: str, figure: str, which: str = "median") -> float | None:
    return ((entry.get(backend) or {}).get(figure) or {}).get(which)


def _ratio_text(entry: dict, figure: str) -> str:
    r = (entry.get("ratio") or {}).get(figure)
    if not r or r["median"] is None:
        return "-"
    return f"{r['median']:.2f}x" + (f" ({r['best']:.2f}x)" if r.get("best") is not None else "")


def markdown(summary: dict, command: str | None = None) -> str:
    lines: list[str] = []
    meta = summary.get("meta") or {}
    if command:
        lines += ["Command:", "", "```sh", command, "```", ""]
    settings = meta.get("engine")
    if settings:
        lines.append("Engine settings (both backends): " + ", ".join(
            f"`{k}={v}`" for k, v in settings.items()) + ".")
    geometry = meta.get("mesa_geometry")
    if geometry:
        lines.append("Mesa geometry: " + ", ".join(f"`{k}={v}`" for k, v in geometry.items())
                     + ".")
    if meta.get("note"):
        lines.append(meta["note"])
    lines.append("")
    lines.append("Figures are medians over repetitions; ratios are mesa / default from the same "
                 "run, median (best). Rates: > 1 means mesa is faster; time and memory: < 1 "
                 "means mesa is lower.")
    lines.append("")
    for scenario in ("single", "batch4"):
        entries = [e for e in summary["table"] if e["scenario"] == scenario
                   and ("mesa" in e or "default" in e)]
        if not entries:
            continue
        title = "One request" if scenario == "single" else "Batch of 4 concurrent requests"
        lines += [f"**{title}**", "",
                  "| length | reps | prefill tok/s mesa | default | ratio | TTFT s mesa | default "
                  "| decode tok/s mesa | default | ratio | peak RSS GiB mesa | default | ratio |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in entries:
            reps = "/".join(str((e.get(b) or {}).get("reps", 0)) for b in ("mesa", "default"))
            lines.append(
                f"| {format_length(e['length'])} | {reps} "
                f"| {_fmt(_cell(e, 'mesa', 'prefill_tok_s'))} "
                f"| {_fmt(_cell(e, 'default', 'prefill_tok_s'))} "
                f"| {_ratio_text(e, 'prefill_tok_s')} "
                f"| {_fmt(_cell(e, 'mesa', 'ttft_s'), digits=2)} "
                f"| {_fmt(_cell(e, 'default', 'ttft_s'), digits=2)} "
                f"| {_fmt(_cell(e, 'mesa', 'decode_tok_s'))} "
                f"| {_fmt(_cell(e, 'default', 'decode_tok_s'))} "
                f"| {_ratio_text(e, 'decode_tok_s')} "
                f"| {_fmt(_cell(e, 'mesa', 'peak_rss'), 'B')} "
                f"| {_fmt(_cell(e, 'default', 'peak_rss'), 'B')} "
                f"| {_ratio_text(e, 'peak_rss')} |")
        lines.append("")
    kv = summary.get("kv_bytes_per_token") or {}
    if kv:
        parts = [f"{b} {int(v):,} B" for b, v in sorted(kv.items())]
        r = ratio(kv.get("mesa"), kv.get("default"))
        lines += ["KV bytes per token (all layers, read from the engine's KV cache spec): "
                  + ", ".join(parts) + (f"; mesa / default = {r:.2f}x." if r else "."), ""]
    oracle = [e for e in summary["table"] if "oracle" in e]
    if oracle:
        lines += ["**Dense oracle (Hugging Face, every pair scored) vs vLLM mesa, one request**",
                  "", "| length | oracle prefill s | vLLM mesa prefill s | speed-up "
                  "| oracle decode tok/s | vLLM mesa decode tok/s | speed-up |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for e in oracle:
            op, mp = _cell(e, "oracle", "prefill_s"), _cell(e, "mesa", "prefill_s")
            od, md = _cell(e, "oracle", "decode_tok_s"), _cell(e, "mesa", "decode_tok_s")
            lines.append(
                f"| {format_length(e['length'])} | {_fmt(op)} | {_fmt(mp, digits=2)} "
                f"| {_fmt(ratio(op, mp))}x | {_fmt(od, digits=2)} | {_fmt(md)} "
                f"| {_fmt(ratio(md, od))}x |")
        lines.append("")
    scale = [s for s in summary.get("scaling", []) if s["scenario"] == "single"
             and s["backend"] in ("mesa", "default") and s["time_ratio"]]
    if scale:
        lines += ["Prefill time growth between lengths (one request; linear would grow like "
                  "the length, quadratic like its square): " + "; ".join(
                      f"{s['backend']} {format_length(s['from'])}->{format_length(s['to'])} "
                      f"x{s['time_ratio']:.2f} (length x{s['length_ratio']:g})"
                      for s in scale) + ".", ""]
    failures = summary.get("failures") or []
    if failures:
        lines += ["**Failed cells** (no figures; `--verbose` shows vLLM's log)", ""]
        lines += [f"- {f['backend']}@{format_length(f['length'])} {f['scenario']} rep {f['rep']}: "
                  f"`{f['error']}`" for f in failures]
        lines.append("")
    lines += ["**Targets**", "", "| target | wanted | measured | status |", "|---|---:|---:|---|"]
    for t in summary["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['description']} | {t['target']} | {value} | {t['status']} |")
    lines.append("")
    return "\n".join(lines)
