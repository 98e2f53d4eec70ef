"""One run of the study: build the latent model, train the encoders, evaluate R², assemble results.json."""
from __future__ import annotations

import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from .._ops import resolve_backend
from .data import BiasConfig, LatentModel
from .evaluate import LATENTS, evaluate
from .train import TrainConfig, train_encoders


@dataclass(frozen=True)
class EvalConfig:
    """Held-out sample sizes: validation (regressors' fit), test (scored), and the kernel ridge subsample."""

    n_val: int = 20480
    n_test: int = 20480
    n_nonlinear: int = 5000

    def __post_init__(self):
        for name in ("n_val", "n_test", "n_nonlinear"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 10:
                raise ValueError(f"{name} must be an int >= 10, got {value!r}")


# The paper's settings (batch 6144, Adam 1e-4, 100k steps, encoders 10x/50x the input width) for a GPU, and a
# CPU-sized quick mode that shows the same pattern in minutes: a smaller batch and encoder, a larger constant
# learning rate after a 1k-step warm-up, and one intra-op thread (these small ops run faster on one thread than
# split over two busy cores). Why these numbers (measured on the tuning setting θ = {0..5}, ρ = {4, 5}):
# - 12k steps: in the dependent case the encoders first settle in a state that also encodes the perturbed
#   semantics and leave it only once the representation has grown (after ~7-9k steps at batch 512, 1024 and
#   2048 alike);
# - batch 1024 and the warm-up: at batch 512, or without the warm-up, some seeds stall with an invariant
#   semantic unlearned (one output direction spent on a perturbed semantic in one encoder, collapsed in the other).
PRESETS = {
    "paper": dict(train=dict(steps=100_000, batch=6144, lr=1e-4, hidden=(10, 50, 50, 50, 50, 10), warmup=0,
                             cosine_decay=False),
                  eval=dict(n_val=20480, n_test=20480, n_nonlinear=5000), threads=None),
    "quick": dict(train=dict(steps=12_000, batch=1024, lr=3e-3, hidden=(10, 10, 10), warmup=1000,
                             cosine_decay=False),
                  eval=dict(n_val=5000, n_test=5000, n_nonlinear=2000), threads=1),
}


def roles(bias: BiasConfig) -> dict[str, str]:
    """latent name → 'invariant' | 'perturbed' | 'excluded' | 'specific'."""
    out = {f"s{i}": bias.role(i) for i in range(len(LATENTS) - 2)}
    out["m_x"] = out["m_t"] = "specific"
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_study(bias: BiasConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig, *, device: str = "cpu",
              on_step: Callable[[int, float], None] | None = None, extra_config: dict | None = None) -> dict:
    """Train and evaluate one (θ, ρ, dependence) setting; returns the results.json document."""
    device = torch.device(device)
    resolved = resolve_backend(train_cfg.backend, device, torch.float32)
    model = LatentModel(bias, seed=train_cfg.seed, device=device)
    encoders = train_encoders(model, train_cfg, on_step=on_step)
    start = time.perf_counter()
    scores = evaluate(model, encoders.f_x, encoders.f_t, n_val=eval_cfg.n_val, n_test=eval_cfg.n_test,
                      n_nonlinear=eval_cfg.n_nonlinear, seed=train_cfg.seed + 1_000_003)
    eval_seconds = time.perf_counter() - start
    config = {
        "selection": list(bias.selection), "perturbation": list(bias.perturbation),
        "invariant": list(bias.invariant), "dependent": bias.dependent, "change_prob": bias.change_prob,
        **train_cfg.as_dict(),
        "encoding_size": train_cfg.encoding_size or len(bias.invariant),
        "resolved_backend": resolved, "device": str(device), "threads": torch.get_num_threads(),
        "n_val": eval_cfg.n_val, "n_test": eval_cfg.n_test, "n_nonlinear": eval_cfg.n_nonlinear,
        **(extra_config or {}),
    }
    return {
        "config": config,
        "r2": scores["image"],
        "text_r2": scores["text"],
        "oracle_r2": model.oracle_r2(),
        "roles": roles(bias),
        "loss_history": [[step, loss] for step, loss in encoders.history],
        "timing": {"train_s": round(encoders.seconds, 2), "eval_s": round(eval_seconds, 2)},
        "environment": {"mmcl_fast": __version__, "torch": torch.__version__, "commit": _git_commit(),
                        "machine": platform.machine(), "processor": platform.processor() or None,
                        "cpu_count": torch.multiprocessing.cpu_count(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
