"""PNG of a run: prefill time and decode throughput vs length for both backends (and the dense
oracle), with a subplot of the mesa/default ratios."""

from __future__ import annotations

from pathlib import Path

from mesa_vllm.bench.config import format_length

STYLE = {
    ("mesa", "single"): dict(color="tab:blue", marker="o", linestyle="-"),
    ("mesa", "batch4"): dict(color="tab:blue", marker="s", linestyle="--"),
    ("default", "single"): dict(color="tab:orange", marker="o", linestyle="-"),
    ("default", "batch4"): dict(color="tab:orange", marker="s", linestyle="--"),
    ("oracle", "single"): dict(color="tab:gray", marker="^", linestyle=":"),
}


def _series(summary: dict, backend: str, scenario: str, figure: str):
    xs, ys, lo, hi = [], [], [], []
    for e in summary["table"]:
        if e["scenario"] != scenario:
            continue
        s = (e.get(backend) or {}).get(figure)
        if not s:
            continue
        xs.append(e["length"])
        ys.append(s["median"])
        lo.append(s["median"] - s["min"])
        hi.append(s["max"] - s["median"])
    return xs, ys, [lo, hi]


def plot(summary: dict, path: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax_prefill, ax_decode, ax_ratio = axes
    for (backend, scenario), style in STYLE.items():
        label = f"{backend} ({'1 request' if scenario == 'single' else 'batch of 4'})"
        xs, ys, err = _series(summary, backend, scenario, "prefill_s")
        if xs:
            ax_prefill.errorbar(xs, ys, yerr=err, label=label, capsize=3, **style)
        xs, ys, err = _series(summary, backend, scenario, "decode_tok_s")
        if xs:
            ax_decode.errorbar(xs, ys, yerr=err, label=label, capsize=3, **style)
    # linear and quadratic guides through the default backend's point at the trained length
    # (or its shortest), where both backends compute the same thing
    xs, ys, _ = _series(summary, "default", "single", "prefill_s")
    if len(xs) >= 2:
        trained = (summary.get("meta") or {}).get("mesa_geometry", {}) or {}
        at = [i for i, x in enumerate(xs) if x >= trained.get("T", 0)]
        i0 = at[0] if at and at[0] < len(xs) - 1 else 0
        x0, y0 = xs[i0], ys[i0]
        grid = xs[i0:]
        ax_prefill.plot(grid, [y0 * (x / x0) for x in grid], color="0.75", lw=1,
                        label=f"linear from default at {format_length(x0)}")
        ax_prefill.plot(grid, [y0 * (x / x0) ** 2 for x in grid], color="0.75", lw=1,
                        linestyle="--", label="quadratic")
    for ax, ylabel, head in ((ax_prefill, "prefill time (s), log", "Prefill time (TTFT, engine)"),
                             (ax_decode, "decode tokens/s (all sequences)", "Decode throughput")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(head)
        ax.grid(True, which="both", alpha=0.3)
    ax_prefill.set_yscale("log")
    ax_decode.set_yscale("log")
    for ax in (ax_prefill, ax_decode):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)

    for figure, label, color in (("prefill_tok_s", "prefill throughput", "tab:green"),
                                 ("decode_tok_s", "decode throughput", "tab:purple"),
                                 ("peak_rss", "peak RSS", "tab:red")):
        for scenario, ls in (("single", "-"), ("batch4", "--")):
            pts = [(e["length"], e["ratio"][figure]["median"]) for e in summary["table"]
                   if e["scenario"] == scenario and figure in (e.get("ratio") or {})
                   and e["ratio"][figure]["median"] is not None]
            if pts:
                ax_ratio.plot(*zip(*pts), marker="o", color=color, linestyle=ls,
                              label=f"{label} ({'1 req' if scenario == 'single' else 'batch 4'})")
    ax_ratio.axhline(1.0, color="black", lw=1)
    ax_ratio.set_xscale("log", base=2)
    ax_ratio.set_xlabel("prompt length (tokens)")
    ax_ratio.set_ylabel("mesa / default")
    ax_ratio.set_title("Ratio mesa / default (same run)")
    ax_ratio.grid(True, which="both", alpha=0.3)
    if ax_ratio.get_legend_handles_labels()[0]:
        ax_ratio.legend(fontsize=8)
    lengths = sorted({e["length"] for e in summary["table"]})
    for ax in axes:
        if lengths:
            ax.set_xticks(lengths)
            ax.set_xticklabels([format_length(x) for x in lengths], rotation=45)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
