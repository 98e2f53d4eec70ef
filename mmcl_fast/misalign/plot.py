"""Heatmaps of R² (latents x settings), in the layout of the paper's figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .evaluate import LATENTS

ROLE_TAGS = {"invariant": "kept", "perturbed": "perturbed", "excluded": "dropped", "specific": "modality"}


def row_labels(roles: dict[str, str] | None) -> list[str]:
    if roles is None:
        return list(LATENTS)
    return [f"{name} ({ROLE_TAGS[roles[name]]})" for name in LATENTS]


def heatmap(columns: list[tuple[str, dict[str, float]]], roles: dict[str, str] | None, path: str | Path,
            title: str) -> Path:
    """Write a PNG with one row per latent and one column per (label, {latent: R²}); returns the path.

    `roles` (latent → role) tags the row labels when all columns share one setting; None for plain names.

    Colours and annotations show R² clipped to [0, 1] (a negative test R² means "no better than the mean").
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    values = np.array([[column[name] for _, column in columns] for name in LATENTS], dtype=float)
    shown = np.clip(values, 0.0, 1.0)
    fig = Figure(figsize=(1.3 + 1.05 * len(columns), 0.42 * len(LATENTS) + 1.6), dpi=130)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="BuGn", vmin=0.0, vmax=1.0, aspect="auto")
    for row in range(shown.shape[0]):
        for col in range(shown.shape[1]):
            ax.text(col, row, f"{shown[row, col]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if shown[row, col] > 0.6 else "black")
    ax.set_xticks(range(len(columns)), [label for label, _ in columns], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(LATENTS)), row_labels(roles), fontsize=8)
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
