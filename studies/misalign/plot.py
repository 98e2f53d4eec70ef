"""Heatmaps of R² (latents x settings), in the layout of the paper's figures, and R² against k for a sweep."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .evaluate import LATENTS

ROLE_TAGS = {"invariant": "kept", "perturbed": "perturbed", "excluded": "dropped", "specific": "modality",
             "block": "θ\\ρ block", "text_value": "text value"}


def row_labels(names, roles: dict[str, str] | None) -> list[str]:
    if roles is None:
        return list(names)
    return [f"{name} ({ROLE_TAGS[roles[name]]})" for name in names]


def heatmap(columns: list[tuple[str, dict[str, float]]], roles: dict[str, str] | None, path: str | Path,
            title: str, names=LATENTS) -> Path:
    """Write a PNG with one row per latent in `names` and one column per (label, {latent: R²}); returns the path.

    `roles` (latent → role) tags the row labels when all columns share one setting; None for plain names.

    Colours and annotations show R² clipped to [0, 1] (a negative test R² means "no better than the mean").
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    names = list(names)
    values = np.array([[column[name] for _, column in columns] for name in names], dtype=float)
    shown = np.clip(values, 0.0, 1.0)
    fig = Figure(figsize=(1.8 + 1.05 * len(columns), 0.42 * len(names) + 1.6), dpi=130)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="BuGn", vmin=0.0, vmax=1.0, aspect="auto")
    for row in range(shown.shape[0]):
        for col in range(shown.shape[1]):
            ax.text(col, row, f"{shown[row, col]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if shown[row, col] > 0.6 else "black")
    ax.set_xticks(range(len(columns)), [label for label, _ in columns], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), row_labels(names, roles), fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="R² (test)", fraction=0.05)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def setting_label(config: dict) -> str:
    """Short column label for a run: θ, ρ and the dependence."""
    sel = ",".join(str(i) for i in config["selection"])
    per = ",".join(str(i) for i in config["perturbation"]) or "∅"
    return f"θ={{{sel}}}\nρ={{{per}}}" + ("\ndependent" if config["dependent"] else "")


def sweep_plot(summary: dict, path: str | Path) -> Path:
    """R² (image representation, kernel ridge, mean ± std over seeds) of every latent against k: one panel per
    semantic s0..s9 plus one for m_x, m_t; the marker shows each point's role (kept / perturbed / dropped)."""
    from matplotlib.figure import Figure

    points = summary["points"]
    ks = [point["k"] for point in points]
    markers = {"invariant": ("o", "tab:green"), "perturbed": ("s", "tab:orange"), "excluded": ("x", "tab:red"),
               "specific": ("^", "tab:gray")}
    fig = Figure(figsize=(13, 5.6), dpi=120)
    axes = fig.subplots(2, 6, sharex=True, sharey=True).ravel()
    for ax, name in zip(axes, LATENTS[:10] + ("m_x", "m_t")):
        mean = np.array([point["r2"]["nonlinear"][name] for point in points])
        std = np.array([point["r2_std"]["nonlinear"][name] for point in points])
        oracle = np.array([point["oracle_r2"][name] for point in points])
        ax.plot(ks, mean, color="0.6", lw=1)
        ax.fill_between(ks, mean - std, mean + std, color="0.85")
        ax.plot(ks, oracle, color="tab:blue", lw=0.8, ls="--")
        for k, value, point in zip(ks, mean, points):
            marker, colour = markers[point["roles"][name]]
            ax.plot([k], [value], marker=marker, color=colour, ls="none", ms=5)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(-0.1, 1.05)
        ax.grid(alpha=0.3)
    for ax in axes[6:]:
        ax.set_xlabel("k")
    for ax in axes[::6]:
        ax.set_ylabel("R² (image, kernel ridge)")
    handles = [axes[0].plot([], [], marker=m, color=c, ls="none")[0] for m, c in markers.values()]
    handles.append(axes[0].plot([], [], color="tab:blue", ls="--")[0])
    fig.legend(handles, ["kept (θ\\ρ)", "perturbed (ρ)", "dropped (not in θ)", "modality-specific", "oracle"],
               loc="lower center", ncol=5, fontsize=8)
    what = "θ = {0..k-1}, ρ = ∅" if summary["sweep"] == "selection" else "θ = {0..9}, ρ = {0..k-1}"
    fig.suptitle(f"{summary['sweep']} sweep ({what}), {summary['objective']}, "
                 f"{'dependent' if summary['dependent'] else 'independent'}, "
                 f"mean ± std over {len(summary['seeds'])} seed(s)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    fig.savefig(path)
    return path
