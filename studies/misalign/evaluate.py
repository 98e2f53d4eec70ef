"""Held-out evaluation: how well each latent can be predicted from a learned representation (R²).

For each encoder (image f_x∘g_x, text f_t∘g_t) we draw a validation and a test set from the latent model,
standardise the representation with the validation statistics, fit regressors on the validation set and report
the coefficient of determination on the test set, per latent: s0..s9, m_x, m_t, the invariant block as a whole
("s_inv" = s[θ \\ ρ]) and the text's value of each perturbed semantic ("s_tilde<j>" = s̃_j, j ∈ ρ). The R² of a
multi-dimensional latent is the mean over its coordinates (scikit-learn's "uniform_average", as in the paper).

- linear: ordinary least squares on the whole validation set;
- nonlinear: RBF kernel ridge regression fit on 4/5 of a validation subsample, with (gamma, alpha) chosen per
  latent on the other fifth (the same estimator as scikit-learn's KernelRidge, solved by one Cholesky per grid
  point);
- mlp (optional): the paper's lighter alternative, scikit-learn's MLPRegressor (one hidden layer of 100 ReLU
  units, Adam) on the whole validation set. The paper fits one network per latent; here one network predicts all
  (standardised) latents at once, which costs one fit instead of twenty.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.linalg import cho_factor, cho_solve
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler

from .data import N_SEMANTIC, BiasConfig, LatentModel, Sample

LATENTS = tuple(f"s{i}" for i in range(N_SEMANTIC)) + ("m_x", "m_t")
MLP_HIDDEN = 100
MLP_MAX_EPOCHS = 1000
# RBF widths are relative to the representation size k (standardised features: E||a - b||² = 2k).
GAMMA_TIMES_K = (0.1, 0.3, 1.0, 3.0)
ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)


def latent_names(bias: BiasConfig) -> tuple[str, ...]:
    """Every latent scored for `bias`: s0..s9, m_x, m_t, s_inv, then s_tilde<j> for j in ρ."""
    return LATENTS + ("s_inv",) + tuple(f"s_tilde{j}" for j in bias.perturbation)


def latent_columns(sample: Sample, bias: BiasConfig) -> tuple[np.ndarray, dict[str, list[int]]]:
    """All latents side by side as one float64 array [s, m_x, m_t, s̃[ρ]], and the columns of each latent."""
    perturbed = list(bias.perturbation)
    values = torch.cat([sample.s, sample.m_x, sample.m_t, sample.s_tilde[:, perturbed]], dim=1)
    n_m = sample.m_x.shape[1]
    columns = {f"s{i}": [i] for i in range(N_SEMANTIC)}
    columns["m_x"] = list(range(N_SEMANTIC, N_SEMANTIC + n_m))
    columns["m_t"] = list(range(N_SEMANTIC + n_m, N_SEMANTIC + 2 * n_m))
    columns["s_inv"] = list(bias.invariant)
    for offset, j in enumerate(perturbed):
        columns[f"s_tilde{j}"] = [N_SEMANTIC + 2 * n_m + offset]
    return values.double().cpu().numpy(), columns


@torch.no_grad()
def encode(model: LatentModel, f_x: torch.nn.Module, f_t: torch.nn.Module, n: int, generator: torch.Generator,
           chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, list[int]]]:
    """n fresh samples → (image representation, text representation, latents, latent columns) as numpy."""
    reps_x, reps_t, latents = [], [], []
    columns: dict[str, list[int]] = {}
    for start in range(0, n, chunk):
        sample = model.sample(min(chunk, n - start), generator)
        reps_x.append(f_x(sample.x).double().cpu().numpy())
        reps_t.append(f_t(sample.t).double().cpu().numpy())
        values, columns = latent_columns(sample, model.bias)
        latents.append(values)
    return np.concatenate(reps_x), np.concatenate(reps_t), np.concatenate(latents), columns


def _r2_per_latent(y_true: np.ndarray, y_pred: np.ndarray, columns: dict[str, list[int] | slice]) -> dict[str, float]:
    residual = ((y_true - y_pred) ** 2).sum(0)
    total = ((y_true - y_true.mean(0)) ** 2).sum(0)
    r2_columns = 1.0 - residual / np.maximum(total, np.finfo(np.float64).tiny)
    return {name: float(r2_columns[cols].mean()) for name, cols in columns.items()}


def _rbf_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    sq_dist = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.exp(-gamma * np.maximum(sq_dist, 0.0))


def _kernel_ridge_predict(x_fit, coef, x_new, gamma, chunk: int = 4096) -> np.ndarray:
    """K(x_new, x_fit) @ coef, a few thousand rows at a time (the test set may be large)."""
    return np.concatenate([_rbf_kernel(x_new[i:i + chunk], x_fit, gamma) @ coef
                           for i in range(0, len(x_new), chunk)])


def r2_scores(rep_val: np.ndarray, y_val: np.ndarray, rep_test: np.ndarray, y_test: np.ndarray,
              columns: dict[str, list[int]], n_nonlinear: int, mlp_seed: int | None = None
              ) -> dict[str, dict[str, float]]:
    """{"linear": {latent: R²}, "nonlinear": {latent: R²}[, "mlp": {latent: R²}]}, fit on the validation set,
    scored on the test set; "mlp" only when `mlp_seed` is given (the regressor's initialisation seed).

    The non-linear regressor is RBF kernel ridge regression (dual coefficients (K + alpha I)⁻¹ y by Cholesky) fit
    on 4/5 of a validation subsample; (gamma, alpha) is chosen per latent on the remaining fifth.
    """
    scaler = StandardScaler().fit(rep_val)
    rep_val, rep_test = scaler.transform(rep_val), scaler.transform(rep_test)
    linear = LinearRegression().fit(rep_val, y_val)
    scores = {"linear": _r2_per_latent(y_test, linear.predict(rep_test), columns)}

    n_sub = min(n_nonlinear, len(rep_val))
    n_fit = max(1, (4 * n_sub) // 5)
    x_fit, y_fit = rep_val[:n_fit], y_val[:n_fit]
    x_sel, y_sel = rep_val[n_fit:n_sub], y_val[n_fit:n_sub]
    k = rep_val.shape[1]
    fits = []  # (gamma, dual coefficients, {latent: R² on the selection split})
    for gamma in (g / k for g in GAMMA_TIMES_K):
        kernel = _rbf_kernel(x_fit, x_fit, gamma)
        kernel_sel = _rbf_kernel(x_sel, x_fit, gamma)
        for alpha in ALPHAS:
            coef = cho_solve(cho_factor(kernel + alpha * np.eye(n_fit), lower=True), y_fit)
            fits.append((gamma, coef, _r2_per_latent(y_sel, kernel_sel @ coef, columns)))
    nonlinear: dict[str, float] = {}
    best = {name: max(range(len(fits)), key=lambda i: fits[i][2][name]) for name in columns}
    for point in sorted(set(best.values())):
        gamma, coef, _ = fits[point]
        test_r2 = _r2_per_latent(y_test, _kernel_ridge_predict(x_fit, coef, rep_test, gamma), columns)
        nonlinear.update({name: test_r2[name] for name, chosen in best.items() if chosen == point})
    scores["nonlinear"] = {name: nonlinear[name] for name in columns}
    if mlp_seed is not None:
        scores["mlp"] = _mlp_r2(rep_val, y_val, rep_test, y_test, columns, mlp_seed)
    return scores


def _mlp_r2(rep_val, y_val, rep_test, y_test, columns, seed: int) -> dict[str, float]:
    """One MLPRegressor for all latents, on standardised targets (so no latent dominates the squared error)."""
    target_scaler = StandardScaler().fit(y_val)
    mlp = MLPRegressor(hidden_layer_sizes=(MLP_HIDDEN,), max_iter=MLP_MAX_EPOCHS, random_state=seed)
    with warnings.catch_warnings():  # hitting max_iter is reported by the R², not by a warning per run
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(rep_val, target_scaler.transform(y_val))
    prediction = target_scaler.inverse_transform(mlp.predict(rep_test).reshape(len(rep_test), -1))
    return _r2_per_latent(y_test, prediction, columns)


def evaluate(model: LatentModel, f_x: torch.nn.Module, f_t: torch.nn.Module, *, n_val: int, n_test: int,
             n_nonlinear: int, seed: int, mlp: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """R² of every latent from the image and the text representation:
    {"image"|"text": {"linear"|"nonlinear"[|"mlp"]: {latent: R²}}}."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    val_x, val_t, y_val, columns = encode(model, f_x, f_t, n_val, generator)
    test_x, test_t, y_test, _ = encode(model, f_x, f_t, n_test, generator)
    mlp_seed = seed if mlp else None
    return {"image": r2_scores(val_x, y_val, test_x, y_test, columns, n_nonlinear, mlp_seed),
            "text": r2_scores(val_t, y_val, test_t, y_test, columns, n_nonlinear, mlp_seed)}
