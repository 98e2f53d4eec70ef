"""mmcl_fast.siglip_loss / SigLipLoss against a float64 dense reference and against open_clip's SigLipLoss.

Every backend that runs on this machine (the compiled CPU kernel, the blocked torch backend, the dense reference;
Triton under the interpreter in test_triton.py) is checked on fresh random inputs: loss and the gradients of the
features, logit_scale and logit_bias, fp32 to 1e-5 and bf16/fp16 inputs to 1e-4 (loss) / 4e-3 (gradients) on the
same rounded inputs. The scalar gradients are sums of N*M terms of both signs: their error is measured against
the sum of the magnitudes of those terms (the `floor` of tolerances.assert_rel_close), as for CLIP's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mmcl_fast
from mmcl_fast.losses.siglip import positive_columns

sys.path.insert(0, os.path.dirname(__file__))
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close  # noqa: E402

BACKENDS = ["cpu", "torch", "reference"]


def unit(n, d, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


def dense_signs(n, m, positives):
    """z as a dense float64 (n, m) matrix, built independently of mmcl_fast's positive tables."""
    z = -torch.ones(n, m, dtype=torch.float64)
    if positives is None:
        z += 2 * torch.eye(n, dtype=torch.float64)
    elif positives.dim() == 1:
        z[positives.long(), torch.arange(m)] = 1.0
    else:
        z[positives[:, 0].long(), positives[:, 1].long()] = 1.0
    return z


def reference_siglip(x, y, scale, bias, positives=None):
    logits = scale * x @ y.T + (0.0 if bias is None else bias)
    z = dense_signs(x.shape[0], y.shape[0], positives)
    return -F.logsigmoid(z * logits).sum() / x.shape[0], logits, z


def compare(x, y, scale=10.0, bias=-10.0, *, positives=None, backend="cpu", loss_rtol=None, grad_rtol=None):
    dtype = x.dtype
    loss_rtol = LOSS_RTOL[dtype] if loss_rtol is None else loss_rtol
    grad_rtol = GRAD_RTOL[dtype] if grad_rtol is None else grad_rtol
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(float(scale), dtype=param_dtype, requires_grad=True)
    b = None if bias is None else torch.tensor(float(bias), dtype=param_dtype, requires_grad=True)
    loss = mmcl_fast.siglip_loss(xs, ys, s, b, positives=positives, backend=backend)
    loss.backward()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    sr = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    br = None if bias is None else torch.tensor(float(bias), dtype=torch.float64, requires_grad=True)
    ref, logits, z = reference_siglip(xr, yr, sr, br, positives)
    ref.backward()
    assert loss.dtype == param_dtype and loss.dim() == 0
    assert xs.grad.dtype == dtype and ys.grad.dtype == dtype
    assert_rel_close(loss, ref, loss_rtol, "loss")
    assert_rel_close(xs.grad, xr.grad, grad_rtol, "d image_features")
    assert_rel_close(ys.grad, yr.grad, grad_rtol, "d text_features")
    with torch.no_grad():  # magnitudes of the terms the scalar gradients sum
        weights = (z * torch.sigmoid(-z * logits)).abs() / x.shape[0]
        sims = (x.double() @ y.double().T).abs()
    assert_rel_close(s.grad, sr.grad, grad_rtol, "d logit_scale", floor=(weights * sims).sum().item())
    if bias is not None:
        assert_rel_close(b.grad, br.grad, grad_rtol, "d logit_bias", floor=weights.sum().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", [(1, 1), (1, 512), (2, 3), (7, 64), (97, 1000), (129, 100), (1000, 1), (257, 3),
                                 (1031, 64)])
def test_square_matches_reference_fp32(backend, n, d):
    compare(unit(n, d), unit(n, d), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(1, 1), (13, 1000), (257, 64), (611, 48)])
def test_half_inputs_match_reference(backend, dtype, n, d):
    compare(unit(n, d, dtype), unit(n, d, dtype), backend=backend)


def test_float64_exact():
    """float64 runs on the blocked torch backend (the compiled kernel takes fp32/bf16/fp16); auto picks it."""
    compare(unit(67, 9, torch.float64), unit(67, 9, torch.float64), backend="torch")
    compare(unit(67, 9, torch.float64), unit(67, 9, torch.float64), backend="auto")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,bias", [(100.0, -20.0), (100.0, 20.0), (1.0, 0.0), (0.1, -3.0)])
def test_extreme_scale_and_bias_fp32(backend, scale, bias):
    """Logits up to +-120: softplus and sigmoid must neither overflow nor cancel."""
    x = unit(150, 32)
    y = torch.cat([x[:50], unit(100, 32)])  # some pairs with similarity 1: logits at the extremes
    compare(x, y, scale, bias, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_python_scalars(backend):
    compare(unit(33, 16), unit(33, 16), scale=7.5, bias=None, backend=backend)
    x, y = unit(20, 8), unit(20, 8)
    loss = mmcl_fast.siglip_loss(x, y, 10.0, -10.0, backend=backend)
    ref, _, _ = reference_siglip(x.double(), y.double(), 10.0, -10.0)
    assert_rel_close(loss, ref, LOSS_RTOL[torch.float32], "loss with float scale/bias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_text_labels_rectangular(backend):
    n, m = 37, 111  # three captions per image
    labels = torch.randint(0, n, (m,))
    compare(unit(n, 24), unit(m, 24), 12.0, -6.0, positives=labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairs_with_duplicates_and_rows_without_positives(backend):
    n, m = 211, 97
    pairs = torch.stack([torch.randint(0, n // 2, (400,)), torch.randint(0, m, (400,))], 1)  # half the rows: none
    pairs = torch.cat([pairs, pairs[:50]])  # listed twice: counts once
    compare(unit(n, 16), unit(m, 16), 9.0, -4.0, positives=pairs, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_positive_rows_span_tiles(backend):
    """A row whose positives straddle column blocks and tiles (the kernel's per-tile positive lookup)."""
    n, m = 5, 1500
    pairs = torch.tensor([(0, j) for j in range(0, m, 3)] + [(3, j) for j in range(m - 200, m)] + [(4, 0)])
    compare(unit(n, 8), unit(m, 8), 5.0, -2.0, positives=pairs, backend=backend)


def test_positive_table():
    table = positive_columns(torch.tensor([[2, 1], [0, 3], [2, 0], [2, 1]]), 4, 4, torch.device("cpu"))
    assert table.tolist() == [[3, -1], [-1, -1], [0, 1]] + [[-1, -1]]
    assert positive_columns(None, 3, 3, torch.device("cpu")).tolist() == [[0], [1], [2]]
    assert positive_columns(torch.tensor([1, 1, 0]), 2, 3, torch.device("cpu")).tolist() == [[2, -1], [0, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_open_clip(backend):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    x, y = unit(300, 64), unit(300, 64)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    theirs = open_clip_loss.SigLipLoss()(x, y, scale, bias)
    ours = mmcl_fast.SigLipLoss(backend=backend)(x, y, scale, bias, output_dict=True)["contrastive_loss"]
    assert_rel_close(ours, theirs, 1e-5, "loss vs open_clip")
    grads_theirs = torch.autograd.grad(theirs, (scale, bias))
    grads_ours = torch.autograd.grad(ours, (scale, bias))
    for a, b in zip(grads_ours, grads_theirs):
        assert_rel_close(a, b, 1e-4, "scale/bias gradient vs open_clip")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base_x, base_y = unit(40, 64), unit(80, 32)
    x = base_x[:, ::2]  # strided features
    y = base_y[::2]     # strided rows
    compare(x, y, backend=backend)
    compare(unit(32, 40).T.contiguous().T, unit(32, 40), backend=backend)


def test_forward_only_equals_training_loss():
    x, y = unit(100, 20), unit(100, 20)
    with torch.no_grad():
        inference = mmcl_fast.siglip_loss(x, y, 10.0, -10.0, backend="cpu")
    train = mmcl_fast.siglip_loss(x.requires_grad_(), y, 10.0, -10.0, backend="cpu")
    assert_rel_close(inference, train, 1e-6, "no-grad loss vs with-grad loss")


def test_gradient_scales_with_upstream_gradient():
    x, y = unit(50, 10).requires_grad_(), unit(50, 10)
    loss = mmcl_fast.siglip_loss(x, y, 10.0, -10.0, backend="cpu")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(-3.0 * loss, x)
    assert_rel_close(g3, -3.0 * g1, 1e-6, "gradient of -3 * loss")


def test_autocast_does_not_leak():
    x, y = unit(64, 32), unit(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mmcl_fast.siglip_loss(x, y, 10.0, -10.0)
    ref, _, _ = reference_siglip(x.double(), y.double(), 10.0, -10.0)
    assert loss.dtype == torch.float32
    assert_rel_close(loss, ref, LOSS_RTOL[torch.float32], "loss under autocast")


def test_torch_compile_no_graph_break():
    x, y = unit(48, 16).requires_grad_(), unit(48, 16).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    compiled = torch.compile(lambda a, b, s, c: mmcl_fast.siglip_loss(a, b, s, c), fullgraph=True)
    loss = compiled(x, y, scale, bias)
    loss.backward()
    ref, _, _ = reference_siglip(x.detach().double(), y.detach().double(), 10.0, -10.0)
    assert_rel_close(loss, ref, LOSS_RTOL[torch.float32], "compiled loss")
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_opcheck():
    from mmcl_fast import _ops
    x, y = unit(9, 4), unit(7, 4)
    args = (x, y, torch.full((9,), 3.0), torch.zeros(9), torch.zeros(7), torch.tensor([[0], [2], [-1]] * 3),
            True, "cpu")
    torch.library.opcheck(_ops.sigmoid_fwd, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("make_args,error,match", [
    (lambda x, y: (x[0], y), ValueError, "image_features must be a 2-D"),
    (lambda x, y: (x, y[:, :3]), ValueError, "same feature size"),
    (lambda x, y: (x.long(), y), TypeError, "floating-point"),
    (lambda x, y: (x, y.double()), TypeError, "same dtype"),
    (lambda x, y: (x[:0], y), ValueError, "empty batch"),
    (lambda x, y: (x, y[:5]), ValueError, "unequal batch sizes need `positives`"),
])
def test_bad_features_raise(make_args, error, match):
    x, y = unit(8, 4), unit(8, 4)
    with pytest.raises(error, match=match):
        mmcl_fast.siglip_loss(*make_args(x, y), 10.0, -10.0)


def test_bad_scalars_and_positives_raise():
    x, y = unit(8, 4), unit(8, 4)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        mmcl_fast.siglip_loss(x, y, torch.ones(3), -10.0)
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        mmcl_fast.siglip_loss(x, y, 10.0, torch.ones(2, 2))
    with pytest.raises(TypeError, match="logit_scale must be a floating-point"):
        mmcl_fast.siglip_loss(x, y, torch.tensor(3), -10.0)
    with pytest.raises(TypeError, match="positives must hold integer"):
        mmcl_fast.siglip_loss(x, y, 10.0, -10.0, positives=torch.zeros(8))
    with pytest.raises(ValueError, match=r"image indices must lie in \[0, 8\)"):
        mmcl_fast.siglip_loss(x, y, 10.0, -10.0, positives=torch.tensor([[8, 0]]))
    with pytest.raises(ValueError, match=r"text indices must lie in \[0, 8\)"):
        mmcl_fast.siglip_loss(x, y, 10.0, -10.0, positives=torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match=r"per-text image labels must have shape \(8,\)"):
        mmcl_fast.siglip_loss(x, y, 10.0, -10.0, positives=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        mmcl_fast.SigLipLoss(dist_impl="ring")


def test_core_rejects_bad_problem_structs():
    """The compiled core's typed structs check sizes before any pointer is read (no segfault on a Python bug)."""
    from mmcl_fast.backends import cpu
    if not cpu.available():
        pytest.skip("compiled core not built")
    C = cpu._module()
    x, y = unit(6, 4), unit(5, 4)
    vec = lambda t: C.Vector(t.data_ptr(), t.shape[0], 0 if t.dtype == torch.float32 else 3)  # noqa: E731
    mat = lambda t: C.Matrix(t.data_ptr(), t.shape[0], t.shape[1], t.stride(0), 0)  # noqa: E731
    with pytest.raises(ValueError, match="col_bias: expected a \\(5,\\) float32 vector"):
        C.AffineProblem(mat(x), mat(y), vec(torch.ones(6)), vec(torch.zeros(6)), vec(torch.zeros(6)))
    problem = C.AffineProblem(mat(x), mat(y), vec(torch.ones(6)), vec(torch.zeros(6)), vec(torch.zeros(5)))
    # (the tensors stay referenced while the views are in use: a view holds a raw pointer)
    row_loss, short_loss = torch.empty(6), torch.empty(5)
    bad_ptr, cols = torch.tensor([0, 1, 1, 2, 2, 3, 9]), torch.tensor([0, 1, 2])  # ptr ends past len(cols)
    with pytest.raises(ValueError, match="Positives.ptr must start at 0 and end at len"):
        C.sigmoid_loss(problem, C.Positives(vec(bad_ptr), vec(cols)), vec(row_loss), None, 1)
    ptr, far_col = torch.tensor([0, 1, 1, 1, 1, 1, 1]), torch.tensor([7])
    with pytest.raises(ValueError, match=r"column index 7 outside \[0, 5\)"):
        C.sigmoid_loss(problem, C.Positives(vec(ptr), vec(far_col)), vec(row_loss), None, 1)
    unsorted_ptr, unsorted = torch.tensor([0, 2, 2, 2, 2, 2, 2]), torch.tensor([3, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        C.sigmoid_loss(problem, C.Positives(vec(unsorted_ptr), vec(unsorted)), vec(row_loss), None, 1)
    zero_ptr, no_cols = torch.zeros(7, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="row_loss: expected a \\(6,\\) float32 vector"):
        C.sigmoid_loss(problem, C.Positives(vec(zero_ptr), vec(no_cols)), vec(short_loss), None, 1)
    with pytest.raises(ValueError, match="Matrix: row_stride 2 < cols 4"):
        C.Matrix(x.data_ptr(), 6, 4, 2, 0)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512-bf16", "amx-bf16", "neon"])
def test_every_isa_build(isa):
    from mmcl_fast.backends import cpu
    if not cpu.available() or not cpu.compiled_isas().get(isa):
        pytest.skip(f"ISA build {isa!r} is not compiled here or this CPU lacks it")
    previous = cpu.isa()
    try:
        cpu.set_isa(isa)
        for dtype in (torch.float32, torch.bfloat16):
            compare(unit(211, 40, dtype), unit(211, 40, dtype), backend="cpu")
        compare(unit(37, 12), unit(101, 12), positives=torch.randint(0, 37, (101,)), backend="cpu")
    finally:
        cpu.set_isa(previous)


def test_threads_are_deterministic_and_agree():
    x, y = unit(700, 64), unit(700, 64)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            xs = x.clone().requires_grad_()
            loss = mmcl_fast.siglip_loss(xs, y, 10.0, -10.0, backend="cpu")
            loss.backward()
            again = x.clone().requires_grad_()
            loss2 = mmcl_fast.siglip_loss(again, y, 10.0, -10.0, backend="cpu")
            loss2.backward()
            assert torch.equal(loss, loss2) and torch.equal(xs.grad, again.grad), f"{threads} threads not bit-stable"
            results.append(xs.grad)
        for grad in results[1:]:
            assert_rel_close(grad, results[0], 1e-5, "gradient across thread counts")
    finally:
        torch.set_num_threads(previous)


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch, mmcl_fast
    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    n, d, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(2)
    x = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    mmcl_fast.siglip_loss(x[:8], y[:8], scale, bias, backend=backend).backward()  # warm-up: imports, pools
    x.grad = y.grad = scale.grad = bias.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    base = hwm_kib()
    mmcl_fast.siglip_loss(x, y, scale, bias, backend=backend).backward()
    print(hwm_kib() - base, 2 * x.numel() * x.element_size() // 1024)
""")


def _peak_growth_kib(n, d, backend):
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(n), str(d), backend], capture_output=True,
                         text=True, check=True)
    growth, inputs = map(int, out.stdout.split())
    return growth, inputs


def _tiles_kib(backend):
    from mmcl_fast.backends import blocked
    return 3 * blocked.tile_elements(torch.device("cpu")) * 4 // 1024 if backend == "torch" else 0  # S, L, G


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_no_quadratic_memory(backend):
    """N=8192, D=64 fwd+bwd in a fresh process: one N x N fp32 buffer would be 256 MiB; the inputs are 4 MiB."""
    growth, inputs = _peak_growth_kib(8192, 64, backend)
    assert growth < 64 * 1024 + _tiles_kib(backend), f"peak RSS grew by {growth / 1024:.1f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_memory_acceptance_n32768_d512(backend):
    """Acceptance: fwd+bwd at N=32768, D=512 fp32 raises peak RSS by at most 4x the two inputs (the torch
    backend: plus its tiles)."""
    growth, inputs = _peak_growth_kib(32768, 512, backend)
    print(f"{backend}: peak RSS growth {growth / 1024:.0f} MiB = {growth / inputs:.2f}x the inputs")
    assert growth <= 4 * inputs + _tiles_kib(backend), f"peak RSS grew by {growth / 1024:.0f} MiB, inputs {inputs} KiB"
