"""clip_loss / ClipLoss against a float64 dense reference written with torch.nn.functional.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

import mmcl_fast
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close

BACKENDS = ["cpu", "torch", "reference"]


def reference_clip(x, y, scale, bias=None, image_labels=None, text_labels=None, smoothing=0.0):
    logits = scale * x @ y.T
    if bias is not None:
        logits = logits + bias
    n, m = logits.shape
    il = torch.arange(n) if image_labels is None else image_labels
    tl = torch.arange(m) if text_labels is None else text_labels
    return 0.5 * (F.cross_entropy(logits, il, label_smoothing=smoothing)
                  + F.cross_entropy(logits.T, tl, label_smoothing=smoothing))


def unit(n, d, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


def compare(x, y, scale, bias=None, *, image_labels=None, text_labels=None, smoothing=0.0, backend="cpu",
            loss_rtol=None, grad_rtol=None):
    """Run mmcl_fast and the float64 reference on the same (rounded) inputs; check loss and every gradient."""
    dtype = x.dtype
    loss_rtol = LOSS_RTOL[dtype] if loss_rtol is None else loss_rtol
    grad_rtol = GRAD_RTOL[dtype] if grad_rtol is None else grad_rtol
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(float(scale), dtype=param_dtype, requires_grad=True)
    b = None if bias is None else torch.tensor(float(bias), dtype=param_dtype, requires_grad=True)
    loss = mmcl_fast.clip_loss(xs, ys, s, b, image_labels=image_labels, text_labels=text_labels,
                               label_smoothing=smoothing, backend=backend)
    loss.backward()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    sr = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    br = None if bias is None else torch.tensor(float(bias), dtype=torch.float64, requires_grad=True)
    ref = reference_clip(xr, yr, sr, br, image_labels, text_labels, smoothing)
    ref.backward()
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and loss.dim() == 0
    assert xs.grad.dtype == dtype and ys.grad.dtype == dtype
    assert_rel_close(loss, ref, loss_rtol, "loss")
    assert_rel_close(xs.grad, xr.grad, grad_rtol, "d image_features")
    assert_rel_close(ys.grad, yr.grad, grad_rtol, "d text_features")
    # d/d scale = E_softmax[s_ij] - s_positive, a cancelling difference: measured against |s_positive|
    n, m = x.shape[0], y.shape[0]
    pos_rows = torch.arange(n) if image_labels is None else image_labels
    positives = (x.double() * y.double()[pos_rows]).sum(1).abs().mean().item()
    assert_rel_close(s.grad, sr.grad, grad_rtol, "d logit_scale", floor=positives)
    if bias is not None:
        # d/d bias of a softmax cross-entropy is sum(probabilities) - 1: measured against those O(1) terms
        assert_rel_close(b.grad, br.grad, grad_rtol, "d logit_bias", floor=1.0)


@pytest.mark.parametrize("n,d", [(1, 1), (1, 512), (2, 3), (7, 64), (129, 100), (129, 1000), (1000, 1),
                                 (1000, 512), (4097, 64), (257, 3)])
def test_square_matches_reference_fp32(n, d):
    compare(unit(n, d), unit(n, d), scale=14.3)


@pytest.mark.parametrize("n,m,d", [(1, 7, 64), (7, 1, 3), (2, 129, 100), (129, 1000, 512), (1000, 7, 1),
                                   (4097, 129, 64), (129, 4097, 1000)])
def test_rectangular_with_labels_fp32(n, m, d):
    image_labels = torch.randint(0, m, (n,))
    text_labels = torch.randint(0, n, (m,))
    compare(unit(n, d), unit(m, d), scale=20.0, bias=-3.0, image_labels=image_labels, text_labels=text_labels)


@pytest.mark.parametrize("smoothing", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("n,m", [(64, 64), (37, 101)])
def test_label_smoothing_fp32(n, m, smoothing):
    image_labels = torch.randint(0, m, (n,)) if n != m else None
    text_labels = torch.randint(0, n, (m,)) if n != m else None
    compare(unit(n, 48), unit(m, 48), scale=10.0, bias=0.7, image_labels=image_labels, text_labels=text_labels,
            smoothing=smoothing)


@pytest.mark.parametrize("scale", [1e-3, 0.07, 1.0, 14.3, 50.0, 100.0])
def test_logit_scale_range_fp32(scale):
    compare(unit(300, 64), unit(300, 64), scale=scale)


@pytest.mark.parametrize("scale", [14.3, 100.0])
def test_duplicated_and_anti_aligned_rows(scale):
    """Duplicated rows, anti-aligned positives, and whole columns whose logits sit ~scale below the largest logit
    (exactly orthogonal to every image): a fixed shift exp(s - logit_scale) underflows for those columns."""
    basis, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    images = basis[:4].repeat(50, 1)                                      # 4 directions, each 50 times
    images = torch.cat([images, -images])                                 # and their opposites
    others = F.normalize(torch.randn(200, 28, dtype=torch.float64) @ basis[4:], dim=1)  # orthogonal to all images
    texts = torch.cat([-images[:200], others])                            # anti-aligned or orthogonal positives
    compare(images.float(), texts.float(), scale=scale, bias=-10.0)
    compare(texts.float(), images.float(), scale=scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (129, 129, 512), (1000, 1000, 64), (7, 257, 1000), (4097, 4097, 3)])
def test_half_inputs_match_reference_on_rounded_inputs(dtype, n, m, d):
    image_labels = torch.randint(0, m, (n,)) if n != m else None
    text_labels = torch.randint(0, n, (m,)) if n != m else None
    compare(unit(n, d, dtype), unit(m, d, dtype), scale=14.3, bias=-1.0, image_labels=image_labels,
            text_labels=text_labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs(backend):
    if backend == "cpu":
        with pytest.raises(TypeError, match="float32/bfloat16/float16"):
            mmcl_fast.clip_loss(unit(5, 4, torch.float64), unit(5, 4, torch.float64), 2.0, backend="cpu")
        return
    compare(unit(65, 16, torch.float64), unit(65, 16, torch.float64), scale=7.0, bias=0.5, backend=backend)


def test_auto_float64_takes_the_blocked_torch_backend():
    from mmcl_fast.backends import resolve_backend
    assert resolve_backend("auto", torch.device("cpu"), torch.float64) == "torch"
    compare(unit(33, 8, torch.float64), unit(33, 8, torch.float64), scale=3.0, backend="auto")


def test_gradcheck_float64():
    x = unit(6, 5, torch.float64).requires_grad_()
    y = unit(6, 5, torch.float64).requires_grad_()
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    fn = lambda x, y, s, b: mmcl_fast.clip_loss(x, y, s, b, label_smoothing=0.2, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y, s, b))
    il, tl = torch.tensor([2, 0, 1]), torch.tensor([1, 1, 0, 2, 2])
    x3 = unit(3, 4, torch.float64).requires_grad_()
    y5 = unit(5, 4, torch.float64).requires_grad_()
    fn2 = lambda x, y, s: mmcl_fast.clip_loss(x, y, s, image_labels=il, text_labels=tl,  # noqa: E731
                                              backend="reference")
    assert torch.autograd.gradcheck(fn2, (x3, y5, s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_open_clip_ClipLoss(dtype):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    x, y = unit(257, 64, dtype), unit(257, 64, dtype)
    scale = torch.tensor(14.3)
    ours_mod = mmcl_fast.ClipLoss()
    theirs_mod = open_clip_loss.ClipLoss()
    ours = ours_mod(x.float(), y.float(), scale, output_dict=True)
    theirs = theirs_mod(x.float(), y.float(), scale, output_dict=True)
    assert set(ours) == set(theirs) == {"contrastive_loss"}
    assert_rel_close(ours["contrastive_loss"], theirs["contrastive_loss"], 1e-5, "loss vs open_clip")
    # with logit_bias (open_clip >= 2.24 accepts it in ClipLoss.forward)
    ours_b = ours_mod(x.float(), y.float(), scale, torch.tensor(-2.0))
    theirs_b = theirs_mod(x.float(), y.float(), scale, torch.tensor(-2.0))
    assert_rel_close(ours_b, theirs_b, 1e-5, "loss with bias vs open_clip")


def test_ClipLoss_constructor_matches_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    import inspect
    ours = inspect.signature(mmcl_fast.ClipLoss.__init__).parameters
    theirs = inspect.signature(open_clip_loss.ClipLoss.__init__).parameters
    for name, param in theirs.items():
        assert name in ours and ours[name].default == param.default, name
    fwd_ours = list(inspect.signature(mmcl_fast.ClipLoss.forward).parameters)
    fwd_theirs = list(inspect.signature(open_clip_loss.ClipLoss.forward).parameters)
    assert fwd_ours == fwd_theirs


def test_world_size_without_process_group_is_clear():
    loss = mmcl_fast.ClipLoss(rank=0, world_size=2)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
        loss(unit(4, 8), unit(4, 8), 1.0)


def test_non_contiguous_inputs():
    big_x, big_y = unit(64, 100), unit(100, 64)
    x = big_x[::2, 10:74]           # row stride 200, column slice
    y = big_y.T[:, :64][::2]        # transposed storage (column stride != 1)
    assert not x.is_contiguous() and not y.is_contiguous()
    compare(x, y.contiguous(), scale=9.0)
    compare(x.contiguous(), y, scale=9.0)


def test_nan_and_inf_inputs_give_nan():
    x, y = unit(50, 16), unit(50, 16)
    x[3, 2] = float("nan")
    assert torch.isnan(mmcl_fast.clip_loss(x, y, 10.0))
    x[3, 2] = float("inf")
    assert not torch.isfinite(mmcl_fast.clip_loss(x, y, 10.0))


def test_deterministic_bit_identical():
    x, y = unit(700, 96).requires_grad_(), unit(700, 96).requires_grad_()
    outs = []
    for _ in range(3):
        x.grad = y.grad = None
        loss = mmcl_fast.clip_loss(x, y, 30.0)
        loss.backward()
        outs.append((loss.detach().clone(), x.grad.clone(), y.grad.clone()))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    x, y = unit(100, 32).requires_grad_(), unit(100, 32).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)

    def step(x, y, s):
        return mmcl_fast.clip_loss(x * 1.0, y, s, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y, s)
    loss.backward()
    gx = x.grad.clone()
    x.grad = None
    eager = step(x, y, s)
    eager.backward()
    assert_rel_close(loss, eager, 1e-6, "compiled loss")
    assert_rel_close(gx, x.grad, 1e-6, "compiled grad")


def test_torch_compile_fullgraph_with_labels():
    """Labels (rectangular batch, label smoothing) compile without a graph break: no host read of label values."""
    x, y = unit(60, 16).requires_grad_(), unit(25, 16).requires_grad_()
    image_labels, text_labels = torch.randint(0, 25, (60,)), torch.randint(0, 60, (25,))

    def step(x, y):
        return mmcl_fast.clip_loss(x, y, 12.0, -1.0, image_labels=image_labels, text_labels=text_labels,
                                   label_smoothing=0.1)

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
    loss.backward()
    grads = x.grad.clone(), y.grad.clone()
    x.grad = y.grad = None
    eager = step(x, y)
    eager.backward()
    assert_rel_close(loss, eager, 1e-6, "compiled loss")
    assert_rel_close(grads[0], x.grad, 1e-6, "compiled d image")
    assert_rel_close(grads[1], y.grad, 1e-6, "compiled d text")


def test_logit_bias_grad_with_label_smoothing_ragged_columns():
    """The folded row constant of label smoothing enters the bias gradient once per real column (a kernel used to
    count it on the padded lanes of the last column block too)."""
    for m in (1, 7, 37, 101, 193):
        compare(unit(29, 24), unit(m, 24), scale=8.0, bias=0.3, image_labels=torch.randint(0, m, (29,)),
                text_labels=torch.randint(0, 29, (m,)), smoothing=0.4)


def test_opcheck_custom_ops():
    from mmcl_fast import _ops
    x, y = unit(9, 5), unit(11, 5)
    targets = torch.randint(0, 11, (9,)), torch.randint(0, 9, (11,))
    args = (x, y, torch.full((9,), 3.0), torch.zeros(9), torch.randn(11), *targets, True, True, True, "cpu")
    torch.library.opcheck(_ops.lse_fwd, args, test_utils=("test_schema", "test_faketensor"))
