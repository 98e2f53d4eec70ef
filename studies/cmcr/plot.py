"""The C-MCR figure: A→C retrieval of every variant against chance and the oracle, and the modality gaps."""
from __future__ import annotations

from pathlib import Path

import numpy as np

ORDER = ("cmcr", "no_enhancement", "no_noise", "no_intra", "text_only", "oracle")
LABELS = {"cmcr": "C-MCR", "no_enhancement": "no enhance-\nment", "no_noise": "no noise", "no_intra": "no intra",
          "text_only": "text only", "oracle": "paired\noracle"}


def _variants(results: dict) -> dict[str, dict]:
    out = {}
    if "retrieval" in results:
        out["cmcr"] = {**results["retrieval"], "modality_gap": results["modality_gap"]["after"]["cmcr"]}
    out.update(results["ablations"])
    out["oracle"] = results["oracle"]
    return {name: out[name] for name in ORDER if name in out}


def figure(results: dict, path: str | Path) -> Path:
    """Write a PNG: left, A→C R@1 / R@5 / mAP per variant with chance marked; right, the modality gaps."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    variants = _variants(results)
    names = list(variants)
    x = np.arange(len(names))
    fig = Figure(figsize=(11, 4.2), dpi=130)
    ax, gap_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    width = 0.27
    for k, (metric, label) in enumerate((("r1", "R@1"), ("r5", "R@5"), ("map", "mAP"))):
        values = [variants[n]["a_to_c"][metric] for n in names]
        bars = ax.bar(x + (k - 1) * width, values, width, label=label)
        if metric == "r1":
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
    chance = variants[names[0]]["a_to_c"]["chance_r1"]
    ax.axhline(chance, color="black", lw=0.8, ls=":", label=f"chance R@1 ({chance:.3f})")
    ax.set_xticks(x, [LABELS[n] for n in names], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("A→C retrieval (held-out triples)")
    ax.legend(fontsize=7, loc="upper center", ncol=4, frameon=False)
    n_test = variants[names[0]]["a_to_c"]["n"]
    ax.set_title(f"A and C were never paired: A→C retrieval among {n_test} test items", fontsize=9)

    before = results["modality_gap"]["before"]
    after = results["modality_gap"]["after"]
    labels = ["space 1: A–B", "space 2: B–C"] + [f"{LABELS[n]}: A–C".replace("\n", " ").replace("- ", "")
                                                   for n in names]
    values = [before["space_ab_a_b"], before["space_bc_b_c"]] + [after[n]["a_c"] for n in names]
    colors = ["tab:gray", "tab:gray"] + ["tab:blue"] * len(names)
    gap_ax.bar(np.arange(len(values)), values, color=colors)
    gap_ax.set_xticks(np.arange(len(values)), labels, fontsize=7, rotation=35, ha="right")
    gap_ax.set_ylabel("modality gap ||mean(x̂) − mean(ŷ)||")
    gap_ax.set_title("gap before (gray: the frozen spaces) and after (blue: connected)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
