"""PNG plots of a benchmark run: time vs N and peak memory vs N, log-log, one line per implementation.

One panel per (loss, D, dtype). On the memory plot the budget is a dashed line, and a dense baseline that was
skipped for it continues as a dotted line of its estimated peak, so the reader sees why it stops.
"""
from __future__ import annotations

from pathlib import Path

COLORS = {"mmcl_fast": "tab:blue", "open_clip": "tab:orange", "naive": "tab:green", "dense": "tab:green",
          "inf_cl": "tab:red", "open_clip_chunked": "tab:purple"}
MARKERS = {"mmcl_fast": "o", "open_clip": "s", "naive": "^", "dense": "^", "inf_cl": "D", "open_clip_chunked": "v"}


def _panels(records: list[dict]) -> dict[tuple, list[dict]]:
    panels: dict[tuple, list[dict]] = {}
    for rec in records:
        panels.setdefault((rec["loss"], rec["d"], rec["dtype"]), []).append(rec)
    return panels


def _figure(n_panels: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ncols = min(n_panels, 3)
    nrows = -(-n_panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n_panels])


def _plot_metric(results: dict, path: Path, key: str, ylabel: str, title: str) -> Path:
    from .report import machine_line
    panels = _panels(results["records"])
    plt, fig, axes = _figure(max(len(panels), 1))
    budget_mib = results["machine"].get("mem_budget_mib")
    for ax, ((loss, d, dtype), recs) in zip(axes, panels.items()):
        for impl in dict.fromkeys(r["impl"] for r in recs):
            # a log axis cannot show 0 (a tiny step whose peak stayed inside already-resident pages)
            ok = sorted((r for r in recs if r["impl"] == impl and r["status"] == "ok" and r[key]),
                        key=lambda r: r["n"])
            style = {"color": COLORS.get(impl), "marker": MARKERS.get(impl, "o")}
            if ok:
                ax.plot([r["n"] for r in ok], [r[key] for r in ok], label=impl, **style)
            over = sorted((r for r in recs if r["impl"] == impl and r.get("over_budget")), key=lambda r: r["n"])
            if key == "peak_mib" and over:
                # continue the measured line with the estimate that kept the larger N from running
                joined = ok[-1:] + over
                ax.plot([r["n"] for r in joined], [r[key] if r in ok else r["estimated_mib"] for r in joined],
                        linestyle=":", color=style["color"], alpha=0.8)
                ax.plot([r["n"] for r in over], [r["estimated_mib"] for r in over], linestyle="none", marker="x",
                        color=style["color"], label=f"{impl} (estimate, over budget: not run)")
        if key == "peak_mib" and budget_mib:
            ax.axhline(budget_mib, color="gray", linestyle="--", linewidth=1, label="memory budget")
        ax.set_xscale("log", base=2)
        sizes = sorted({r["n"] for r in recs})
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes], rotation=30 if len(sizes) > 6 else 0)
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("batch size N")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{loss}, D={d}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
    # one legend for the figure, below the panels, so it never hides a line
    legend = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.suptitle(f"{title}\n{machine_line(results['machine'])}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if legend else 0, 1, 1))
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(len(legend), 4), fontsize=8,
                   frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(results: dict, out: Path) -> list[Path]:
    """Write ``time_vs_n.png`` and ``memory_vs_n.png`` into `out`; returns their paths."""
    out = Path(out)
    return [
        _plot_metric(results, out / "time_vs_n.png", "seconds", "seconds per forward+backward (median)",
                     "time vs batch size"),
        _plot_metric(results, out / "memory_vs_n.png", "peak_mib", "peak memory of one step (MiB)",
                     "peak memory vs batch size"),
    ]
