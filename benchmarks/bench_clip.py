"""Regression benchmarks: forward+backward of the CLIP and SigLIP losses, mmcl_fast vs open_clip's ClipLoss and
SigLipLoss (the bench registry's impls and float64 references), and the LSE primitive per backend / ISA.

    pytest benchmarks/ --benchmark-only                      # all
    pytest benchmarks/ --benchmark-only --benchmark-autosave # keep a baseline in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare  # compare with the last saved one

Each case is grouped by problem (N, D, dtype) so the two implementations print side by side, and carries its
achieved GFLOP/s (the registry's fused fwd+bwd FLOP count) in extra_info. Every timed loss is also checked
against the registry's float64 reference on the same rounded inputs, so a fast but wrong kernel does not pass
as a result.
"""
import pytest
import torch
from tolerances import LOSS_RTOL

from mmcl_fast import affine_lse
from mmcl_fast.backends import cpu as cpu_backend
from mmcl_fast.bench.impls import get_loss, paired_features
from mmcl_fast.bench.registry import late_training_features

pytest.importorskip("open_clip")

DIM = 512
LOGIT_SCALE = 100.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROUNDS = {1024: 10, 4096: 3}
# open_clip keeps its logits in the input dtype: its bf16 loss is only good to bf16 rounding
BASELINE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("n", list(ROUNDS))
@pytest.mark.parametrize("impl", ["mmcl_fast", "open_clip"])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_loss_fwd_bwd(benchmark, loss_name, impl, n, dtype_name):
    dtype = DTYPES[dtype_name]
    loss = get_loss(loss_name)
    reason = loss.impls[impl].unavailable(torch.device("cpu"), DIM)
    if reason:
        pytest.skip(reason)
    params = {**loss.params, "logit_scale": LOGIT_SCALE} if loss_name == "clip" else loss.params
    inputs = loss.make_inputs(n, DIM, dtype, 0)
    expected = loss.reference(inputs, params)
    step = loss.impls[impl].make_step(inputs, params, {})
    benchmark.group = f"{loss_name} fwd+bwd n={n} d={DIM} {dtype_name}"
    value = benchmark.pedantic(step, rounds=ROUNDS[n], warmup_rounds=1, iterations=1)
    benchmark.extra_info["gflops"] = round(loss.flops(n, n, DIM) / benchmark.stats.stats.median / 1e9, 1)
    rtol = LOSS_RTOL[dtype] if impl == "mmcl_fast" else BASELINE_RTOL[dtype]
    assert abs(float(value) - expected) <= rtol * abs(expected), (float(value), expected)


# every ISA build of the CPU kernel this machine runs, and the blocked torch backend, side by side
KERNELS = [f"cpu:{isa}" for isa in cpu_backend.runnable_isas()] + ["torch"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_affine_lse_fwd_bwd(benchmark, dtype_name, kernel):
    """The primitive alone (row + column LSE and all gradients) at N = M = 4096, D = 512, per backend / ISA."""
    n, dtype = 4096, DTYPES[dtype_name]
    backend, _, isa = kernel.partition(":")
    x, y = (t.requires_grad_() for t in paired_features(n, DIM, dtype, seed=1))

    def step():
        x.grad = y.grad = None
        row_lse, col_lse = affine_lse(x, y, LOGIT_SCALE, backend=backend)
        (row_lse.sum() + col_lse.sum()).backward()
        return row_lse.detach()

    previous = cpu_backend.isa()
    try:
        if isa:
            cpu_backend.set_isa(isa)
        benchmark.group = f"affine_lse fwd+bwd n={n} d={DIM} {dtype_name}"
        row_lse = benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    finally:
        cpu_backend.set_isa(previous)
    benchmark.extra_info["gflops"] = round(8 * n * n * DIM / benchmark.stats.stats.median / 1e9, 1)
    benchmark.extra_info["kernel"] = kernel
    expected = torch.logsumexp(LOGIT_SCALE * x.detach().double() @ y.detach().double().T, dim=1)
    assert (row_lse.double() - expected).abs().max().item() <= LOSS_RTOL[dtype] * expected.abs().max().item()


@pytest.mark.parametrize("impl", ["mmcl_fast", "open_clip"])
def test_clip_late_training_logits(benchmark, impl):
    """CLIP late in training: logit scale 100, each pair far closer than the rest of the batch but for one hard
    negative (late_training_features), so the logits of a row spread over ~100 and exp(logit - row max) of most
    pairs falls in the fp32 denormal range, while the loss (~0.01) still depends on the hard negatives. Intel cores
    handle denormals in microcode; the CPU kernel flushes them inside its threads (csrc/sweep.h, FlushDenormals),
    without which it slowed down ~14x on such logits. The random-feature cases above never reach this regime."""
    n = 4096
    loss = get_loss("clip")
    reason = loss.impls[impl].unavailable(torch.device("cpu"), DIM)
    if reason:
        pytest.skip(reason)
    image, text = late_training_features(n, DIM)
    inputs = {"image": image, "text": text}
    params = {**loss.params, "logit_scale": LOGIT_SCALE}
    expected = loss.reference(inputs, params)
    step = loss.impls[impl].make_step(inputs, params, {})
    benchmark.group = f"clip fwd+bwd, late-training logits (scale {LOGIT_SCALE:g}) n={n} d={DIM} fp32"
    value = benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info["gflops"] = round(loss.flops(n, n, DIM) / benchmark.stats.stats.median / 1e9, 1)
    rtol = 1e-5 if impl == "mmcl_fast" else BASELINE_RTOL[torch.float32]
    assert abs(float(value) - expected) <= rtol * abs(expected), (float(value), expected)
