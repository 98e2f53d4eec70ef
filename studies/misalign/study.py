"""Runs of the study: for each seed build the latent model, train the encoders and evaluate R²; then assemble
results.json with every seed's values and their mean ± std (and, for a sweep, one such run per k)."""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import torch

from mmcl_fast.backends import resolve_backend
from mmcl_fast.bench.machine import environment as machine_environment

from .data import N_SEMANTIC, BiasConfig, LatentModel
from .evaluate import evaluate, latent_names
from .train import TrainConfig, train_encoders


@dataclass(frozen=True)
class EvalConfig:
    """Held-out sample sizes: validation (regressors' fit), test (scored), and the kernel ridge subsample; and the
    training steps after which the encoders are also scored on the way (`at_steps`, each below the run's last step:
    results.json's `checkpoints`, to see when the pattern appears)."""

    n_val: int = 20480
    n_test: int = 20480
    n_nonlinear: int = 5000
    at_steps: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("n_val", "n_test", "n_nonlinear"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 10:
                raise ValueError(f"{name} must be an int >= 10, got {value!r}")
        steps = tuple(self.at_steps)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in steps) or len(set(steps)) != len(steps):
            raise ValueError(f"at_steps must be distinct positive ints (training steps), got {self.at_steps!r}")
        object.__setattr__(self, "at_steps", tuple(sorted(steps)))


# The paper's settings (batch 6144, Adam 1e-4, 100k steps, encoders 10x/50x the input width) for a GPU, and a
# CPU-sized quick mode that shows the same pattern in minutes: a smaller batch and encoder, a larger constant
# learning rate after a 1k-step warm-up, and one intra-op thread (these small ops run faster on one thread than
# split over two busy cores). Why these numbers (measured on the tuning setting θ = {0..5}, ρ = {4, 5}):
# - 48k steps: the encoders first settle in a state that also encodes perturbed semantics (one output direction
#   partly spent on them) and leave it slowly, once the representation has grown. Measured by scoring on the way
#   (what --eval-at does):
#   - 12k steps (the preset until 2026-12-01) left 3 of 6 dependent runs on θ = {0,1,2,3,6,7,8}, ρ = {2,7}
#     0.11-0.13 above the oracle on a perturbed semantic, and θ = {0..9}, ρ = {0,1} (perturbation sweep, k = 2)
#     with the perturbed pair at R² 0.34 / 0.30; all reach the pattern by 24k;
#   - 24k (the preset until 2026-12-01, second session) left two runs in the state: the held-out setting
#     θ = {1,2,4,5,7,9}, ρ = {4,9} (clip, dependent, seed 1: s9 0.52-0.66 vs oracle 0.10, invariant s7 0.69-0.73)
#     and θ = {0..9}, ρ = {0} (sweep k = 1, independent, seed 0: perturbed s0 0.51). Continued, the first passes
#     from 32k on (|R² - oracle| 0.073 at 32k, 0.049 at 48k), the second from 40k on (s0 0.32 at 32k, 0.22 at
#     40k); cosine decay of the learning rate made the first worse (s9 0.83 at 24k), so it is not the remedy;
# - batch 1024 and the warm-up: at batch 512, or without the warm-up, some seeds stall with an invariant
#   semantic unlearned (one output direction spent on a perturbed semantic in one encoder, collapsed in the other).
# - He ("kaiming") init of the encoders: with the paper code's mixers (the default) and PyTorch's
#   default init, the representation starts tiny (covariance eigenvalues ~1e-4) and grows direction by direction.
#   On θ = {0..5}, ρ = {4, 5}, seeds 2 and 3, and on θ = {0..9}, ρ = {4, 5}, seed 1 (clip, independent) the
#   smallest eigenvalue of one encoder's representation covariance was 0.2-0.9 % of its largest after 500 steps
#   (seeds 0 and 1 of the first setting: 24-30 %); on θ = {0,1,2,3,6,7,8}, ρ = {2,7}, seed 0 such a direction
#   stayed collapsed for all 12k steps (invariant block R² 0.78). With He init the representation starts at unit
#   scale in every direction; the ratio at step 500 was 19-33 % on θ = {0..5}, ρ = {4, 5}, seed 2 and
#   θ = {0..9}, ρ = {4, 5}, seed 1.
# The other numbers were measured with the "spectral" mixers and PyTorch's default init. A quick run also scores
# the encoders after 12k, 24k and 36k steps (results.json's `checkpoints`): whether the pattern has settled.
PRESETS = {
    "paper": dict(train=dict(steps=100_000, batch=6144, lr=1e-4, hidden=(10, 50, 50, 50, 50, 10), warmup=0,
                             cosine_decay=False, init="torch"),
                  eval=dict(n_val=20480, n_test=20480, n_nonlinear=5000), threads=None),
    "quick": dict(train=dict(steps=48_000, batch=1024, lr=3e-3, hidden=(10, 10, 10), warmup=1000,
                             cosine_decay=False, init="kaiming"),
                  eval=dict(n_val=5000, n_test=5000, n_nonlinear=2000, at_steps=(12_000, 24_000, 36_000)),
                  threads=1),
}


SWEEPS = ("selection", "perturbation")


def sweep_settings(kind: str, ks=None, dependent: bool = False) -> list[tuple[int, BiasConfig]]:
    """The paper's sweeps, one (k, BiasConfig) per k (indices are 0-based, so the paper's [k] = {1..k} is
    {0..k-1} here):

    - "selection": θ = {0..k-1}, ρ = ∅, for k = 1..10 (the text keeps a growing prefix of the semantics);
    - "perturbation": θ = {0..9}, ρ = {0..k-1}, for k = 0..9 (k = 0: no perturbation).
    """
    if kind not in SWEEPS:
        raise ValueError(f"sweep must be one of {SWEEPS}, got {kind!r}")
    allowed = range(1, N_SEMANTIC + 1) if kind == "selection" else range(0, N_SEMANTIC)
    ks = list(allowed) if ks is None else list(ks)
    bad = [k for k in ks if k not in allowed]
    if bad or not ks:
        raise ValueError(f"sweep values for --sweep {kind} must lie in {allowed.start}..{allowed.stop - 1}, "
                         f"got {ks}")
    if kind == "selection":
        return [(k, BiasConfig(selection=tuple(range(k)), dependent=dependent)) for k in ks]
    return [(k, BiasConfig(selection=tuple(range(N_SEMANTIC)), perturbation=tuple(range(k)), dependent=dependent))
            for k in ks]


def roles(bias: BiasConfig) -> dict[str, str]:
    """latent name → 'invariant' | 'perturbed' | 'excluded' | 'specific' | 'block' | 'text_value'."""
    out = {f"s{i}": bias.role(i) for i in range(N_SEMANTIC)}
    out["m_x"] = out["m_t"] = "specific"
    out["s_inv"] = "block"
    out.update({f"s_tilde{j}": "text_value" for j in bias.perturbation})
    return out



def run_seed(bias: BiasConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig, *, device: str = "cpu",
             mixer: str = "paper", mlp: bool = False, threads: int | None = None,
             on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train and evaluate one seed (`train_cfg.seed`: mixers, covariances, data and encoders all derive from it)."""
    if threads is not None:
        torch.set_num_threads(threads)
    late = [step for step in eval_cfg.at_steps if step >= train_cfg.steps]
    if late:
        raise ValueError(f"at_steps {late} must lie below the run's {train_cfg.steps} training steps")
    model = LatentModel(bias, seed=train_cfg.seed, device=device, mixer=mixer)

    def score(f_x, f_t) -> dict:
        return evaluate(model, f_x, f_t, n_val=eval_cfg.n_val, n_test=eval_cfg.n_test,
                        n_nonlinear=eval_cfg.n_nonlinear, seed=train_cfg.seed + 1_000_003, mlp=mlp)

    checkpoints = []
    checkpoint_s = 0.0

    def on_checkpoint(step: int, f_x, f_t) -> None:
        nonlocal checkpoint_s
        start = time.perf_counter()
        scores = score(f_x, f_t)
        checkpoints.append({"step": step, "image": scores["image"], "text": scores["text"]})
        checkpoint_s += time.perf_counter() - start

    encoders = train_encoders(model, train_cfg, on_step=on_step, checkpoints=eval_cfg.at_steps,
                              on_checkpoint=on_checkpoint)
    start = time.perf_counter()
    scores = score(encoders.f_x, encoders.f_t)
    return {"seed": train_cfg.seed, "image": scores["image"], "text": scores["text"], "oracle": model.oracle_r2(),
            "checkpoints": checkpoints, "loss_history": [[step, loss] for step, loss in encoders.history],
            "train_s": round(encoders.seconds - checkpoint_s, 2),
            "eval_s": round(time.perf_counter() - start + checkpoint_s, 2)}


def _run_seed_in_worker(job: tuple) -> dict:
    """Process-pool entry point: one seed on `threads` threads, with scikit-learn's BLAS capped the same."""
    from threadpoolctl import threadpool_limits

    bias, train_cfg, eval_cfg, device, mixer, mlp, threads = job
    with threadpool_limits(threads):
        return run_seed(bias, train_cfg, eval_cfg, device=device, mixer=mixer, mlp=mlp, threads=threads)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _aggregate(per_seed: list[dict], key: str) -> tuple[dict, dict, dict]:
    """(means, stds, by_seed) for one of "image" / "text": {regressor: {latent: ...}}."""
    means, stds, by_seed = {}, {}, {}
    for regressor in per_seed[0][key]:
        by_seed[regressor] = {name: [run[key][regressor][name] for run in per_seed]
                              for name in per_seed[0][key][regressor]}
        pairs = {name: _mean_std(values) for name, values in by_seed[regressor].items()}
        means[regressor] = {name: pair[0] for name, pair in pairs.items()}
        stds[regressor] = {name: pair[1] for name, pair in pairs.items()}
    return means, stds, by_seed


def pattern_check(results: dict, regressor: str = "nonlinear") -> dict:
    """Per seed, the numbers the acceptance criteria read (image representation, `regressor`):
    the lowest R² of an invariant semantic, the highest R² of a dropped / perturbed / modality-specific latent,
    and the largest |R² - oracle R²| over s0..s9 (the oracle is per seed: in the dependent case Σ is)."""
    roles_ = results["roles"]
    by_seed = results["r2_by_seed"][regressor]
    oracle = results["oracle_r2_by_seed"]
    semantics = [f"s{i}" for i in range(N_SEMANTIC)]
    invariant = [name for name in semantics if roles_[name] == "invariant"]
    others = [name for name in semantics + ["m_x", "m_t"] if roles_[name] in ("perturbed", "excluded", "specific")]
    n_seeds = len(results["seeds"])
    return {
        "regressor": regressor,
        "invariant_min": [min(by_seed[name][i] for name in invariant) for i in range(n_seeds)],
        "others_max": [max((by_seed[name][i] for name in others), default=float("nan")) for i in range(n_seeds)],
        "oracle_gap_max": [max(abs(by_seed[name][i] - oracle[name][i]) for name in semantics)
                           for i in range(n_seeds)],
    }


def run_study(bias: BiasConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig, *, seeds=None, device: str = "cpu",
              mixer: str = "paper", mlp: bool = False, jobs: int = 1, threads: int | None = None,
              on_step: Callable[[int, float], None] | None = None,
              on_seed: Callable[[dict], None] | None = None, extra_config: dict | None = None) -> dict:
    """Train and evaluate one (θ, ρ, dependence) setting for each seed; returns the results.json document.

    seeds: the seeds to run (default: `train_cfg.seed` alone). jobs > 1 runs seeds in that many worker processes
    (each on `threads` threads; `on_step` is then not called). `on_seed(result)` is called as each seed finishes.
    """
    return run_studies([bias], train_cfg, eval_cfg, seeds=seeds, device=device, mixer=mixer, mlp=mlp, jobs=jobs,
                       threads=threads, on_step=on_step,
                       on_seed=None if on_seed is None else (lambda _, result: on_seed(result)),
                       extra_configs=[extra_config])[0]


def run_studies(settings: list[BiasConfig], train_cfg: TrainConfig, eval_cfg: EvalConfig, *, seeds=None,
                device: str = "cpu", mixer: str = "paper", mlp: bool = False, jobs: int = 1,
                threads: int | None = None, on_step: Callable[[int, float], None] | None = None,
                on_seed: Callable[[int, dict], None] | None = None,
                extra_configs: list[dict | None] | None = None) -> list[dict]:
    """`run_study` for several settings (a sweep's points) with the same seeds: every (setting, seed) pair is one
    job, so jobs > 1 keeps that many workers busy whether the work is many seeds or many points. Returns one
    results.json document per setting, in order; `on_seed(setting_index, result)` is called as each job ends."""
    seeds = [train_cfg.seed] if seeds is None else [int(seed) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    if not settings:
        raise ValueError("settings must hold at least one BiasConfig")
    extra_configs = extra_configs or [None] * len(settings)
    if len(extra_configs) != len(settings):
        raise ValueError(f"extra_configs needs one entry per setting ({len(settings)}), got {len(extra_configs)}")
    device = torch.device(device)
    resolved = resolve_backend(train_cfg.backend, device, torch.float32)
    pairs = [(index, replace(train_cfg, seed=seed)) for index in range(len(settings)) for seed in seeds]
    per_seed: list[list[dict]] = [[] for _ in settings]
    if jobs == 1 or len(pairs) == 1:
        for index, cfg in pairs:
            result = run_seed(settings[index], cfg, eval_cfg, device=str(device), mixer=mixer, mlp=mlp,
                              threads=threads, on_step=on_step)
            per_seed[index].append(result)
            if on_seed is not None:
                on_seed(index, result)
    else:
        import multiprocessing

        jobs_ = [(settings[index], cfg, eval_cfg, str(device), mixer, mlp, threads or 1) for index, cfg in pairs]
        with ProcessPoolExecutor(max_workers=min(jobs, len(pairs)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            for (index, _), result in zip(pairs, pool.map(_run_seed_in_worker, jobs_)):
                per_seed[index].append(result)
                if on_seed is not None:
                    on_seed(index, result)
    environment = machine_environment(device)
    documents = []
    for bias, runs, extra in zip(settings, per_seed, extra_configs):
        config = {
            "selection": list(bias.selection), "perturbation": list(bias.perturbation),
            "invariant": list(bias.invariant), "dependent": bias.dependent, "change_prob": bias.change_prob,
            **train_cfg.as_dict(), "seed": seeds[0],
            "encoding_size": train_cfg.encoding_size or len(bias.invariant), "mixer": mixer,
            "resolved_backend": resolved, "device": str(device), "threads": threads or torch.get_num_threads(),
            "jobs": jobs, "n_val": eval_cfg.n_val, "n_test": eval_cfg.n_test, "n_nonlinear": eval_cfg.n_nonlinear,
            "eval_at": list(eval_cfg.at_steps),
            "mlp_regressor": mlp, **(extra or {}),
        }
        documents.append(assemble_results(runs, config, latent_names(bias), roles(bias), environment))
    return documents


def assemble_results(per_seed: list[dict], config: dict, latents: list[str], roles_: dict[str, str],
                     environment: dict) -> dict:
    """The results.json document of one setting from its per-seed runs (`run_seed`'s dicts, in seed order)."""
    image, image_std, image_by_seed = _aggregate(per_seed, "image")
    text, text_std, text_by_seed = _aggregate(per_seed, "text")
    oracle_by_seed = {name: [run["oracle"][name] for run in per_seed] for name in per_seed[0]["oracle"]}
    results = {
        "config": config,
        "seeds": [run["seed"] for run in per_seed],
        "latents": list(latents),
        "r2": image, "r2_std": image_std, "r2_by_seed": image_by_seed,
        "text_r2": text, "text_r2_std": text_std, "text_r2_by_seed": text_by_seed,
        "oracle_r2": {name: statistics.fmean(values) for name, values in oracle_by_seed.items()},
        "oracle_r2_by_seed": oracle_by_seed,
        "roles": dict(roles_),
        "loss_history_by_seed": {str(run["seed"]): run["loss_history"] for run in per_seed},
        "timing": {"train_s_by_seed": [run["train_s"] for run in per_seed],
                   "eval_s_by_seed": [run["eval_s"] for run in per_seed]},
        "environment": environment,
    }
    results["pattern_check"] = pattern_check(results)
    results["checkpoints"] = _checkpoint_documents(per_seed, results)
    return results


def _checkpoint_documents(per_seed: list[dict], results: dict) -> list[dict]:
    """One entry per evaluation on the way (`EvalConfig.at_steps`): every seed's R² at that step and the
    pattern check of those values."""
    documents = []
    for index, first in enumerate(per_seed[0].get("checkpoints", [])):
        at_step = [run["checkpoints"][index] for run in per_seed]
        image, _, image_by_seed = _aggregate(at_step, "image")
        _, _, text_by_seed = _aggregate(at_step, "text")
        view = {"roles": results["roles"], "r2_by_seed": image_by_seed, "seeds": results["seeds"],
                "oracle_r2_by_seed": results["oracle_r2_by_seed"]}
        documents.append({"step": first["step"], "r2": image, "r2_by_seed": image_by_seed,
                          "text_r2_by_seed": text_by_seed, "pattern_check": pattern_check(view)})
    return documents


# config keys that may differ between runs of one setting that are merged: which seeds ran, and how they were run
_MERGE_FREE_KEYS = ("seed", "jobs")


def _per_seed_runs(results: dict) -> list[dict]:
    """Undo `assemble_results`: one `run_seed`-like dict per seed of a results.json document."""
    runs = []
    for k, seed in enumerate(results["seeds"]):
        runs.append({
            "seed": seed,
            "image": {reg: {name: values[k] for name, values in by_name.items()}
                      for reg, by_name in results["r2_by_seed"].items()},
            "text": {reg: {name: values[k] for name, values in by_name.items()}
                     for reg, by_name in results["text_r2_by_seed"].items()},
            "oracle": {name: values[k] for name, values in results["oracle_r2_by_seed"].items()},
            "checkpoints": [{"step": point["step"],
                             "image": {reg: {name: values[k] for name, values in by_name.items()}
                                       for reg, by_name in point["r2_by_seed"].items()},
                             "text": {reg: {name: values[k] for name, values in by_name.items()}
                                      for reg, by_name in point["text_r2_by_seed"].items()}}
                            for point in results.get("checkpoints", [])],
            "loss_history": results["loss_history_by_seed"][str(seed)],
            "train_s": results["timing"]["train_s_by_seed"][k], "eval_s": results["timing"]["eval_s_by_seed"][k],
        })
    return runs


def merge_results(documents: list[dict], sources: list[str] | None = None) -> dict:
    """One results.json document from several runs of the same setting with disjoint seeds (seeds run apart, on
    other machines or after an interruption). Raises ValueError naming the first config key that differs or the
    seeds that repeat. The merged document lists each source's environment under `merged_from`."""
    if not documents:
        raise ValueError("merge needs at least one results document")
    sources = sources or [f"run {i}" for i in range(len(documents))]
    first = documents[0]["config"]
    for source, doc in zip(sources[1:], documents[1:]):
        config = doc["config"]
        for key in sorted(set(first) | set(config)):
            if key not in _MERGE_FREE_KEYS and first.get(key) != config.get(key):
                raise ValueError(f"cannot merge {sources[0]} and {source}: config {key!r} differs "
                                 f"({first.get(key)!r} vs {config.get(key)!r}); only runs of one setting merge")
    per_seed = [run for doc in documents for run in _per_seed_runs(doc)]
    seeds = [run["seed"] for run in per_seed]
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise ValueError(f"cannot merge: seed(s) {repeated} appear in more than one run")
    order = sorted(range(len(per_seed)), key=lambda i: seeds[i])
    per_seed = [per_seed[i] for i in order]
    config = {**first, "seed": per_seed[0]["seed"], "jobs": None}
    merged = assemble_results(per_seed, config, documents[0]["latents"], documents[0]["roles"],
                              environment=documents[0]["environment"])
    merged["merged_from"] = [{"source": source, "seeds": doc["seeds"], "environment": doc["environment"]}
                             for source, doc in zip(sources, documents)]
    return merged
