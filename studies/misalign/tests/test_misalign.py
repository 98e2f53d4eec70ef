"""The misalignment study (studies.misalign): generative model, loss, evaluator, CLI, and the paper's pattern."""
import argparse
import json
import os
import subprocess
import sys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from threadpoolctl import threadpool_limits

from studies.misalign import cli
from studies.misalign.data import (LAYER_CONDITION, LEAKY_SLOPE, N_MODALITY, N_SEMANTIC, BiasConfig, InvertibleMixer,
                                   LatentModel, paper_condition_threshold, wishart_identity)
from studies.misalign.evaluate import LATENTS, _r2_per_latent, latent_columns, latent_names, r2_scores
from studies.misalign.study import PRESETS, EvalConfig, run_study, sweep_settings
from studies.misalign.train import TrainConfig, contrastive_loss, lpsimclr_loss, make_encoder, train_encoders
from tests.tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close

BACKENDS = ("reference", "auto")


@pytest.fixture(autouse=True)
def _one_thread():
    """These are small ops: one thread is faster than two fighting over a shared CPU (as in --quick)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def _mixer(dim, seed, mixer="paper"):
    return InvertibleMixer(dim, generator=torch.Generator().manual_seed(seed), mixer=mixer)


# --------------------------------------------------------------------------------------------- the mixers

@pytest.mark.parametrize("kind", ["paper", "spectral"])
@pytest.mark.parametrize("dim", [1, 2, 8, 15])
def test_mixer_matches_plain_mlp_and_inverts(dim, kind):
    mixer = _mixer(dim, seed=dim, mixer=kind)
    assert mixer.weights.shape == (3, dim, dim)  # square, three layers, no bias parameters at all
    assert not any(p.requires_grad for p in mixer.parameters())
    z = torch.randn(500, dim, dtype=torch.float64) * 3
    w = mixer.weights.double()
    expected = F.leaky_relu(F.leaky_relu(z @ w[0].T, 0.2) @ w[1].T, 0.2) @ w[2].T
    x = mixer(z)
    assert_rel_close(x, expected, LOSS_RTOL[torch.float64], "mixer forward")
    assert_rel_close(mixer.inverse(x), z, LOSS_RTOL[torch.float64], "inverse(forward(z))")


@pytest.mark.parametrize("kind", ["paper", "spectral"])
@pytest.mark.parametrize("dim", [10, 15])
def test_mixer_is_well_conditioned(dim, kind):
    mixer = _mixer(dim, seed=100 + dim, mixer=kind)
    condition = paper_condition_threshold(dim) if kind == "paper" else LAYER_CONDITION
    for weight in mixer.weights.double():
        sv = torch.linalg.svdvals(weight)
        assert sv.max() / sv.min() <= condition * (1 + 1e-5)
    # The Jacobian at any point is W3 D2 W2 D1 W1 with D diagonal in {0.2, 1}: full rank with a bounded condition.
    bound = condition ** 3 / LEAKY_SLOPE ** 2
    for _ in range(5):
        point = torch.randn(dim, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: mixer(v[None])[0], point)
        sv = torch.linalg.svdvals(jac)
        assert sv.min() > 0 and sv.max() / sv.min() <= bound


@pytest.mark.parametrize("dim", [6, 15])
def test_paper_mixer_threshold_is_the_tenth_of_a_percent_quantile(dim):
    # An independent pool (numpy, other seed) of the paper code's candidates: column-normalised uniform matrices.
    rng = np.random.default_rng(dim + 1000)
    pool = rng.uniform(-1, 1, size=(10_000, dim, dim))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    conds = np.sort(np.linalg.cond(pool))
    threshold = paper_condition_threshold(dim)
    # The 0.1 % quantile of 25000 draws lies between the 0.03 % and the 0.3 % quantile of 10000 others.
    assert conds[3] < threshold < conds[30]
    weights = _mixer(dim, seed=dim).weights.double()
    assert torch.allclose(torch.linalg.vector_norm(weights, dim=1), torch.ones(3, dim, dtype=torch.float64),
                          atol=1e-6)  # unit-norm columns, as the paper code normalises them
    assert weights.abs().max() <= 1.0


def test_paper_mixers_are_worse_conditioned_than_the_spectral_ones():
    # Why "paper" is the default: the earlier mixers were about twice as well conditioned per layer.
    assert 2 * LAYER_CONDITION < paper_condition_threshold(15) < 9.5
    paper = max(torch.linalg.cond(w).item() for w in _mixer(15, 0).weights.double())
    assert paper > LAYER_CONDITION


def test_mixer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="mixer must be one of"):
        _mixer(5, 0, mixer="orthogonal")
    with pytest.raises(ValueError, match="mixer must be one of"):
        LatentModel(BiasConfig(), mixer="nope")


def test_mixers_differ_between_seeds_and_repeat_for_a_seed():
    assert torch.equal(_mixer(15, 3).weights, _mixer(15, 3).weights)
    assert not torch.allclose(_mixer(15, 3).weights, _mixer(15, 4).weights)


# --------------------------------------------------------------------------------------------- the bias masks

def test_selection_and_perturbation_masks():
    bias = BiasConfig(selection=(7, 0, 2, 5), perturbation=(2, 7))
    model = LatentModel(bias, seed=1)
    n = 40_000
    sample = model.sample(n, torch.Generator().manual_seed(2))
    assert sample.x.shape == (n, N_SEMANTIC + N_MODALITY)
    assert sample.t.shape == (n, 4 + N_MODALITY)
    changed = sample.s_tilde != sample.s
    for i in range(N_SEMANTIC):
        if i in (2, 7):
            rate = changed[:, i].double().mean().item()
            assert abs(rate - 0.75) < 5 * math.sqrt(0.75 * 0.25 / n), f"s{i} perturbed in {rate:.3f} of samples"
            shift = (sample.s_tilde - sample.s)[changed[:, i], i]
            assert abs(shift.mean().item()) < 0.03 and abs(shift.std().item() - 1) < 0.03  # ε ~ N(0, I)
        else:
            assert not changed[:, i].any(), f"s{i} is not in ρ but differs in the text"
    # The observations are the mixers applied to exactly the latents each modality should see.
    zx = torch.cat([sample.s, sample.m_x], 1).double()
    zt = torch.cat([sample.s_tilde[:, [0, 2, 5, 7]], sample.m_t], 1).double()
    assert_rel_close(model.g_x.inverse(sample.x.double()), zx, 1e-4, "image latents")
    assert_rel_close(model.g_t.inverse(sample.t.double()), zt, 1e-4, "text latents")
    assert bias.invariant == (0, 5) and bias.excluded == (1, 3, 4, 6, 8, 9)
    assert [bias.role(i) for i in (0, 1, 2)] == ["invariant", "excluded", "perturbed"]


def test_latents_are_independent_standard_normal():
    model = LatentModel(BiasConfig(), seed=0)
    sample = model.sample(50_000, torch.Generator().manual_seed(0))
    latents = torch.cat([sample.s, sample.m_x, sample.m_t], 1).double()
    cov = torch.cov(latents.T)
    assert (cov - torch.eye(20, dtype=torch.float64)).abs().max() < 0.04


def test_dependent_semantics_and_their_perturbation_follow_the_drawn_covariance():
    model = LatentModel(BiasConfig(perturbation=tuple(range(9)), dependent=True), seed=5)
    cov = model.covariance
    assert torch.equal(cov, cov.T) and torch.linalg.eigvalsh(cov).min() > 0
    assert not torch.allclose(cov, LatentModel(BiasConfig(dependent=True), seed=6).covariance)
    sample = model.sample(200_000, torch.Generator().manual_seed(5))
    s, shift = sample.s.double(), (sample.s_tilde - sample.s).double()
    assert_rel_close(torch.cov(s.T), cov, 0.03, "sample covariance of s")
    # ε ~ N(0, Σ) masked by independent Bernoulli(0.75) draws: Cov(shift)_ij = Σ_ij * P(both changed) on ρ.
    both = torch.full((N_SEMANTIC, N_SEMANTIC), 0.75 ** 2, dtype=torch.float64).fill_diagonal_(0.75)
    mask = torch.zeros(N_SEMANTIC, dtype=torch.float64)
    mask[:9] = 1
    assert_rel_close(torch.cov(shift.T), cov * both * torch.outer(mask, mask), 0.03, "covariance of s~ - s")
    # m_x and m_t: N(0, Σ_m), Σ_m ~ Wishart(5, I) (one draw for both, as the paper code's equal random states give),
    # independent of each other and of s.
    cov_m = model.modality_covariance
    assert cov_m.shape == (N_MODALITY, N_MODALITY) and not torch.allclose(cov_m, torch.eye(N_MODALITY).double())
    assert_rel_close(torch.cov(sample.m_x.double().T), cov_m, 0.03, "sample covariance of m_x")
    assert_rel_close(torch.cov(sample.m_t.double().T), cov_m, 0.03, "sample covariance of m_t")
    cross = torch.cov(torch.cat([sample.m_x, sample.m_t, sample.s], 1).double().T)
    scale = torch.sqrt(torch.diagonal(cross))
    correlation = cross / torch.outer(scale, scale)
    assert correlation[:N_MODALITY, N_MODALITY:].abs().max() < 0.02
    assert correlation[N_MODALITY:2 * N_MODALITY, 2 * N_MODALITY:].abs().max() < 0.02


def test_wishart_draws_have_the_wishart_moments():
    # Σ ~ Wishart(df=10, I): E[Σ] = 10 I, Var[Σ_ii] = 2 * 10, Var[Σ_ij] = 10 (i != j).
    generator = torch.Generator().manual_seed(0)
    n = 4000
    draws = torch.stack([wishart_identity(N_SEMANTIC, N_SEMANTIC, generator) for _ in range(n)])
    eye = torch.eye(N_SEMANTIC, dtype=torch.float64)
    assert (draws.mean(0) - 10 * eye).abs().max() < 5 * math.sqrt(20 / n)
    expected_var = 10 + 10 * eye
    assert ((draws.var(0) - expected_var).abs() / expected_var).max() < 0.15


def test_oracle_r2_matches_a_regression_on_the_invariant_block():
    bias = BiasConfig(selection=(0, 1, 2, 3, 6), perturbation=(2,), dependent=True)
    model = LatentModel(bias, seed=3)
    sample = model.sample(100_000, torch.Generator().manual_seed(3))
    s = sample.s.double().numpy()
    inv = list(bias.invariant)
    oracle = model.oracle_r2()
    for j in range(N_SEMANTIC):
        fit = LinearRegression().fit(s[:, inv], s[:, j])
        assert abs(fit.score(s[:, inv], s[:, j]) - oracle[f"s{j}"]) < 0.01
    # The text's value of the perturbed s2 (non-Gaussian: a Bernoulli mixture) from the invariant block.
    s_tilde = sample.s_tilde[:, 2].double().numpy()
    fit = LinearRegression().fit(s[:, inv], s_tilde)
    assert abs(fit.score(s[:, inv], s_tilde) - oracle["s_tilde2"]) < 0.01
    assert 0 < oracle["s_tilde2"] < oracle["s2"]
    assert oracle["m_x"] == oracle["m_t"] == 0.0 and oracle["s_inv"] == 1.0
    independent = LatentModel(BiasConfig(selection=(0, 1, 2), perturbation=(1,)), seed=3).oracle_r2()
    assert [round(independent[f"s{j}"], 12) for j in range(N_SEMANTIC)] == [1, 0, 1] + [0] * 7


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(selection=(0, 1), perturbation=(2,)), ValueError, "perturbation must be a subset of selection"),
    (dict(selection=(0, 10)), ValueError, "selection index 10 is out of range"),
    (dict(selection=(0,), perturbation=(-1,)), ValueError, "perturbation index -1 is out of range"),
    (dict(selection=()), ValueError, "selection must keep at least one"),
    (dict(selection=(1, 2), perturbation=(1, 2)), ValueError, "leave at least one selected index unperturbed"),
    (dict(selection=(1, 1)), ValueError, "selection has repeated indices"),
    (dict(selection=(0, 1.0)), TypeError, "selection must hold ints"),
    (dict(selection="012"), TypeError, "selection must be a collection"),
])
def test_bias_config_rejects_bad_input(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        BiasConfig(**kwargs)


# --------------------------------------------------------------------------------------------- loss and training

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, dim, tau", [(1, 3, 1.0), (37, 5, 1.0), (128, 4, 0.5)])
def test_contrastive_loss_matches_dense_reference(backend, n, dim, tau):
    z_x = torch.randn(n, dim, requires_grad=True)
    z_t = (z_x.detach() + 0.5 * torch.randn(n, dim)).requires_grad_(True)
    loss = contrastive_loss(z_x, z_t, tau, backend)
    loss.backward()
    x64 = z_x.detach().double().requires_grad_(True)
    t64 = z_t.detach().double().requires_grad_(True)
    logits = -torch.cdist(x64, t64) ** 2 / tau
    labels = torch.arange(n)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    expected.backward()
    assert_rel_close(loss, expected, LOSS_RTOL[torch.float32], "loss")
    assert_rel_close(z_x.grad, x64.grad, GRAD_RTOL[torch.float32], "d z_x")
    assert_rel_close(z_t.grad, t64.grad, GRAD_RTOL[torch.float32], "d z_t")


def _lpsimclr_dense(z1, z2, z3, tau):
    """The paper code's LpSimCLR direction (p = 2, α = ½, positive in the denominator), written out densely."""
    negative = ((z1[:, None, :] - z3[None, :, :]) ** 2).sum(-1)
    positive = ((z1 - z2) ** 2).sum(-1)
    every = torch.cat([negative, positive[:, None]], dim=1)
    log_mean_exp = torch.logsumexp(-every / tau, dim=1) - math.log(every.shape[1])
    return (2 * (0.5 * positive / tau + 0.5 * log_mean_exp)).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, dim, tau", [(1, 3, 1.0), (37, 5, 1.0), (128, 4, 0.5)])
def test_lpsimclr_loss_matches_the_paper_formula(backend, n, dim, tau):
    z = [torch.randn(n, dim, requires_grad=True) for _ in range(4)]
    z[1] = (z[0].detach() + 0.5 * torch.randn(n, dim)).requires_grad_(True)
    loss = lpsimclr_loss(*z, tau, backend)
    loss.backward()
    z64 = [t.detach().double().requires_grad_(True) for t in z]
    expected = 0.5 * (_lpsimclr_dense(z64[0], z64[1], z64[2], tau) + _lpsimclr_dense(z64[1], z64[0], z64[3], tau))
    expected.backward()
    assert_rel_close(loss, expected, LOSS_RTOL[torch.float32], "loss")
    for name, ours, ref in zip(("z_x", "z_t", "z_x'", "z_t'"), z, z64):
        assert_rel_close(ours.grad, ref.grad, GRAD_RTOL[torch.float32], f"d {name}")


def test_lpsimclr_training_lowers_the_loss_and_draws_two_batches():
    model = LatentModel(BiasConfig(selection=(0, 1, 2, 3)), seed=1)
    cfg = TrainConfig(steps=150, batch=128, lr=3e-3, hidden=(4,), backend="reference", objective="lpsimclr", seed=1)
    history = train_encoders(model, cfg, log_every=10).history
    first, last = np.mean([v for _, v in history[:2]]), np.mean([v for _, v in history[-2:]])
    # half of the loss is the mean positive distance, so its drop is about half of the InfoNCE's over the same steps
    assert last < first - 0.25, f"loss went from {first:.3f} to {last:.3f}"
    clip = train_encoders(model, TrainConfig(steps=3, batch=16, hidden=(2,), backend="reference", seed=4))
    lp = train_encoders(model, TrainConfig(steps=3, batch=16, hidden=(2,), backend="reference", seed=4,
                                           objective="lpsimclr"))
    assert clip.history[0][1] != lp.history[0][1]


def test_training_is_deterministic_for_a_seed():
    model = LatentModel(BiasConfig(selection=(0, 1, 2), perturbation=(2,)), seed=0)

    def params(seed):
        cfg = TrainConfig(steps=4, batch=16, lr=1e-3, hidden=(2,), backend="reference", seed=seed)
        enc = train_encoders(model, cfg)
        return torch.cat([p.flatten() for p in [*enc.f_x.parameters(), *enc.f_t.parameters()]])

    state = torch.random.get_rng_state()
    first = params(7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's global RNG is left alone
    assert torch.equal(first, params(7))
    assert not torch.equal(first, params(8))


def test_training_lowers_the_loss():
    model = LatentModel(BiasConfig(selection=(0, 1, 2, 3)), seed=1)
    cfg = TrainConfig(steps=150, batch=128, lr=3e-3, hidden=(4,), backend="reference", seed=1)
    history = train_encoders(model, cfg, log_every=10).history
    first, last = np.mean([v for _, v in history[:2]]), np.mean([v for _, v in history[-2:]])
    assert last < first - 0.5, f"loss went from {first:.3f} to {last:.3f}"


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=0), "steps must be a positive int"), (dict(batch=1), "batch must be at least 2"),
    (dict(lr=-1.0), "lr must be a positive number"), (dict(hidden=(0,)), "hidden must be positive"),
    (dict(encoding_size=0), "encoding_size must be a positive int"),
    (dict(warmup=-1), "warmup must be a non-negative int"),
    (dict(objective="simclr"), "objective must be one of"),
    (dict(init="xavier"), "init must be one of"),
])
def test_train_config_rejects_bad_input(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**kwargs)


def test_kaiming_init_keeps_the_representation_at_unit_scale_in_every_direction():
    torch.manual_seed(0)
    enc = make_encoder(15, 5, (10, 10, 10), init="kaiming")
    linears = [m for m in enc if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 and all(torch.all(m.bias == 0) for m in linears)
    for m in linears[:-1]:  # He init for LeakyReLU(0.01): std sqrt(2 / (1 + 0.01²) / fan_in)
        expected = math.sqrt(2 / (1 + 0.01 ** 2) / m.weight.shape[1])
        assert abs(m.weight.std().item() / expected - 1) < 0.05
    x = torch.randn(20000, 15)
    with torch.no_grad():
        kaiming = torch.linalg.eigvalsh(torch.cov(enc(x).T))
        torch.manual_seed(0)
        default = torch.linalg.eigvalsh(torch.cov(make_encoder(15, 5, (10, 10, 10))(x).T))
    # PyTorch's default init shrinks every layer: the representation starts ~1e-3 of unit scale
    assert kaiming.max() > 0.3 and kaiming.min() > 0.01 and default.max() < 0.01
    with pytest.raises(ValueError, match="init must be one of"):
        make_encoder(3, 2, (2,), init="xavier")


def test_quick_runs_score_on_the_way_at_the_preset_steps_a_run_reaches():
    from studies.misalign.cli import _settings

    def at_steps(*argv):
        return _settings(_parser().parse_args([*argv]))[2].at_steps

    assert PRESETS["quick"]["train"]["steps"] == 48_000
    assert at_steps("--quick") == (12_000, 24_000, 36_000)
    assert at_steps("--quick", "--steps", "20000") == (12_000,)
    assert at_steps("--quick", "--steps", "20000", "--eval-at", "900,300") == (300, 900)
    assert at_steps() == ()


def test_presets_initialise_as_documented():
    assert PRESETS["paper"]["train"]["init"] == "torch" and PRESETS["quick"]["train"]["init"] == "kaiming"
    args = _parser().parse_args(["--quick", "--init", "torch"])
    assert cli._settings(args)[1].init == "torch"
    assert cli._settings(_parser().parse_args(["--quick"]))[1].init == "kaiming"
    assert cli._settings(_parser().parse_args([]))[1].init == "torch"


# --------------------------------------------------------------------------------------------- the evaluator

def test_r2_per_latent_matches_sklearn():
    y = np.random.default_rng(0).normal(size=(300, 20))
    pred = y + np.random.default_rng(1).normal(size=y.shape) * np.linspace(0.1, 2, 20)
    columns = {f"s{i}": slice(i, i + 1) for i in range(10)} | {"m_x": slice(10, 15), "m_t": slice(15, 20)}
    ours = _r2_per_latent(y, pred, columns)
    for name, cols in columns.items():
        assert abs(ours[name] - r2_score(y[:, cols], pred[:, cols])) < 1e-12


def test_regressors_find_linear_and_nonlinear_signal_and_nothing_else():
    rng = np.random.default_rng(0)
    y_all = rng.normal(size=(6000, 20))
    # representation: s0 linearly, s1 through a cube (invertible; a linear fit explains only 9/15 of it)
    rep = np.stack([y_all[:, 0], y_all[:, 1] ** 3, rng.normal(size=6000)], 1)
    columns = {f"s{i}": slice(i, i + 1) for i in range(10)} | {"m_x": slice(10, 15), "m_t": slice(15, 20)}
    columns["s_inv"] = [0, 1]
    scores = r2_scores(rep[:3000], y_all[:3000], rep[3000:], y_all[3000:], columns, n_nonlinear=1500, mlp_seed=0)
    assert scores["linear"]["s0"] > 0.999 and scores["nonlinear"]["s0"] > 0.99 and scores["mlp"]["s0"] > 0.95
    assert scores["nonlinear"]["s1"] > 0.75 and scores["linear"]["s1"] < 0.65 and scores["mlp"]["s1"] > 0.75
    # the block's R² is the mean of its coordinates' R² (scikit-learn's uniform average); exactly so for one fit
    # of all targets, nearly so for kernel ridge, whose (gamma, alpha) is chosen per latent
    for kind in ("linear", "mlp"):
        assert abs(scores[kind]["s_inv"] - 0.5 * (scores[kind]["s0"] + scores[kind]["s1"])) < 1e-12
    assert abs(scores["nonlinear"]["s_inv"] - 0.5 * (scores["nonlinear"]["s0"] + scores["nonlinear"]["s1"])) < 0.02
    for name in LATENTS[2:]:
        assert abs(scores["linear"][name]) < 0.02 and scores["nonlinear"][name] < 0.02
        assert scores["mlp"][name] < 0.05


def test_latent_columns_hold_the_block_and_the_perturbed_text_values():
    bias = BiasConfig(selection=(0, 2, 5, 7), perturbation=(2, 7))
    sample = LatentModel(bias, seed=0).sample(50, torch.Generator().manual_seed(0))
    values, columns = latent_columns(sample, bias)
    assert list(columns) == list(latent_names(bias)) == [*LATENTS, "s_inv", "s_tilde2", "s_tilde7"]
    assert np.array_equal(values[:, columns["s_inv"]], sample.s[:, [0, 5]].double().numpy())
    assert np.array_equal(values[:, columns["s_tilde7"]][:, 0], sample.s_tilde[:, 7].double().numpy())
    assert np.array_equal(values[:, columns["m_t"]], sample.m_t.double().numpy())


# --------------------------------------------------------------------------------------------- the command line

def _parser():
    """The parser `python -m studies.misalign` builds (cli.main), kept here to reach the parsed arguments."""
    parser = argparse.ArgumentParser(prog=cli.PROG)
    cli.add_arguments(parser)
    parser.set_defaults(func=cli.run, _parser=parser)
    return parser


def test_help_runs_from_the_repository_root():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    done = subprocess.run([sys.executable, "-m", "studies.misalign", "--help"], capture_output=True, text=True,
                          cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: python -m studies.misalign")
    for flag in ("--quick", "--selection", "--perturbation", "--sweep", "--backend", "--threads", "--out"):
        assert flag in done.stdout, flag


@pytest.mark.parametrize("argv, words", [
    (["--selection", "0,1", "--perturbation", "2"], "perturbation must be a subset of selection"),
    (["--selection", "0,12"], "index 12 is out of range"),
    (["--perturbation", "-1"], "index -1 is out of range"),
    (["--selection", "a,b"], "comma-separated semantic indices"),
    (["--selection", "3", "--perturbation", "3"], "leave at least one selected index unperturbed"),
    (["--steps", "0"], "positive integer"),
    (["--backend", "gpu"], "invalid choice"),
    (["--backend", "triton", "--device", "cpu"], "backend='triton' needs CUDA tensors"),
    (["--device", "potato"], "--device must be a torch device"),
    (["--objective", "simclr"], "argument --objective: invalid choice"),
    (["--mixer", "orthogonal"], "argument --mixer: invalid choice"),
    (["--init", "xavier"], "argument --init: invalid choice"),
    (["--seeds", "0"], "argument --seeds: expected a positive integer"),
    (["--jobs", "x"], "argument --jobs: expected a positive integer"),
    (["--sweep", "dropout"], "argument --sweep: invalid choice"),
    (["--sweep", "selection", "--sweep-values", "0,3"], "sweep values for --sweep selection must lie in 1..10"),
    (["--sweep", "perturbation", "--sweep-values", "10"], "sweep values for --sweep perturbation must lie in 0..9"),
    (["--sweep-values", "1,1"], "argument --sweep-values: expected distinct comma-separated ints"),
    (["--sweep-values", "1,x"], "argument --sweep-values: expected distinct comma-separated ints, e.g. 1,5,10"),
    (["--hidden", "10,0"], "argument --hidden: expected comma-separated positive ints"),
    (["--sweep-values", "3"], "--sweep-values needs --sweep"),
    (["--eval-at", "4,4"], "argument --eval-at: expected distinct comma-separated training steps"),
    (["--eval-at", "0"], "argument --eval-at: expected distinct"),
    (["--quick", "--steps", "10", "--eval-at", "5,10"], "--eval-at steps must lie below --steps (10), got [10]"),
])
def test_cli_rejects_bad_arguments(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # with it, triton would accept CPU tensors
    parser = _parser()
    with pytest.raises(SystemExit) as info:
        args = parser.parse_args([*argv, "--out", str(tmp_path)])
        args.func(args)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_end_to_end_run_writes_results_and_heatmap(backend, tmp_path, capsys):
    out = tmp_path / "run"
    args = _parser().parse_args(["--quick", "--selection", "0,1,2,5", "--perturbation", "5",
                                 "--steps", "15", "--batch", "64", "--eval-samples", "300", "--seed", "3",
                                 "--backend", backend, "--no-progress", "--out", str(out)])
    assert args.func(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [3, 4, 5]  # --quick defaults to three seeds, from --seed on
    names = [*LATENTS, "s_inv", "s_tilde5"]
    assert results["latents"] == names
    for section in ("r2", "text_r2"):
        assert set(results[section]) == {"linear", "nonlinear"}
        for kind in ("linear", "nonlinear"):
            assert list(results[section][kind]) == names
            by_seed = results[section + "_by_seed"][kind]
            for name in names:
                values = by_seed[name]
                assert len(values) == 3 and all(math.isfinite(v) and v <= 1 for v in values)
                assert abs(results[section][kind][name] - np.mean(values)) < 1e-12
                assert abs(results[section + "_std"][kind][name] - np.std(values, ddof=1)) < 1e-12
    assert results["r2_by_seed"]["nonlinear"]["s0"][0] != results["r2_by_seed"]["nonlinear"]["s0"][1]
    assert len(results["oracle_r2_by_seed"]["s3"]) == 3 and set(results["loss_history_by_seed"]) == {"3", "4", "5"}
    check = results["pattern_check"]
    assert check["invariant_min"] == [min(results["r2_by_seed"]["nonlinear"][f"s{i}"][k] for i in (0, 1, 2))
                                      for k in range(3)]
    config = results["config"]
    assert config["selection"] == [0, 1, 2, 5] and config["perturbation"] == [5] and config["steps"] == 15
    assert config["batch"] == 64 and config["backend"] == backend and config["encoding_size"] == 3
    assert config["objective"] == "clip" and config["mixer"] == "paper"
    assert results["roles"]["s5"] == "perturbed" and results["roles"]["s9"] == "excluded"
    assert results["roles"]["s_inv"] == "block" and results["roles"]["s_tilde5"] == "text_value"
    png = (out / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "R² of each latent" in capsys.readouterr().out

    combined = tmp_path / "combined"
    args = _parser().parse_args(["--combine", str(out), str(out), "--out", str(combined)])
    assert args.func(args) == 0
    assert (combined / "heatmap_combined.png").read_bytes()[:4] == b"\x89PNG"


def test_tiny_run_is_deterministic(tmp_path):
    def run(name, *extra):
        args = _parser().parse_args(["--quick", "--selection", "0,1", "--steps", "5", "--batch", "32",
                                     "--eval-samples", "200", "--backend", "reference", "--no-progress",
                                     "--seeds", "2", "--out", str(tmp_path / name), *extra])
        args.func(args)
        results = json.loads((tmp_path / name / "results.json").read_text())
        return results["r2_by_seed"], results["text_r2_by_seed"], results["loss_history_by_seed"]

    assert run("a") == run("b")
    assert run("c", "--jobs", "2") == run("a")  # seeds in worker processes give the same numbers


def test_scores_on_the_way_match_a_shorter_run_and_leave_the_run_alone(tmp_path, capsys):
    def run(name, steps, *extra):
        args = _parser().parse_args(["--quick", "--selection", "0,1,3", "--perturbation", "3",
                                     "--steps", str(steps), "--batch", "32", "--eval-samples", "200", "--seeds", "2",
                                     "--backend", "reference", "--no-progress", "--out", str(tmp_path / name),
                                     *extra])
        assert args.func(args) == 0
        return json.loads((tmp_path / name / "results.json").read_text())

    plain, watched, short = run("plain", 9), run("watched", 9, "--eval-at", "6,3"), run("short", 6)
    assert "after 3 steps" in capsys.readouterr().out
    for key in ("r2_by_seed", "text_r2_by_seed", "loss_history_by_seed"):
        assert watched[key] == plain[key], key  # scoring on the way does not disturb training
    assert plain["checkpoints"] == [] and watched["config"]["eval_at"] == [3, 6]
    assert [point["step"] for point in watched["checkpoints"]] == [3, 6]
    at6 = watched["checkpoints"][1]
    assert at6["r2_by_seed"] == short["r2_by_seed"] and at6["text_r2_by_seed"] == short["text_r2_by_seed"]
    assert at6["pattern_check"] == short["pattern_check"]
    assert watched["checkpoints"][0]["r2_by_seed"] != at6["r2_by_seed"]

    run("seed0", 9, "--eval-at", "3,6", "--seeds", "1")
    run("seed1", 9, "--eval-at", "3,6", "--seeds", "1", "--seed", "1")
    args = _parser().parse_args(["--merge", str(tmp_path / "seed1"), str(tmp_path / "seed0"),
                                 "--out", str(tmp_path / "merged")])
    assert args.func(args) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["checkpoints"] == watched["checkpoints"] and merged["r2_by_seed"] == watched["r2_by_seed"]


def test_merge_of_seeds_run_apart_equals_the_run_of_all_seeds(tmp_path, capsys):
    def run(name, *extra):
        args = _parser().parse_args(["--quick", "--selection", "0,1,3", "--perturbation", "3",
                                     "--steps", "5", "--batch", "32", "--eval-samples", "200",
                                     "--backend", "reference", "--no-progress", "--out", str(tmp_path / name), *extra])
        assert args.func(args) == 0
        return tmp_path / name

    together = json.loads((run("together", "--seed", "4", "--seeds", "3") / "results.json").read_text())
    parts = [run("seed6", "--seed", "6", "--seeds", "1"), run("seed4", "--seed", "4", "--seeds", "2")]
    args = _parser().parse_args(["--merge", *map(str, parts), "--out", str(tmp_path / "merged")])
    assert args.func(args) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["seeds"] == [4, 5, 6]  # sorted by seed, whatever the order of the directories
    for key in ("r2", "r2_std", "r2_by_seed", "text_r2", "text_r2_std", "text_r2_by_seed", "oracle_r2",
                "oracle_r2_by_seed", "roles", "latents", "loss_history_by_seed", "pattern_check"):
        assert merged[key] == together[key], key  # the same per-seed values in the same order: bit-equal stats
    assert {k: v for k, v in merged["config"].items() if k != "jobs"} == \
        {k: v for k, v in together["config"].items() if k != "jobs"}
    assert [entry["seeds"] for entry in merged["merged_from"]] == [[6], [4, 5]]
    assert (tmp_path / "merged" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    for argv, words in [([str(parts[1]), str(parts[1])], "seed(s) [4, 5] appear in more than one run"),
                        ([str(parts[0]), str(run("steps6", "--seed", "7", "--seeds", "1", "--steps", "6"))],
                         "config 'steps' differs (5 vs 6)"),
                        ([str(tmp_path / "nowhere")], "no results.json in"),
                        ]:
        with pytest.raises(SystemExit) as info:
            args = _parser().parse_args(["--merge", *argv, "--out", str(tmp_path / "bad")])
            args.func(args)
        assert info.value.code == 2
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit):
        args = _parser().parse_args(["--merge", str(parts[0]), "--combine", str(parts[0])])
        args.func(args)
    assert "--combine and --merge are separate jobs" in capsys.readouterr().err


def test_tiny_lpsimclr_run_with_the_mlp_regressor(tmp_path):
    out = tmp_path / "lp"
    args = _parser().parse_args(["--quick", "--selection", "0,1,3", "--perturbation", "3",
                                 "--dependent", "--steps", "5", "--batch", "32", "--eval-samples", "200",
                                 "--seeds", "1", "--objective", "lpsimclr", "--mlp-regressor", "--no-progress",
                                 "--out", str(out)])
    assert args.func(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["objective"] == "lpsimclr" and results["config"]["mlp_regressor"] is True
    assert set(results["r2"]) == {"linear", "nonlinear", "mlp"} and len(results["r2_by_seed"]["mlp"]["s0"]) == 1
    assert results["r2_std"]["mlp"]["s0"] == 0.0
    assert 0 < results["oracle_r2"]["s_tilde3"] < 1 and results["oracle_r2"]["s_inv"] == 1.0


def test_run_study_rejects_bad_seeds_and_jobs():
    bias, cfg, eval_cfg = BiasConfig(selection=(0,)), TrainConfig(steps=1, batch=4), EvalConfig(10, 10, 10)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_study(bias, cfg, eval_cfg, seeds=[1, 1])
    with pytest.raises(ValueError, match="jobs must be a positive int"):
        run_study(bias, cfg, eval_cfg, seeds=[1], jobs=0)


def test_sweep_settings_follow_the_paper():
    selection = sweep_settings("selection")
    assert [k for k, _ in selection] == list(range(1, 11))
    assert all(b.selection == tuple(range(k)) and b.perturbation == () for k, b in selection)
    perturbation = sweep_settings("perturbation", dependent=True)
    assert [k for k, _ in perturbation] == list(range(10))
    assert all(b.selection == tuple(range(10)) and b.perturbation == tuple(range(k)) and b.dependent
               for k, b in perturbation)
    assert perturbation[9][1].invariant == (9,)


def test_tiny_sweep_writes_one_run_per_k_and_a_plot(tmp_path):
    out = tmp_path / "sweep"
    args = _parser().parse_args(["--quick", "--sweep", "perturbation", "--sweep-values", "0,4",
                                 "--steps", "5", "--batch", "32", "--eval-samples", "200", "--no-progress",
                                 "--out", str(out)])
    assert args.func(args) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["sweep"] == "perturbation" and summary["seeds"] == [0]  # one seed per sweep point by default
    assert [point["k"] for point in summary["points"]] == [0, 4]
    assert summary["points"][1]["perturbation"] == [0, 1, 2, 3] and summary["points"][1]["roles"]["s3"] == "perturbed"
    for k in (0, 4):
        results = json.loads((out / f"k{k}" / "results.json").read_text())
        assert results["config"]["k"] == k and results["config"]["sweep"] == "perturbation"
        assert summary["points"][[0, 4].index(k)]["r2"] == results["r2"]
    assert (out / "sweep_perturbation.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_points_run_in_parallel_workers_give_the_sequential_numbers(tmp_path):
    def sweep(name, *extra):
        args = _parser().parse_args(["--quick", "--sweep", "selection", "--sweep-values", "2,3",
                                     "--seeds", "2", "--steps", "5", "--batch", "32", "--eval-samples", "200",
                                     "--backend", "reference", "--no-progress", "--out", str(tmp_path / name),
                                     *extra])
        assert args.func(args) == 0
        summary = json.loads((tmp_path / name / "sweep.json").read_text())
        runs = [json.loads((tmp_path / name / f"k{k}" / "results.json").read_text()) for k in (2, 3)]
        return summary, runs

    sequential, runs_seq = sweep("sequential")
    parallel, runs_par = sweep("parallel", "--jobs", "3")  # 4 (k, seed) jobs over 3 workers
    assert [p["r2"] for p in parallel["points"]] == [p["r2"] for p in sequential["points"]]
    for seq, par in zip(runs_seq, runs_par):
        assert par["seeds"] == seq["seeds"] == [0, 1]
        assert par["r2_by_seed"] == seq["r2_by_seed"] and par["loss_history_by_seed"] == seq["loss_history_by_seed"]
        assert par["config"]["k"] == seq["config"]["k"] and par["config"]["jobs"] == 3
    for k in (2, 3):
        assert sorted(p.name for p in (tmp_path / "parallel" / f"k{k}").glob("seed_*.json")) == \
            ["seed_0.json", "seed_1.json"]
        assert (tmp_path / "parallel" / f"k{k}" / "heatmap.png").is_file()


# --------------------------------------------------------------------------------------------- the paper's pattern
# Acceptance: quick mode, three seeds, both objectives, on settings the preset was not tuned on
# (tuned on θ = {0..5}, ρ = {4, 5}); every seed must show the pattern, not only the mean. "acceptance" is the
# setting the acceptance runs were checked on; "heldout" was chosen before any run of it, after the preset's step
# count had been set from runs on "acceptance" (PRESETS in studies/misalign/study.py). The 48k-step preset was then
# set from a failing run on "heldout" (and a sweep point), so "heldout" is a tuning setting too; "fresh" was drawn at
# random (random.Random(20261201): a θ of 6-8 indices, ρ two of them) before any run of it, after the 48k preset was
# set.

SETTINGS = {"acceptance": ["--selection", "0,1,2,3,6,7,8", "--perturbation", "2,7"],
            "heldout": ["--selection", "1,2,4,5,7,9", "--perturbation", "4,9"],
            "fresh": ["--selection", "0,1,2,3,6,9", "--perturbation", "0,1"]}


def _quick_run(tmp_path, argv):
    args = _parser().parse_args(["--quick", "--no-progress", "--jobs", "2", "--out", str(tmp_path),
                                 *argv])
    assert args.func(args) == 0
    return json.loads((tmp_path / "results.json").read_text())


def _by_role(results) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in [f"s{i}" for i in range(10)] + ["m_x", "m_t"]:
        out.setdefault(results["roles"][name], []).append(name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("objective", ["clip", "lpsimclr"])
def test_quick_mode_recovers_exactly_the_invariant_semantics_for_every_seed(objective, setting, tmp_path):
    results = _quick_run(tmp_path, [*SETTINGS[setting], "--objective", objective, "--seeds", "3"])
    by_seed, roles_ = results["r2_by_seed"]["nonlinear"], _by_role(results)
    assert len(roles_["invariant"]) >= 4 and roles_["perturbed"] and roles_["excluded"]
    for k, seed in enumerate(results["seeds"]):
        for name in roles_["invariant"]:
            assert by_seed[name][k] >= 0.8, f"seed {seed}: invariant {name}: R² {by_seed[name][k]:.2f}"
        for name in roles_["perturbed"] + roles_["excluded"] + roles_["specific"]:
            assert by_seed[name][k] <= 0.3, f"seed {seed}: {name}: R² {by_seed[name][k]:.2f}"


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("objective", ["clip", "lpsimclr"])
def test_quick_mode_dependent_case_recovers_what_the_invariant_block_predicts_for_every_seed(objective, setting,
                                                                                             tmp_path):
    results = _quick_run(tmp_path, [*SETTINGS[setting], "--dependent", "--objective", objective, "--seeds", "3"])
    by_seed, oracle, roles_ = results["r2_by_seed"]["nonlinear"], results["oracle_r2_by_seed"], _by_role(results)
    for k, seed in enumerate(results["seeds"]):
        for name in roles_["invariant"]:
            assert by_seed[name][k] >= 0.8, f"seed {seed}: invariant {name}: R² {by_seed[name][k]:.2f}"
        for name in roles_["perturbed"] + roles_["excluded"]:  # what the invariant block predicts, no more or less
            gap = by_seed[name][k] - oracle[name][k]
            assert abs(gap) <= 0.1, f"seed {seed}: {name}: R² {by_seed[name][k]:.2f}, oracle {oracle[name][k]:.2f}"
        for name in roles_["specific"]:
            assert by_seed[name][k] <= 0.3, f"seed {seed}: {name}: R² {by_seed[name][k]:.2f}"
