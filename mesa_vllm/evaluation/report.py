"""Summaries and plots from ``results.jsonl`` (every run appended there; the last row per sample
wins).

Writes into the results folder:

- ``summary.csv``: one line per (task, method, length): samples scored and planned, mean score
  (accuracy; recall for the list tasks) with its standard error, or for ``ppl`` the perplexity
  over all scored tokens and over the last ``TAIL`` tokens (token-weighted over the windows);
  mean seconds per sample.
- ``summary.md``: the same as tables, one per task (methods x lengths), ``n`` in brackets.
- ``accuracy.png``: accuracy against length, one panel per task, one line per method.
- ``perplexity.png``: perplexity (whole window and tail) against length.
- ``ppl_position.png``: perplexity against position in the window, at each method's longest length.
- ``depth_<task>.png``: accuracy by needle depth and length, per method (passkey, niah_single).
- ``sweep.png``: the parameter variants (``mesa:E=...``) next to the plain method, per task.

Plain methods (``origin``, ``yarn``, ``ntk``, ``mesa``, endpoint labels) go in the main plots;
methods with parameters are variants and get ``sweep.png``.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from mesa_vllm.evaluation.grid import format_length
from mesa_vllm.evaluation.store import (RESULTS_FILE, RUNS_FILE, current_rows, latest_rows,
                                        read_rows)
from mesa_vllm.tasks.perplexity import TAIL

METHOD_ORDER = ["origin", "yarn", "ntk", "mesa"]
DEPTH_TASKS = ("passkey", "niah_single")
DEPTH_BINS = 5


def _is_variant(label: str) -> bool:
    return ":" in label


def _method_sort_key(label: str, seen: list[str]):
    kind = label.split(":", 1)[0]
    rank = METHOD_ORDER.index(kind) if kind in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, _is_variant(label), seen.index(label) if label in seen else 0, label)


def load(out_dir: str | Path, trained_len: int | None = None
         ) -> tuple[list[dict], list[dict], dict[tuple, int]]:
    """The rows to report (the latest of each key, made by the engine its label resolves to
    today), the run records, and how many stale rows each cell left out."""
    out_dir = Path(out_dir)
    runs = read_rows(out_dir / RUNS_FILE)
    if trained_len is None:
        trained_len = _trained_len(runs)
    rows, stale = current_rows(latest_rows(read_rows(out_dir / RESULTS_FILE)).values(),
                               lambda row: _mesa_engine_today(row, trained_len))
    return rows, runs, stale


def _trained_len(runs: list[dict]) -> int | None:
    found = [r.get("trained_len") for r in runs if r.get("trained_len")]
    return found[-1] if found else None


def _mesa_engine_today(row: dict, trained_len: int | None) -> dict | None:
    """What a local mesa row's label resolves to with today's defaults (it needs only ``T``);
    None for other methods, whose engines also depend on the model's rope parameters."""
    if row.get("kind") != "mesa" or row.get("backend") != "vllm" or not trained_len:
        return None
    from mesa_vllm.evaluation.methods import MethodError, engine_config, parse_method

    try:
        config = engine_config(parse_method(row["method"]), int(row["length"]), trained_len)
    except MethodError:
        return None
    return None if config.infeasible else config.info


def aggregate(rows: list[dict], runs: list[dict] | None = None) -> list[dict]:
    """One summary record per (task, method, length)."""
    planned: dict[tuple, int] = {}
    infeasible: dict[tuple, str] = {}
    for run in runs or []:
        for task, method, length, n in run.get("planned", []):
            key = (task, method, int(length))
            planned[key] = max(planned.get(key, 0), int(n))
        for task, method, length, why in run.get("infeasible", []):
            infeasible[(task, method, int(length))] = why
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["method"], int(row["length"]))].append(row)
    keys = set(groups) | set(planned) | set(infeasible)
    records = []
    for key in keys:
        task, method, length = key
        cell = groups.get(key, [])
        ok = [r for r in cell if not r.get("error")]
        rec = {
            "task": task, "method": method, "length": length, "n": len(ok),
            "planned": planned.get(key, 0), "errors": len(cell) - len(ok),
            "infeasible": infeasible.get(key, "") if not ok else "",
            "mean": None, "stderr": None, "ppl": None, "tail_ppl": None,
            "seconds": (sum(r.get("seconds") or 0 for r in ok) / len(ok)) if ok else None,
        }
        if task == "ppl":
            nll = sum(r["nll_sum"] for r in ok)
            count = sum(r["n_scored"] for r in ok)
            tail = sum(r["tail_nll_sum"] for r in ok)
            tail_n = sum(r["tail_n"] for r in ok)
            rec["ppl"] = _exp(nll, count)
            rec["tail_ppl"] = _exp(tail, tail_n)
        elif ok:
            scores = [float(r["score"]) for r in ok]
            mean = sum(scores) / len(scores)
            var = sum((s - mean) ** 2 for s in scores) / max(1, len(scores) - 1)
            rec["mean"] = mean
            rec["stderr"] = math.sqrt(var / len(scores)) if len(scores) > 1 else None
        records.append(rec)
    seen = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    from mesa_vllm.tasks.registry import TASKS

    order = list(TASKS)
    records.sort(key=lambda r: (order.index(r["task"]) if r["task"] in order else len(order),
                                r["task"], _method_sort_key(r["method"], seen), r["length"]))
    return records


def _exp(total: float, count: int) -> float | None:
    if not count:
        return None
    if not math.isfinite(total):
        return math.inf
    return math.exp(total / count)


def write_csv(records: list[dict], path: Path) -> None:
    fields = ["task", "method", "length", "n", "planned", "errors", "mean", "stderr", "ppl",
              "tail_ppl", "seconds", "infeasible"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for rec in records:
            writer.writerow({k: _csv_value(rec.get(k)) for k in fields})


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _cell_text(rec: dict | None, field: str) -> str:
    if rec is None:
        return ""
    if rec["n"] == 0:
        if rec.get("infeasible"):
            return "infeasible"
        return f"errors ({rec['errors']})" if rec.get("errors") else "-"
    value = rec[field]
    if value is None:
        return "-"
    if field in ("ppl", "tail_ppl"):
        text = "inf" if math.isinf(value) else (f"{value:.2f}" if value < 1000 else f"{value:.3g}")
    else:
        text = f"{value:.2f}"
    short = rec["planned"] and rec["n"] < rec["planned"]
    return f"{text} ({rec['n']}{'/' + str(rec['planned']) if short else ''})"


def markdown(records: list[dict], trained_len: int | None = None) -> str:
    tasks = []
    for r in records:
        if r["task"] not in tasks:
            tasks.append(r["task"])
    lengths = sorted({r["length"] for r in records})
    by_key = {(r["task"], r["method"], r["length"]): r for r in records}
    out = []
    if trained_len:
        out.append(f"Trained length T = {trained_len}. Cells: mean score (samples scored"
                   f"[/planned]); `-` not run yet.\n")
    for task in tasks:
        methods = []
        for r in records:
            if r["task"] == task and r["method"] not in methods:
                methods.append(r["method"])
        fields = [("ppl", "perplexity, whole window"), ("tail_ppl", f"perplexity, last {TAIL} "
                  "tokens")] if task == "ppl" else [("mean", "accuracy" if task in (
                      "passkey", "niah_single", "niah_multikey") else "recall")]
        for field, what in fields:
            out.append(f"### {task}: {what}\n")
            out.append("| method | " + " | ".join(format_length(L) for L in lengths) + " |")
            out.append("|---|" + "---:|" * len(lengths))
            for m in methods:
                cells = [_cell_text(by_key.get((task, m, L)), field) for L in lengths]
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            out.append("")
    infeasible = sorted({(r["method"], r["length"], r["infeasible"]) for r in records
                         if r.get("infeasible") and r["n"] == 0})
    if infeasible:
        out.append("Infeasible cells (not run):\n")
        for method, length, why in infeasible:
            out.append(f"- {method} at {format_length(length)}: {why}")
        out.append("")
    return "\n".join(out)


def agreement(rows: list[dict], trained_len: int | None) -> list[dict]:
    """At lengths that fit ``T``: how often each mesa method's output equals origin's.

    Mesa leaves those prompts untouched, so its outputs should be origin's token for token (in
    bf16 a near-tie can still flip when the two engines' numerics differ, e.g. a prompt batched
    differently); perplexities should agree to float tolerance.
    """
    if not trained_len:
        return []
    origin = {(r["task"], int(r["length"]), int(r["index"])): r for r in rows
              if r.get("method") == "origin" and not r.get("error")}
    out: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") != "mesa" or r.get("error") or int(r["length"]) > trained_len:
            continue
        ref = origin.get((r["task"], int(r["length"]), int(r["index"])))
        if ref is None:
            continue
        rec = out.setdefault((r["method"], int(r["length"])), {
            "method": r["method"], "length": int(r["length"]), "compared": 0, "identical": 0,
            "ppl_max_rel_diff": 0.0})
        rec["compared"] += 1
        if r["task"] == "ppl":
            a = _exp(r.get("nll_sum", math.inf), r.get("n_scored", 0))
            b = _exp(ref.get("nll_sum", math.inf), ref.get("n_scored", 0))
            if a and b and math.isfinite(a) and math.isfinite(b):
                diff = abs(a - b) / b
                rec["ppl_max_rel_diff"] = max(rec["ppl_max_rel_diff"], diff)
                rec["identical"] += diff < 1e-3
        else:
            rec["identical"] += r.get("output") == ref.get("output")
    return sorted(out.values(), key=lambda x: (x["method"], x["length"]))


# ------------------------------------------------------------------------------------------
# Plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _x_axis(ax, lengths, trained_len):
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([format_length(L) for L in lengths])
    ax.minorticks_off()
    if trained_len:
        ax.axvline(trained_len, color="0.6", linestyle="--", linewidth=1)


def _method_colors(methods) -> dict[str, str]:
    """One colour per method for every panel of a figure, so a method keeps its colour in a
    panel where the methods before it have no points."""
    palette = [f"C{i}" for i in range(10)]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _series(records, task, methods, field):
    out = {}
    for m in methods:
        pts = sorted((r["length"], r[field], r.get("stderr")) for r in records
                     if r["task"] == task and r["method"] == m and r["n"] and r[field] is not None)
        if pts:
            out[m] = pts
    return out


def plot_accuracy(records, path: Path, trained_len=None, variants: bool = False,
                  title: str | None = None) -> bool:
    tasks = [t for t in dict.fromkeys(r["task"] for r in records) if t != "ppl"]
    if not tasks:
        return False
    methods_all = list(dict.fromkeys(r["method"] for r in records))
    if variants:
        kinds = {m.split(":", 1)[0] for m in methods_all if _is_variant(m)}
        methods = [m for m in methods_all if m.split(":", 1)[0] in kinds]
    else:
        methods = [m for m in methods_all if not _is_variant(m)]
    if not methods:
        return False
    plt = _plt()
    cols = min(3, len(tasks))
    rows_n = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False)
    lengths = sorted({r["length"] for r in records})
    colors = _method_colors(methods)
    drawn = False
    for ax, task in zip(axes.flat, tasks):
        for m, pts in _series(records, task, methods, "mean").items():
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            err = [p[2] or 0 for p in pts]
            style = "-" if not _is_variant(m) else "--"
            ax.errorbar(xs, ys, yerr=err, marker="o", markersize=3, capsize=2, linestyle=style,
                        linewidth=2.2 if m == "mesa" else 1.2, label=m, color=colors[m])
            drawn = True
        _x_axis(ax, lengths, trained_len)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("accuracy" if task in ("passkey", "niah_single", "niah_multikey")
                      else "recall")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        h, l_ = ax.get_legend_handles_labels()
        for hh, ll in zip(h, l_):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)),
               bbox_to_anchor=(0.5, -0.01), fontsize=8)
    fig.suptitle(title or "Accuracy against length" + (f" (T = {trained_len}, dashed line)"
                                                          if trained_len else ""))
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 6), 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_perplexity(records, path: Path, trained_len=None) -> bool:
    ppl = [r for r in records if r["task"] == "ppl" and r["n"]]
    if not ppl:
        return False
    plt = _plt()
    methods = [m for m in dict.fromkeys(r["method"] for r in ppl)]
    lengths = sorted({r["length"] for r in records})
    colors = _method_colors(methods)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, field, what in ((axes[0], "ppl", "whole window"),
                            (axes[1], "tail_ppl", f"last {TAIL} tokens")):
        for m, pts in _series(ppl, "ppl", methods, field).items():
            xs = [p[0] for p in pts]
            ys = [min(p[1], 1e6) for p in pts]
            ax.plot(xs, ys, marker="o", markersize=3, linestyle="--" if _is_variant(m) else "-",
                    linewidth=2.2 if m == "mesa" else 1.2, label=m, color=colors[m])
        _x_axis(ax, lengths, trained_len)
        ax.set_yscale("log")
        ax.set_title(f"perplexity, {what}")
        ax.set_xlabel("length (tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_ppl_position(rows, path: Path, trained_len=None) -> bool:
    ppl_rows = [r for r in rows if r.get("task") == "ppl" and not r.get("error")
                and r.get("bucket_nll")]
    if not ppl_rows:
        return False
    plt = _plt()
    longest: dict[str, int] = {}
    for r in ppl_rows:
        longest[r["method"]] = max(longest.get(r["method"], 0), int(r["length"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    for method, length in longest.items():
        sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0])
        size = None
        for r in ppl_rows:
            if r["method"] == method and int(r["length"]) == length:
                size = r.get("bucket_size", 1024)
                for b, s, n in r["bucket_nll"]:
                    sums[b][0] += s
                    sums[b][1] += n
        xs = [(b + 0.5) * size for b in sorted(sums)]
        ys = [min(math.exp(sums[b][0] / sums[b][1]), 1e6) if math.isfinite(sums[b][0]) else 1e6
              for b in sorted(sums)]
        ax.plot(xs, ys, linestyle="--" if _is_variant(method) else "-",
                label=f"{method} ({format_length(length)})")
    if trained_len:
        ax.axvline(trained_len, color="0.6", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("position in window (tokens)")
    ax.set_ylabel("perplexity per 1k-token bucket")
    ax.set_title("Perplexity against position (longest length per method)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_depth(rows, task: str, path: Path) -> bool:
    task_rows = [r for r in rows if r.get("task") == task and not r.get("error")
                 and r.get("depth") is not None and not _is_variant(r["method"])]
    if not task_rows:
        return False
    plt = _plt()
    methods = list(dict.fromkeys(r["method"] for r in task_rows))
    methods.sort(key=lambda m: _method_sort_key(m, methods))
    lengths = sorted({int(r["length"]) for r in task_rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(2.2 + 1.0 * len(lengths) * len(methods),
                                                        3.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = [[None] * len(lengths) for _ in range(DEPTH_BINS)]
        for j, L in enumerate(lengths):
            for b in range(DEPTH_BINS):
                scores = [r["score"] for r in task_rows if r["method"] == method
                          and int(r["length"]) == L
                          and min(DEPTH_BINS - 1, int(r["depth"] * DEPTH_BINS)) == b]
                grid[b][j] = sum(scores) / len(scores) if scores else float("nan")
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([format_length(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(DEPTH_BINS))
        ax.set_yticklabels([f"{b / DEPTH_BINS:.1f}" for b in range(DEPTH_BINS)], fontsize=7)
        ax.set_title(method, fontsize=9)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(f"{task}: accuracy by needle depth and length", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(out_dir: str | Path, trained_len: int | None = None,
                 plots: bool = True) -> dict:
    """Write ``summary.csv``, ``summary.md`` and the plots; return their paths."""
    out_dir = Path(out_dir)
    rows, runs, stale = load(out_dir, trained_len)
    if trained_len is None:
        trained_len = _trained_len(runs)
    records = aggregate(rows, runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    write_csv(records, out_dir / "summary.csv")
    written["csv"] = out_dir / "summary.csv"
    text = markdown(records, trained_len)
    agree = agreement(rows, trained_len)
    if agree:
        text += ("\nWithin T, mesa leaves prompts untouched: samples whose output equals origin's"
                 " (perplexity within 0.1%):\n\n")
        text += "| method | length | identical / compared | max ppl difference |\n"
        text += "|---|---:|---:|---:|\n"
        for a in agree:
            text += (f"| {a['method']} | {format_length(a['length'])} | {a['identical']} / "
                     f"{a['compared']} | {a['ppl_max_rel_diff']:.2%} |\n")
    if stale:
        text += ("\nLeft out as stale (made by an engine the label no longer resolves to, e.g. "
                 "before a default changed; run the cell again to replace them):\n\n")
        for (task, method, length), n in sorted(stale.items()):
            text += f"- {task}, {method}, {format_length(length)}: {n} rows\n"
    (out_dir / "summary.md").write_text(text)
    written["md"] = out_dir / "summary.md"
    if plots and rows:
        if plot_accuracy(records, out_dir / "accuracy.png", trained_len):
            written["accuracy"] = out_dir / "accuracy.png"
        if any(_is_variant(r["method"]) for r in records) and plot_accuracy(
                records, out_dir / "sweep.png", trained_len, variants=True,
                title="Parameter variants against length"):
            written["sweep"] = out_dir / "sweep.png"
        if plot_perplexity(records, out_dir / "perplexity.png", trained_len):
            written["perplexity"] = out_dir / "perplexity.png"
        if plot_ppl_position(rows, out_dir / "ppl_position.png", trained_len):
            written["ppl_position"] = out_dir / "ppl_position.png"
        for task in DEPTH_TASKS:
            if plot_depth(rows, task, out_dir / f"depth_{task}.png"):
                written[f"depth_{task}"] = out_dir / f"depth_{task}.png"
    (out_dir / "summary.json").write_text(json.dumps(records, indent=1, default=str))
    return written
