"""Brownian-bridge losses against float64 dense references written out here (torch.cdist / broadcasting).

Backends: "reference" and "auto" (the compiled CPU kernel) run in this process; "triton" runs here on CUDA, and
on CPU under Triton's interpreter in one child process (tests/interpreter.py), at small sizes.
"""
import pytest
import torch
import torch.nn.functional as F
from interpreter import device_for as _device
from interpreter import kernel_backends as _kernel_backends
from interpreter import run_interpreted
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close

import mmcl_fast
from mmcl_fast import BrownianBridgeLoss, brownian_bridge_loss

SIZES = [(1, 3), (2, 1), (7, 5), (33, 17), (70, 64)]


def _features(n, d, dtype, device="cpu", near=None, noise=0.3):
    """Unit rows (rounded to `dtype`), optionally a noisy copy of `near`; leaves that require grad."""
    base = torch.randn(n, d, dtype=torch.float64) if near is None else near.detach().double().cpu()
    if near is not None:
        base = base + noise * torch.randn(n, d, dtype=torch.float64)
    return F.normalize(base, dim=1).to(device=device, dtype=dtype).requires_grad_(True)


def _triplet(n, d, dtype, device="cpu"):
    image = _features(n, d, dtype, device)
    text = _features(n, d, dtype, device, near=image, noise=1.0)
    augmented = _features(n, d, dtype, device, near=image, noise=0.3)
    return image, text, augmented


def _per_sample_t(n, device="cpu"):
    return (0.1 + 0.8 * torch.rand(n, dtype=torch.float32, device=device)).requires_grad_(True)


# ------------------------------------------------------------------------------------------------
# float64 dense references
# ------------------------------------------------------------------------------------------------

def dense_pairwise(image, text, augmented, t):
    t = t[:, None] if isinstance(t, torch.Tensor) and t.dim() == 1 else t
    mix = t * image + (1 - t) * text
    bridge = mix / mix.norm(dim=1, keepdim=True)
    return ((augmented - bridge) ** 2).sum(1).mean()


def dense_contrastive_scalar_t(image, text, augmented, t):
    bridge = t * image + (1 - t) * text
    logits = -torch.cdist(augmented, bridge) ** 2 / (2 * t * (1 - t))
    return F.cross_entropy(logits, torch.arange(image.shape[0], device=image.device))


def dense_contrastive_per_sample_t(image, text, augmented, t):
    # bridge[i, j] = t_i v_j + (1 - t_i) w_j: the (N, N, D) tensor the fused path never forms.
    bridge = t[:, None, None] * image[None] + (1 - t)[:, None, None] * text[None]
    sq_dist = ((augmented[:, None, :] - bridge) ** 2).sum(-1)
    logits = -sq_dist / (2 * t * (1 - t))[:, None]
    return F.cross_entropy(logits, torch.arange(image.shape[0], device=image.device))


def positive_affine_terms(image, text, augmented, t):
    """The two parts of the positives' logits in the affine form the primitive sees (the row term
    -||a_i||^2 / (2 sigma_i^2) cancels and is dropped): <a_i, mu_i> / sigma_i^2 and -||mu_i||^2 / (2 sigma_i^2),
    stacked as (2, N). Their size is the size of what the log-sum-exp cancels."""
    t = t[:, None] if isinstance(t, torch.Tensor) and t.dim() == 1 else t
    bridge = t * image + (1 - t) * text
    inv_var = 1 / (t * (1 - t))
    if isinstance(inv_var, torch.Tensor):
        inv_var = inv_var.reshape(-1)
    return torch.stack([inv_var * (augmented * bridge).sum(1), -0.5 * inv_var * (bridge * bridge).sum(1)])


def _leaves64(*tensors):
    return [t.detach().double().requires_grad_(True) for t in tensors]


def _check_against_reference(loss_fn, dense_fn, tensors, dtype, t_rtol=None, floor_fn=None):
    """Run `loss_fn` on `tensors` and compare its loss and gradients with the float64 reference (`_compare`)."""
    loss = loss_fn(*tensors)
    _compare(loss, torch.autograd.grad(loss, tensors), dense_fn, tensors, dtype, t_rtol, floor_fn)


def _compare(loss, grads, dense_fn, tensors, dtype, t_rtol=None, floor_fn=None):
    """Loss and every input gradient vs the float64 dense reference on the same rounded inputs.

    `floor_fn(*inputs64) -> (K, N)`: for a cross-entropy, the parts of the positives' logits that the log-sum-exp
    cancels. The loss is lse_i - positive_i and its gradient sum_j p_ij dL_ij - dL_ii, so when the positives
    dominate (loss -> 0, as with N = 2, D = 1) the error is that of the cancelling terms: it is measured against
    their size, each part's value and mean-gradient separately (the `floor` of tests/tolerances.py, which only
    ever applies when it exceeds max|expected|)."""
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_inputs = _leaves64(*tensors)
    expected = dense_fn(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, ref_inputs)
    loss_floor, grad_floors = 0.0, [0.0] * len(tensors)
    if floor_fn is not None:
        floor_inputs = _leaves64(*tensors)
        parts = floor_fn(*floor_inputs)
        loss_floor = parts.abs().max().item()
        for part in parts:
            part_grads = torch.autograd.grad(part.mean(), floor_inputs, retain_graph=True, allow_unused=True)
            grad_floors = [max(floor, 0.0 if g is None else g.abs().max().item())
                           for floor, g in zip(grad_floors, part_grads)]
    assert_rel_close(loss, expected, LOSS_RTOL[dtype], "loss", floor=loss_floor)
    names = ["d_image", "d_text", "d_augmented", "d_t"]
    for name, grad, expected_grad, tensor, floor in zip(names, grads, expected_grads, tensors, grad_floors):
        assert grad.dtype == tensor.dtype
        rtol = GRAD_RTOL[tensor.dtype] if t_rtol is None or name != "d_t" else t_rtol
        assert_rel_close(grad, expected_grad, rtol, name, floor=floor)


# ------------------------------------------------------------------------------------------------
# pairwise (the paper's loss)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("t_kind", ["scalar", "per_sample"])
def test_pairwise_matches_reference(n, d, dtype, t_kind):
    image, text, augmented = _triplet(n, d, dtype)
    if t_kind == "scalar":
        _check_against_reference(lambda v, w, a: brownian_bridge_loss(v, w, a, 0.3),
                                 lambda v, w, a: dense_pairwise(v, w, a, 0.3), [image, text, augmented], dtype)
    else:
        t = _per_sample_t(n)
        _check_against_reference(lambda v, w, a, tt: brownian_bridge_loss(v, w, a, tt),
                                 lambda v, w, a, tt: dense_pairwise(v, w, a, tt), [image, text, augmented, t],
                                 dtype, t_rtol=GRAD_RTOL[torch.float32])


def test_pairwise_default_t_is_a_quarter():
    image, text, augmented = _triplet(9, 6, torch.float64)
    assert_rel_close(brownian_bridge_loss(image, text, augmented), dense_pairwise(image, text, augmented, 0.25),
                     LOSS_RTOL[torch.float64], "loss at default t")


def test_pairwise_zero_on_the_bridge():
    """An augmented view exactly on the normalised bridge costs nothing (to rounding), off it costs > 0."""
    image, text, _ = _triplet(16, 8, torch.float64)
    on_bridge = F.normalize(0.25 * image + 0.75 * text, dim=1)
    assert brownian_bridge_loss(image, text, on_bridge).abs() < 1e-12
    assert brownian_bridge_loss(image, text, image) > 1e-3


# ------------------------------------------------------------------------------------------------
# batch-contrastive (large batch, fused)
# ------------------------------------------------------------------------------------------------

def _contrastive_case(n, d, dtype, backend, t_kind):
    device = _device(backend)
    image, text, augmented = _triplet(n, d, dtype, device)
    if t_kind == "scalar":
        _check_against_reference(
            lambda v, w, a: brownian_bridge_loss(v, w, a, 0.25, mode="contrastive", backend=backend),
            lambda v, w, a: dense_contrastive_scalar_t(v, w, a, 0.25), [image, text, augmented], dtype,
            floor_fn=lambda v, w, a: positive_affine_terms(v, w, a, 0.25))
        return
    if t_kind == "scalar_tensor":
        t = torch.tensor(0.35, device=device, requires_grad=True)
        dense_fn = dense_contrastive_scalar_t
    else:
        t = _per_sample_t(n, device)
        dense_fn = dense_contrastive_per_sample_t
    _check_against_reference(
        lambda v, w, a, tt: brownian_bridge_loss(v, w, a, tt, mode="contrastive", backend=backend),
        dense_fn, [image, text, augmented, t], dtype, t_rtol=GRAD_RTOL[torch.float32],
        floor_fn=positive_affine_terms)


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t_kind", ["scalar", "scalar_tensor", "per_sample"])
def test_contrastive_matches_reference_dense_backend(n, d, dtype, t_kind):
    _contrastive_case(n, d, dtype, "reference", t_kind)


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t_kind", ["scalar", "per_sample"])
@pytest.mark.parametrize("backend", _kernel_backends())
def test_contrastive_matches_reference_kernel_backend(n, d, dtype, t_kind, backend):
    _contrastive_case(n, d, dtype, backend, t_kind)


# the Triton interpreter (CPU): a few small, awkward cases, all in one child process
INTERPRETED_CASES = [
    dict(id="scalar-n1-d3", n=1, d=3, dtype=torch.float32, t="scalar"),
    dict(id="scalar-n33-d17", n=33, d=17, dtype=torch.float32, t="scalar"),
    dict(id="scalar-bf16-n20-d8", n=20, d=8, dtype=torch.bfloat16, t="scalar"),
    dict(id="per-sample-n33-d17", n=33, d=17, dtype=torch.float32, t="per_sample"),
    dict(id="per-sample-bf16-n7-d5", n=7, d=5, dtype=torch.bfloat16, t="per_sample"),
]


def _interpreted_inputs(case):
    torch.manual_seed(sum(map(ord, case["id"])))
    tensors = list(_triplet(case["n"], case["d"], case["dtype"]))
    tensors.append(torch.tensor(0.25) if case["t"] == "scalar" else _per_sample_t(case["n"]))
    return [t.detach() for t in tensors]


def interpreted_bridge(case, inputs):
    """Runs in the interpreter child: our contrastive bridge on the Triton backend, loss and gradients."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    t = leaves[3] if case["t"] == "per_sample" else 0.25
    loss = brownian_bridge_loss(*leaves[:3], t, mode="contrastive", backend="triton")
    wrt = leaves if case["t"] == "per_sample" else leaves[:3]
    return {"loss": loss.detach(), "grads": [g.detach() for g in torch.autograd.grad(loss, wrt)]}


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(__file__, "interpreted_bridge",
                           [(case, _interpreted_inputs(case)) for case in INTERPRETED_CASES])


@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=[case["id"] for case in INTERPRETED_CASES])
def test_contrastive_matches_reference_triton_interpreted(interpreted, case):
    ours = interpreted[case["id"]]
    assert "error" not in ours, ours.get("error")
    image, text, augmented, t = _interpreted_inputs(case)
    if case["t"] == "scalar":
        _compare(ours["loss"], ours["grads"], lambda v, w, a: dense_contrastive_scalar_t(v, w, a, 0.25),
                 [image, text, augmented], case["dtype"],
                 floor_fn=lambda v, w, a: positive_affine_terms(v, w, a, 0.25))
    else:
        _compare(ours["loss"], ours["grads"], dense_contrastive_per_sample_t, [image, text, augmented, t],
                 case["dtype"], t_rtol=GRAD_RTOL[torch.float32], floor_fn=positive_affine_terms)


def test_contrastive_per_sample_t_equal_entries_equals_scalar_t():
    """The (2D + 3)-feature per-sample path and the D-feature scalar path agree when every t_i is the same."""
    image, text, augmented = _triplet(21, 11, torch.float64)
    per_sample = brownian_bridge_loss(image, text, augmented, torch.full((21,), 0.4, dtype=torch.float64),
                                      mode="contrastive", backend="reference")
    scalar = brownian_bridge_loss(image, text, augmented, 0.4, mode="contrastive", backend="reference")
    assert_rel_close(per_sample, scalar, LOSS_RTOL[torch.float64], "per-sample vs scalar t")


@pytest.mark.parametrize("backend", ["reference"] + _kernel_backends())
def test_contrastive_large_logits_stay_accurate(backend):
    """t close to 0 makes 1/sigma^2 ~ 50 and the logits ~ -100: no fixed shift survives that, the online LSE must."""
    image, text, augmented = _triplet(40, 8, torch.float32, _device(backend))
    _check_against_reference(
        lambda v, w, a: brownian_bridge_loss(v, w, a, 0.02, mode="contrastive", backend=backend),
        lambda v, w, a: dense_contrastive_scalar_t(v, w, a, 0.02), [image, text, augmented], torch.float32,
        floor_fn=lambda v, w, a: positive_affine_terms(v, w, a, 0.02))


# ------------------------------------------------------------------------------------------------
# modules and bad input
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["pairwise", "contrastive"])
def test_module_matches_function(mode):
    image, text, augmented = _triplet(12, 7, torch.float64)
    module = BrownianBridgeLoss(t=0.3, mode=mode, backend="reference")
    assert_rel_close(module(image, text, augmented),
                     brownian_bridge_loss(image, text, augmented, 0.3, mode=mode, backend="reference"),
                     LOSS_RTOL[torch.float64], "module")
    t = torch.rand(12, dtype=torch.float64) * 0.8 + 0.1
    assert_rel_close(module(image, text, augmented, t=t),
                     brownian_bridge_loss(image, text, augmented, t, mode=mode, backend="reference"),
                     LOSS_RTOL[torch.float64], "module with per-sample t")


def test_bad_inputs_raise_clear_errors():
    image, text, augmented = (x.detach() for x in _triplet(5, 4, torch.float32))
    with pytest.raises(ValueError, match="mode"):
        brownian_bridge_loss(image, text, augmented, mode="triangle")
    with pytest.raises(ValueError, match="mode"):
        BrownianBridgeLoss(mode="triangle")
    with pytest.raises(ValueError, match=r"t must lie strictly inside \(0, 1\)"):
        brownian_bridge_loss(image, text, augmented, 1.0, mode="contrastive")
    with pytest.raises(ValueError, match=r"t must lie strictly inside \(0, 1\)"):
        brownian_bridge_loss(image, text, augmented, torch.tensor([0.2, 0.0, 0.5, 0.5, 0.5]), mode="contrastive")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        brownian_bridge_loss(image, text, augmented, 1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        brownian_bridge_loss(image, text, augmented, float("nan"))
    with pytest.raises(ValueError, match=r"t must be .*\(5,\)"):
        brownian_bridge_loss(image, text, augmented, torch.full((6,), 0.3))
    with pytest.raises(TypeError, match="t must be a floating-point tensor"):
        brownian_bridge_loss(image, text, augmented, torch.tensor([1, 0, 1, 0, 1]))
    with pytest.raises(TypeError, match="t must be a number"):
        brownian_bridge_loss(image, text, augmented, "0.25")
    with pytest.raises(ValueError, match="augmented_image_features"):
        brownian_bridge_loss(image, text, augmented[:4])
    with pytest.raises(ValueError, match="text_features"):
        brownian_bridge_loss(image, text[:, :3], augmented)
    with pytest.raises(TypeError, match="text_features"):
        brownian_bridge_loss(image, text.double(), augmented)
    with pytest.raises(TypeError, match="image_features must be a torch.Tensor"):
        brownian_bridge_loss(image.tolist(), text, augmented)
    with pytest.raises(ValueError, match="backend"):
        brownian_bridge_loss(image, text, augmented, mode="contrastive", backend="gpu-please")


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_contrastive_no_quadratic_memory():
    """N=65536, D=256 fp32 forward+backward on the CPU kernel: peak RSS growth well under 6x the inputs
    (one N x N fp32 matrix would be 16 GiB)."""
    from rss import peak_rss_growth
    probe = peak_rss_growth("""
        import torch, mmcl_fast
        def make_inputs(n):
            tensors = [torch.randn(n, 256) for _ in range(3)]
            for t in tensors:
                t.div_(t.norm(dim=1, keepdim=True)).requires_grad_(True)
            return tensors
        def step(inputs):
            mmcl_fast.brownian_bridge_loss(*inputs, 0.25, mode="contrastive").backward()
    """, n=65536)
    ratio = probe["growth_bytes"] / probe["input_bytes"]
    print(f"contrastive bridge N=65536 D=256: peak RSS growth {probe['growth_bytes'] / 2**20:.0f} MiB "
          f"= {ratio:.2f} x inputs ({probe['input_bytes'] / 2**20:.0f} MiB)")
    assert ratio < 3.0, f"peak RSS growth {ratio:.2f} x the inputs"


@pytest.mark.parametrize("case", ["infonce_sqeuclidean", "bridge_contrastive_tensor_t", "bridge_pairwise_tensor_t",
                                  "uniformity"])
def test_torch_compile_fullgraph_of_the_latent_losses(case):
    """Compile without a graph break, with the eager loss and gradients: the squared norms take one input (an
    autograd.Function given one tensor twice is rejected), and a tensor t is range-checked inside the graph."""
    n, d = 24, 8
    x, y, aug = (torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_() for _ in range(3))
    t = torch.rand(n) * 0.8 + 0.1

    def step(x, y, aug):
        if case == "infonce_sqeuclidean":
            return mmcl_fast.infonce(x, y, 3.0, similarity="sqeuclidean")
        if case == "uniformity":
            return mmcl_fast.uniformity_loss(x)
        mode = "contrastive" if case == "bridge_contrastive_tensor_t" else "pairwise"
        return mmcl_fast.brownian_bridge_loss(x, y, aug, t, mode=mode)

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y, aug)
    loss.backward()
    grads = [t_.grad.clone() if t_.grad is not None else None for t_ in (x, y, aug)]
    x.grad = y.grad = aug.grad = None
    eager = step(x, y, aug)
    eager.backward()
    assert_rel_close(loss, eager, 1e-6, "compiled loss")
    for compiled_grad, leaf, name in zip(grads, (x, y, aug), ("x", "y", "aug")):
        if leaf.grad is not None:
            assert_rel_close(compiled_grad, leaf.grad, 1e-6, f"compiled d{name}")
