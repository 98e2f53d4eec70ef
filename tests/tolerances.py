"""Tolerances, per input dtype, in one place (docs/design.md#precision).

Relative error is measured against the float64 reference on the same (rounded) inputs as
max|actual - expected| / max|expected|: a single bad entry fails the test.
"""
import torch

# loss: accumulated in fp32 whatever the input dtype.
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4, torch.float64: 1e-10}
# gradients: fp32 math, one rounding of the output to the input dtype.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 4e-3, torch.float64: 1e-10}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual, expected, rtol: float, what: str = "value", floor: float = 0.0) -> None:
    """`floor`: the natural magnitude of a quantity that is a cancelling sum (e.g. a logit_bias gradient, which is
    sum(softmax) - 1 = 0 for plain cross-entropy: its error is measured against the O(1) terms that cancel)."""
    err = rel_err(actual, expected, floor)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"
