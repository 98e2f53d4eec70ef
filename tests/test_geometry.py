"""Geometric-consistency losses against float64 references written as explicit N x N double sums."""
import pytest
import torch
import torch.nn.functional as F
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close

from mmcl_fast import GeometricConsistencyLoss, geometric_consistency_loss
from mmcl_fast.losses import geometry

SIZES = [(1, 1), (2, 3), (7, 5), (33, 17), (130, 64)]
NEAR_ALIGNED_RTOL = 1e-4  # the acceptance bound for the near-aligned case (the loss is ~1e-6 of its terms' size)


def _unit(n, d, near=None, noise=1.0):
    base = torch.randn(n, d, dtype=torch.float64)
    if near is not None:
        base = near.detach().double() + noise * base
    return F.normalize(base, dim=1)


def _views(n, d, dtype, noise=1.0, with_aug=True):
    """image, text (= image + noise), and their augmented views, unit rows rounded to dtype, requiring grad."""
    image = _unit(n, d)
    text = _unit(n, d, near=image, noise=noise)
    views = [image, text]
    if with_aug:
        views += [_unit(n, d, near=image, noise=noise), _unit(n, d, near=text, noise=noise)]
    return [v.to(dtype).requires_grad_(True) for v in views]


def dense_gc(image, text, image_aug=None, text_aug=None):
    """L_GC (+ L^a_GC) exactly as docs/design.md#geometric-consistency writes them: double sums over (j, k) of
    squared inner-product gaps."""
    n = image.shape[0]
    image_text = image @ text.T  # [j, k] = <v_j, w_k>
    loss = ((image_text - image_text.T) ** 2).sum() + ((image @ image.T - text @ text.T) ** 2).sum()
    if image_aug is not None:
        loss = loss + ((image @ image.T - image_aug @ image_aug.T) ** 2).sum()
        loss = loss + ((text @ text.T - text_aug @ text_aug.T) ** 2).sum()
        loss = loss + (((image * text).sum(1) - (image_aug * text_aug).sum(1)) ** 2).sum()
    return loss / n


def _check(views, dtype, loss_rtol, grad_rtol):
    loss = geometric_consistency_loss(*views)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grads = torch.autograd.grad(loss, views)
    ref = [v.detach().double().requires_grad_(True) for v in views]
    expected = dense_gc(*ref)
    expected_grads = torch.autograd.grad(expected, ref)
    assert_rel_close(loss, expected, loss_rtol, "loss")
    for name, grad, expected_grad, view in zip(["d_image", "d_text", "d_image_aug", "d_text_aug"], grads,
                                               expected_grads, views):
        assert grad.dtype == view.dtype
        assert_rel_close(grad, expected_grad, grad_rtol, name)


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_aug", [False, True])
def test_matches_reference(n, d, dtype, with_aug):
    _check(_views(n, d, dtype, with_aug=with_aug), dtype, LOSS_RTOL[dtype], GRAD_RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_aug", [False, True])
def test_near_aligned_keeps_accuracy(dtype, with_aug):
    """Image ~ text ~ views (noise 1e-3): the loss is ~1e-6 of the size of its Gram terms, which cancel."""
    views = _views(97, 48, dtype, noise=1e-3, with_aug=with_aug)
    _check(views, dtype, min(NEAR_ALIGNED_RTOL, LOSS_RTOL[dtype]), GRAD_RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotated_views_cancel_exactly(dtype):
    """Views that are an orthogonal map of the originals (a = v R, b = w R) have the same Gram structure, so
    L^a_GC = 0 although its Gram parts are O(N): the loss is then the small near-aligned L_GC alone, which
    only float64 Grams resolve. The views' gradients are exactly 0 in exact arithmetic; their error is measured
    against the size of the two terms that cancel, 4 (a a^T) a / N."""
    n, d = 120, 16
    image, text = (v.detach() for v in _views(n, d, torch.float64, noise=1e-3, with_aug=False))
    rotation, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    views = [image, text, image @ rotation, text @ rotation]
    views = [v.to(dtype).requires_grad_(True) for v in views]
    loss = geometric_consistency_loss(*views)
    grads = torch.autograd.grad(loss, views)
    ref = [v.detach().double().requires_grad_(True) for v in views]
    expected = dense_gc(*ref)
    expected_grads = torch.autograd.grad(expected, ref)
    assert_rel_close(loss, expected, LOSS_RTOL[dtype], "loss")
    for name, grad, expected_grad, view in zip(["d_image", "d_text", "d_image_aug", "d_text_aug"], grads,
                                               expected_grads, ref):
        view = view.detach()
        floor = 4 * (view @ (view.T @ view)).abs().max().item() / n
        assert_rel_close(grad, expected_grad, GRAD_RTOL[dtype], name, floor=floor)


def test_zero_when_views_coincide():
    image = _unit(20, 9)
    assert geometric_consistency_loss(image, image, image, image).item() == 0.0


def test_blocks_cover_all_rows(monkeypatch):
    """Force many row blocks (3 rows each, N not a multiple) and check against the reference."""
    monkeypatch.setattr(geometry, "_BLOCK_BYTES", 3 * 8 * 6)
    _check(_views(17, 6, torch.float32), torch.float32, LOSS_RTOL[torch.float32], GRAD_RTOL[torch.float32])


def test_gradients_only_where_asked():
    image, text, image_aug, text_aug = _views(9, 4, torch.float32)
    text_aug.requires_grad_(False)
    geometric_consistency_loss(image, text, image_aug, text_aug).backward()
    assert image.grad is not None and text.grad is not None and image_aug.grad is not None
    assert text_aug.grad is None


def test_module_matches_function():
    views = _views(11, 5, torch.float64)
    module = GeometricConsistencyLoss()
    assert_rel_close(module(*views), geometric_consistency_loss(*views), LOSS_RTOL[torch.float64], "module")
    assert_rel_close(module(*views[:2]), geometric_consistency_loss(*views[:2]), LOSS_RTOL[torch.float64],
                     "module without views")


def test_bad_inputs_raise_clear_errors():
    image, text, image_aug, text_aug = (v.detach() for v in _views(6, 4, torch.float32))
    with pytest.raises(ValueError, match="text_aug"):
        geometric_consistency_loss(image, text, image_aug)
    with pytest.raises(ValueError, match="image_aug"):
        geometric_consistency_loss(image, text, None, text_aug)
    with pytest.raises(ValueError, match="text_features"):
        geometric_consistency_loss(image, text[:5])
    with pytest.raises(ValueError, match="image_aug"):
        geometric_consistency_loss(image, text, image_aug[:, :3], text_aug)
    with pytest.raises(TypeError, match="text_aug"):
        geometric_consistency_loss(image, text, image_aug, text_aug.double())
    with pytest.raises(TypeError, match="image_features must be a torch.Tensor"):
        geometric_consistency_loss(image.numpy(), text)
    with pytest.raises(ValueError, match="image_features must be a 2-D"):
        geometric_consistency_loss(image[0], text[0])
    with pytest.raises(TypeError, match="floating-point"):
        geometric_consistency_loss(image.long(), text.long())


@pytest.mark.slow
def test_no_quadratic_memory():
    """N=65536, D=256 fp32 L_GC + L^a_GC forward+backward: peak RSS growth well under 6x the inputs
    (one N x N fp32 matrix would be 16 GiB)."""
    from rss import peak_rss_growth
    probe = peak_rss_growth("""
        import torch, mmcl_fast
        def make_inputs(n):
            tensors = [torch.randn(n, 256) for _ in range(4)]
            for t in tensors:
                t.div_(t.norm(dim=1, keepdim=True)).requires_grad_(True)
            return tensors
        def step(inputs):
            mmcl_fast.geometric_consistency_loss(*inputs).backward()
    """, n=65536)
    ratio = probe["growth_bytes"] / probe["input_bytes"]
    print(f"geometric consistency (with views) N=65536 D=256: peak RSS growth "
          f"{probe['growth_bytes'] / 2**20:.0f} MiB = {ratio:.2f} x inputs ({probe['input_bytes'] / 2**20:.0f} MiB)")
    assert ratio < 3.0, f"peak RSS growth {ratio:.2f} x the inputs"
