"""Under torch.autocast the losses compute in the dtype of the features they are given: fp32 features
give the fp32 result, bf16 features the bf16 result, on every backend of the primitive that runs here."""
import pytest
import torch
import torch.nn.functional as F

import mmcl_fast
from tolerances import LOSS_RTOL, assert_rel_close

N, D = 45, 24


def _features(dtype, count=4):
    gen = torch.Generator().manual_seed(7)
    return [F.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1).to(dtype) for _ in range(count)]


def _clip(a, b, c, e, backend):
    labels = torch.arange(N).roll(3)
    return mmcl_fast.clip_loss(a, b, torch.tensor(100.0, requires_grad=True), torch.tensor(-2.0),
                               image_labels=labels, text_labels=labels.argsort(), label_smoothing=0.1,
                               backend=backend)


LOSSES = {
    "clip": _clip,
    "ClipLoss": lambda a, b, c, e, backend: mmcl_fast.ClipLoss()(a, b, torch.tensor(30.0)),
    "infonce_sqeuclidean": lambda a, b, c, e, backend: mmcl_fast.infonce(a, b, 3.0, similarity="sqeuclidean",
                                                                         backend=backend),
    "affine_lse": lambda a, b, c, e, backend: sum(t.sum() for t in mmcl_fast.affine_lse(a, b, 20.0, backend=backend)),
    "bridge_pairwise": lambda a, b, c, e, backend: mmcl_fast.brownian_bridge_loss(a, b, c, 0.25),
    "bridge_contrastive": lambda a, b, c, e, backend: mmcl_fast.brownian_bridge_loss(
        a, b, c, torch.linspace(0.1, 0.9, N), mode="contrastive", backend=backend),
    "geometric_consistency": lambda a, b, c, e, backend: mmcl_fast.geometric_consistency_loss(a, b, c, e),
    "uniformity": lambda a, b, c, e, backend: mmcl_fast.uniformity_loss(a, backend=backend),
    "feature_separation": lambda a, b, c, e, backend: mmcl_fast.feature_separation_loss(
        a, b, c, e, c, e, backend=backend),
}


def _run(name, dtype, backend, autocast, backward_in_autocast=False):
    leaves = [t.clone().requires_grad_() for t in _features(dtype)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = LOSSES[name](*leaves, backend=backend)
        if backward_in_autocast:
            loss.backward()
    if not backward_in_autocast:
        loss.backward()  # PyTorch's AMP recipe: backward outside the autocast region
    return loss.detach(), [t.grad for t in leaves if t.grad is not None]


@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["amp-recipe", "backward-inside"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_autocast_does_not_reach_inside_the_loss(name, dtype, backend, backward_in_autocast):
    plain_loss, plain_grads = _run(name, dtype, backend, autocast=False)
    amp_loss, amp_grads = _run(name, dtype, backend, autocast=True, backward_in_autocast=backward_in_autocast)
    assert amp_loss.dtype == plain_loss.dtype
    assert_rel_close(amp_loss, plain_loss, LOSS_RTOL[torch.float32], f"{name} loss under autocast")
    assert len(amp_grads) == len(plain_grads) > 0
    for amp, plain in zip(amp_grads, plain_grads, strict=True):
        assert amp.dtype == plain.dtype == dtype
        assert_rel_close(amp, plain, LOSS_RTOL[torch.float32], f"{name} gradient under autocast")
