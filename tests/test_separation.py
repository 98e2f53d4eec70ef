"""Uniformity and deep feature-separation losses against float64 dense references (torch.cdist, cross_entropy).

Backends: "reference" and "auto" (the compiled CPU kernel) run in this process; "triton" runs here on CUDA, and
on CPU under Triton's interpreter in one child process (tests/interpreter.py), at small sizes.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from interpreter import device_for as _device
from interpreter import kernel_backends as _kernel_backends
from interpreter import run_interpreted
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close

from mmcl_fast import FeatureSeparationLoss, UniformityLoss, feature_separation_loss, uniformity_loss

SIZES = [(1, 3), (2, 1), (7, 5), (33, 17), (70, 64)]


def _unit(n, d, dtype, device="cpu", near=None, noise=0.5):
    base = torch.randn(n, d, dtype=torch.float64)
    if near is not None:
        base = near.detach().double().cpu() + noise * base
    return F.normalize(base, dim=1).to(device=device, dtype=dtype).requires_grad_(True)


def _leaves64(tensors):
    return [t.detach().double().requires_grad_(True) for t in tensors]


def _check(loss_fn, dense_fn, tensors, dtype, names, grad_floors=None):
    """Run `loss_fn` on `tensors` and compare its loss and gradients with the float64 reference (`_compare`)."""
    loss = loss_fn(*tensors)
    _compare(loss, torch.autograd.grad(loss, tensors), dense_fn, tensors, dtype, names, grad_floors)


def _compare(loss, grads, dense_fn, tensors, dtype, names, grad_floors=None):
    """Loss and every input gradient vs the float64 dense reference on the same rounded inputs. The floors are the
    sizes of the terms that cancel in a quantity that can come out near 0 (tests/tolerances.py, `floor`)."""
    grad_floors = grad_floors or [0.0] * len(tensors)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = _leaves64(tensors)
    expected = dense_fn(*ref)
    expected_grads = torch.autograd.grad(expected, ref)
    assert_rel_close(loss, expected, LOSS_RTOL[dtype], "loss")
    for name, grad, expected_grad, tensor, floor in zip(names, grads, expected_grads, tensors, grad_floors):
        assert grad.dtype == tensor.dtype
        assert_rel_close(grad, expected_grad, GRAD_RTOL[tensor.dtype], name, floor=floor)


# ------------------------------------------------------------------------------------------------
# float64 dense references
# ------------------------------------------------------------------------------------------------

def dense_uniformity(x, t=2.0):
    sq_dist = torch.cdist(x, x) ** 2
    return torch.log(torch.exp(-t * sq_dist).mean())


def dense_separation(image, text, image_indep, text_indep, image_indep_aug, text_indep_aug, temperature=0.07,
                     t=2.0):
    n = image.shape[0]
    diag = torch.arange(n, device=image.device)
    ortho = ((image * image_indep).sum(1) ** 2 + (text * text_indep).sum(1) ** 2).mean()
    contrast = (F.cross_entropy(image_indep @ image_indep_aug.T / temperature, diag)
                + F.cross_entropy(text_indep @ text_indep_aug.T / temperature, diag))
    uniform = dense_uniformity(image_indep, t) + dense_uniformity(text_indep, t)
    return ortho + contrast + uniform


# ------------------------------------------------------------------------------------------------
# uniformity
# ------------------------------------------------------------------------------------------------

def _uniformity_case(n, d, dtype, backend, t=2.0):
    x = _unit(n, d, dtype, _device(backend))
    _check(lambda v: uniformity_loss(v, t, backend=backend), lambda v: dense_uniformity(v, t), [x], dtype, ["d_x"])


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniformity_matches_reference_dense_backend(n, d, dtype):
    _uniformity_case(n, d, dtype, "reference")


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", _kernel_backends())
def test_uniformity_matches_reference_kernel_backend(n, d, dtype, backend):
    _uniformity_case(n, d, dtype, backend)


@pytest.mark.parametrize("backend", ["reference"] + _kernel_backends())
def test_uniformity_temperature_and_its_gradient(backend):
    """A 0-d tensor t that requires grad: value and d/dt against the reference, at a large t (logits ~ -40).

    d/dt = -E_p ||x_j - x_k||^2 is small when the softmax sits on the diagonal; in the affine form it is the sum
    of 2<x_j, x_k> - ||x_j||^2 - ||x_k||^2, whose parts are of size 2 max ||x||^2 = 2: its floor."""
    x = _unit(29, 6, torch.float32, _device(backend))
    t = torch.tensor(10.0, device=x.device, requires_grad=True)
    _check(lambda v, tt: uniformity_loss(v, tt, backend=backend), dense_uniformity, [x, t], torch.float32,
           ["d_x", "d_t"], grad_floors=[0.0, 2.0])


def test_uniformity_of_identical_points_is_zero_and_spread_is_negative():
    same = torch.ones(5, 3, dtype=torch.float64) / math.sqrt(3)
    assert abs(uniformity_loss(same).item()) < 1e-12
    assert uniformity_loss(_unit(64, 3, torch.float64)).item() < -0.5


# ------------------------------------------------------------------------------------------------
# feature separation
# ------------------------------------------------------------------------------------------------

def _separation_inputs(n, d, dtype, device="cpu"):
    image = _unit(n, d, dtype, device)
    text = _unit(n, d, dtype, device, near=image, noise=1.0)
    image_indep = _unit(n, d, dtype, device)
    text_indep = _unit(n, d, dtype, device)
    image_indep_aug = _unit(n, d, dtype, device, near=image_indep, noise=0.3)
    text_indep_aug = _unit(n, d, dtype, device, near=text_indep, noise=0.3)
    return [image, text, image_indep, text_indep, image_indep_aug, text_indep_aug]


SEPARATION_NAMES = ["d_image", "d_text", "d_image_indep", "d_text_indep", "d_image_indep_aug", "d_text_indep_aug"]


def _infonce_grad_floors(tensors, temperature):
    """The InfoNCE gradients (sum_j p_ij y_j - y_i) / (tau N) cancel when the positives dominate (e.g. N = 2,
    D = 1, where they are ~1e-12): their errors are measured against the size of the parts, max|y| / (tau N)."""
    n = tensors[0].shape[0]
    part = [t.detach().abs().max().item() / (temperature * n) for t in tensors]
    return [0.0, 0.0, part[4], part[5], part[2], part[3]]


def _separation_case(n, d, dtype, backend):
    tensors = _separation_inputs(n, d, dtype, _device(backend))
    _check(lambda *z: feature_separation_loss(*z, backend=backend), dense_separation, tensors, dtype,
           SEPARATION_NAMES, grad_floors=_infonce_grad_floors(tensors, 0.07))


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_separation_matches_reference_dense_backend(n, d, dtype):
    _separation_case(n, d, dtype, "reference")


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", _kernel_backends())
def test_separation_matches_reference_kernel_backend(n, d, dtype, backend):
    _separation_case(n, d, dtype, backend)


# the Triton interpreter (CPU): a few small, awkward cases, all in one child process
INTERPRETED_CASES = [
    dict(id="uniformity-n1-d3", kind="uniformity", n=1, d=3, dtype=torch.float32),
    dict(id="uniformity-n33-d17", kind="uniformity", n=33, d=17, dtype=torch.float32),
    dict(id="uniformity-bf16-n20-d8", kind="uniformity", n=20, d=8, dtype=torch.bfloat16),
    dict(id="separation-n7-d5", kind="separation", n=7, d=5, dtype=torch.float32),
    dict(id="separation-bf16-n12-d6", kind="separation", n=12, d=6, dtype=torch.bfloat16),
]


def _interpreted_inputs(case):
    torch.manual_seed(sum(map(ord, case["id"])))
    if case["kind"] == "uniformity":
        return [_unit(case["n"], case["d"], case["dtype"]).detach()]
    return [t.detach() for t in _separation_inputs(case["n"], case["d"], case["dtype"])]


def interpreted_loss(case, inputs):
    """Runs in the interpreter child: our loss on the Triton backend, loss and gradients."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    if case["kind"] == "uniformity":
        loss = uniformity_loss(leaves[0], backend="triton")
    else:
        loss = feature_separation_loss(*leaves, backend="triton")
    return {"loss": loss.detach(), "grads": [g.detach() for g in torch.autograd.grad(loss, leaves)]}


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(__file__, "interpreted_loss",
                           [(case, _interpreted_inputs(case)) for case in INTERPRETED_CASES])


@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=[case["id"] for case in INTERPRETED_CASES])
def test_matches_reference_triton_interpreted(interpreted, case):
    ours = interpreted[case["id"]]
    assert "error" not in ours, ours.get("error")
    tensors = _interpreted_inputs(case)
    if case["kind"] == "uniformity":
        _compare(ours["loss"], ours["grads"], dense_uniformity, tensors, case["dtype"], ["d_x"])
    else:
        _compare(ours["loss"], ours["grads"], dense_separation, tensors, case["dtype"], SEPARATION_NAMES,
                 _infonce_grad_floors(tensors, 0.07))


def test_separation_temperature_tensor_and_t():
    tensors = _separation_inputs(19, 8, torch.float64)
    temperature = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    _check(lambda *z: feature_separation_loss(*z[:6], z[6], 3.0, backend="reference"),
           lambda *z: dense_separation(*z[:6], z[6], 3.0), tensors + [temperature], torch.float64,
           SEPARATION_NAMES + ["d_temperature"], grad_floors=_infonce_grad_floors(tensors, 0.2) + [0.0])


def test_modules_match_functions():
    tensors = [t.detach() for t in _separation_inputs(13, 6, torch.float64)]
    assert_rel_close(FeatureSeparationLoss(temperature=0.1, t=1.5, backend="reference")(*tensors),
                     feature_separation_loss(*tensors, 0.1, 1.5, backend="reference"), LOSS_RTOL[torch.float64],
                     "FeatureSeparationLoss")
    assert_rel_close(UniformityLoss(t=3.0, backend="reference")(tensors[2]),
                     uniformity_loss(tensors[2], 3.0, backend="reference"), LOSS_RTOL[torch.float64],
                     "UniformityLoss")


def test_bad_inputs_raise_clear_errors():
    tensors = [t.detach() for t in _separation_inputs(6, 4, torch.float32)]
    x = tensors[2]
    with pytest.raises(ValueError, match="t must be a positive"):
        uniformity_loss(x, 0.0)
    with pytest.raises(ValueError, match="t must be a positive"):
        uniformity_loss(x, float("inf"))
    with pytest.raises(TypeError, match="t must be a number"):
        uniformity_loss(x, "2")
    with pytest.raises(ValueError, match="t must be a scalar"):
        uniformity_loss(x, torch.ones(6))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        uniformity_loss(x.tolist())
    with pytest.raises(ValueError, match="x must be a 2-D"):
        uniformity_loss(x[0])
    with pytest.raises(ValueError, match="backend"):
        uniformity_loss(x, backend="abacus")
    with pytest.raises(ValueError, match="temperature must be a positive"):
        feature_separation_loss(*tensors, temperature=-0.07)
    with pytest.raises(ValueError, match="t must be a positive"):
        feature_separation_loss(*tensors, t=0.0)
    with pytest.raises(ValueError, match="image_indep_aug"):
        feature_separation_loss(*tensors[:4], tensors[4][:5], tensors[5])
    with pytest.raises(ValueError, match="text_indep"):
        feature_separation_loss(tensors[0], tensors[1], tensors[2], tensors[3][:, :3], *tensors[4:])
    with pytest.raises(TypeError, match="text_indep_aug"):
        feature_separation_loss(*tensors[:5], tensors[5].double())
    with pytest.raises(ValueError, match="same batch size"):
        feature_separation_loss(tensors[0], tensors[1][:5], tensors[2], tensors[3][:5], tensors[4], tensors[5][:5])


@pytest.mark.slow
def test_uniformity_no_quadratic_memory():
    """N=65536, D=256 fp32 forward+backward on the CPU kernel: peak RSS growth well under 6x the input
    (one N x N fp32 matrix would be 16 GiB). x plays both sides of the primitive, so its backward holds dx and dy
    and, inside the CPU kernel, their fp32 accumulators: about 4x the input, all O(N*D)."""
    from rss import peak_rss_growth
    probe = peak_rss_growth("""
        import torch, mmcl_fast
        def make_inputs(n):
            x = torch.randn(n, 256)
            x.div_(x.norm(dim=1, keepdim=True)).requires_grad_(True)
            return [x]
        def step(inputs):
            mmcl_fast.uniformity_loss(inputs[0]).backward()
    """, n=65536)
    ratio = probe["growth_bytes"] / probe["input_bytes"]
    print(f"uniformity N=65536 D=256: peak RSS growth {probe['growth_bytes'] / 2**20:.0f} MiB "
          f"= {ratio:.2f} x input ({probe['input_bytes'] / 2**20:.0f} MiB)")
    assert ratio < 4.5, f"peak RSS growth {ratio:.2f} x the input"


def test_weighted_clip_objective_example():
    """The README example: CLIP plus the three regularisers with weights, as modules, trains end to end.

    Each term is checked against its float64 dense formula elsewhere; here the weighted sum of the modules must
    equal the weighted sum of dense references, and every feature tensor must receive a gradient."""
    from mmcl_fast import BrownianBridgeLoss, ClipLoss, GeometricConsistencyLoss

    n, d = 24, 10
    names = ["image", "text", "image_aug", "text_aug", "image_indep", "text_indep", "image_indep_aug",
             "text_indep_aug"]
    out = {name: _unit(n, d, torch.float64) for name in names}
    logit_scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    weights = {"bridge": 0.5, "geometry": 0.1, "separation": 0.2}

    clip = ClipLoss(backend="reference")
    bridge = BrownianBridgeLoss(t=0.25, backend="reference")
    geometry = GeometricConsistencyLoss()
    separation = FeatureSeparationLoss(temperature=0.07, t=2.0, backend="reference")
    loss = (clip(out["image"], out["text"], logit_scale)
            + weights["bridge"] * bridge(out["image"], out["text"], out["image_aug"])
            + weights["geometry"] * geometry(out["image"], out["text"], out["image_aug"], out["text_aug"])
            + weights["separation"] * separation(out["image"], out["text"], out["image_indep"], out["text_indep"],
                                                 out["image_indep_aug"], out["text_indep_aug"]))
    loss.backward()
    assert all(out[name].grad is not None and out[name].grad.abs().sum() > 0 for name in names)
    assert logit_scale.grad is not None

    z = {name: t.detach() for name, t in out.items()}
    diag = torch.arange(n)
    logits = logit_scale.detach() * z["image"] @ z["text"].T
    dense_clip = 0.5 * (F.cross_entropy(logits, diag) + F.cross_entropy(logits.T, diag))
    mix = 0.25 * z["image"] + 0.75 * z["text"]
    dense_bridge = ((z["image_aug"] - mix / mix.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    gram = lambda a, b: a @ b.T  # noqa: E731
    dense_geometry = (((gram(z["image"], z["text"]) - gram(z["text"], z["image"])) ** 2).sum()
                      + ((gram(z["image"], z["image"]) - gram(z["text"], z["text"])) ** 2).sum()
                      + ((gram(z["image"], z["image"]) - gram(z["image_aug"], z["image_aug"])) ** 2).sum()
                      + ((gram(z["text"], z["text"]) - gram(z["text_aug"], z["text_aug"])) ** 2).sum()
                      + (((z["image"] * z["text"]).sum(1) - (z["image_aug"] * z["text_aug"]).sum(1)) ** 2).sum()) / n
    dense_sep = dense_separation(z["image"], z["text"], z["image_indep"], z["text_indep"], z["image_indep_aug"],
                                 z["text_indep_aug"])
    expected = (dense_clip + weights["bridge"] * dense_bridge + weights["geometry"] * dense_geometry
                + weights["separation"] * dense_sep)
    assert_rel_close(loss, expected, LOSS_RTOL[torch.float64], "weighted objective")
