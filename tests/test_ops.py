"""The streamed-LSE primitive (affine_lse) and infonce, CPU kernel (every ISA build the CPU runs) and the blocked torch
backend vs a float64 dense reference."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mmcl_fast
from mmcl_fast.backends import cpu as cpu_backend
from tolerances import GRAD_RTOL, LOSS_RTOL, assert_rel_close

_C = cpu_backend._module()
ISAS = cpu_backend.runnable_isas()  # every build this CPU runs (e.g. avx2 + scalar, or avx512-bf16 ... scalar)


@pytest.fixture(params=[f"cpu:{isa}" for isa in ISAS] + ["torch"])
def kernel(request):
    """A streamed backend to test: the compiled CPU kernel in each ISA build this CPU runs, and the torch backend."""
    backend, _, isa = request.param.partition(":")
    if not isa:
        yield backend
        return
    previous = cpu_backend.isa()
    cpu_backend.set_isa(isa)
    yield backend
    cpu_backend.set_isa(previous)


def dense_lse(x, y, scale, row_bias, col_bias):
    logits = scale[:, None] * (x @ y.T) + row_bias[:, None] + col_bias[None, :]
    return torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (2, 3, 7), (97, 389, 1000), (1000, 4097, 3), (4097, 129, 64),
                                   (193, 192, 65), (96, 97, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_affine_lse_and_grads_match_reference(kernel, n, m, d, dtype):
    """Per-row scale, row and column biases, arbitrary output weights: every input's gradient."""
    x = F.normalize(torch.randn(n, d), dim=1).to(dtype)
    y = F.normalize(torch.randn(m, d), dim=1).to(dtype)
    scale = torch.rand(n) * 50 + 0.01
    row_bias, col_bias = torch.randn(n), torch.randn(m)
    w_row, w_col = torch.randn(n), torch.randn(m)
    ours = [t.clone().requires_grad_() for t in (x, y, scale, row_bias, col_bias)]
    row_lse, col_lse = mmcl_fast.affine_lse(*ours, backend=kernel)
    assert row_lse.dtype == col_lse.dtype == torch.float32
    ((row_lse * w_row).sum() + (col_lse * w_col).sum()).backward()
    ref = [t.double().requires_grad_() for t in (x, y, scale, row_bias, col_bias)]
    ref_row, ref_col = dense_lse(*ref)
    ((ref_row * w_row.double()).sum() + (ref_col * w_col.double()).sum()).backward()
    assert_rel_close(row_lse, ref_row, LOSS_RTOL[dtype], "row_lse")
    assert_rel_close(col_lse, ref_col, LOSS_RTOL[dtype], "col_lse")
    for ours_t, ref_t, name in zip(ours, ref, ["dx", "dy", "dscale", "drow_bias", "dcol_bias"]):
        assert ours_t.grad.dtype == ours_t.dtype
        # scale / bias gradients are fp32 outputs (no rounding to the features' dtype)
        rtol = GRAD_RTOL[dtype] if name in ("dx", "dy") else GRAD_RTOL[torch.float32] * 10
        assert_rel_close(ours_t.grad, ref_t.grad, rtol, name)


@pytest.mark.parametrize("scale", [150.0, 400.0])
def test_logits_in_the_denormal_range_stay_exact_and_leave_torch_alone(kernel, scale):
    """Scales of 150-400 put exp(logit - row max) of many pairs in the fp32 denormal range, which the CPU kernel
    flushes to zero for speed (csrc/sweep.h, FlushDenormals): the LSEs and every gradient still match float64, and
    afterwards torch still produces denormals on every OpenMP thread (the kernel restored the FP mode)."""
    torch.manual_seed(int(scale))
    x, y = F.normalize(torch.randn(301, 48), dim=1), F.normalize(torch.randn(257, 48), dim=1)
    row_bias, col_bias = torch.randn(301), torch.randn(257)
    w_row, w_col = torch.randn(301), torch.randn(257)
    ours = [t.clone().requires_grad_() for t in (x, y, torch.full((301,), scale), row_bias, col_bias)]
    row_lse, col_lse = mmcl_fast.affine_lse(*ours, backend=kernel)
    ((row_lse * w_row).sum() + (col_lse * w_col).sum()).backward()
    ref = [t.double().requires_grad_() for t in (x, y, torch.full((301,), scale), row_bias, col_bias)]
    ref_row, ref_col = dense_lse(*ref)
    ((ref_row * w_row.double()).sum() + (ref_col * w_col.double()).sum()).backward()
    assert_rel_close(row_lse, ref_row, 1e-5, "row_lse")
    assert_rel_close(col_lse, ref_col, 1e-5, "col_lse")
    for ours_t, ref_t, name in zip(ours, ref, ["dx", "dy", "dscale", "drow_bias", "dcol_bias"]):
        assert_rel_close(ours_t.grad, ref_t.grad, 1e-5, name)
    tiny = torch.full((1 << 18,), 1e-38) / 10  # 1e-39: a denormal, computed on torch's threads
    assert bool((tiny > 0).all()), "denormals are flushed after the kernel: the FP mode leaked into torch"


@pytest.mark.parametrize("need_row,need_col", [(True, False), (False, True)])
def test_one_sided_lse(kernel, need_row, need_col):
    x, y = torch.randn(130, 20), torch.randn(77, 20)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    row_lse, col_lse = mmcl_fast.affine_lse(xs, ys, 0.5, need_row=need_row, need_col=need_col, backend=kernel)
    out = row_lse if need_row else col_lse
    assert (row_lse.numel() == 0) != (col_lse.numel() == 0)
    out.sum().backward()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    logits = 0.5 * xr @ yr.T
    ref = torch.logsumexp(logits, 1 if need_row else 0)
    ref.sum().backward()
    assert_rel_close(out, ref, 1e-5, "lse")
    assert_rel_close(xs.grad, xr.grad, 1e-5, "dx")
    assert_rel_close(ys.grad, yr.grad, 1e-5, "dy")


@pytest.mark.parametrize("per_row_scale", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_infonce_squared_l2(kernel, per_row_scale, symmetric):
    n, d = 150, 10
    q, k = torch.randn(n, d), torch.randn(n, d)
    scale = torch.rand(n) + 0.5 if per_row_scale else torch.tensor(0.7)
    qs, ks, ss = q.clone().requires_grad_(), k.clone().requires_grad_(), scale.clone().requires_grad_()
    loss = mmcl_fast.infonce(qs, ks, ss, similarity="sqeuclidean", symmetric=symmetric, backend=kernel)
    loss.backward()
    qr, kr, sr = q.double().requires_grad_(), k.double().requires_grad_(), scale.double().requires_grad_()
    logits = -(sr[:, None] if per_row_scale else sr) * torch.cdist(qr, kr) ** 2
    target = torch.arange(n)
    ref = F.cross_entropy(logits, target)
    if symmetric:
        ref = 0.5 * (ref + F.cross_entropy(logits.T, target))
    ref.backward()
    assert_rel_close(loss, ref, 1e-5, "loss")
    assert_rel_close(qs.grad, qr.grad, 1e-5, "d query")
    assert_rel_close(ks.grad, kr.grad, 1e-5, "d keys")
    assert_rel_close(ss.grad, sr.grad, 1e-5, "d scale")


def test_infonce_reduction_none_and_sum():
    q, k = torch.randn(40, 8), torch.randn(40, 8)
    rows, cols = mmcl_fast.infonce(q, k, 2.0, reduction="none")
    logits = 2.0 * q.double() @ k.double().T
    target = torch.arange(40)
    assert_rel_close(rows, F.cross_entropy(logits, target, reduction="none"), 1e-5, "row losses")
    assert_rel_close(cols, F.cross_entropy(logits.T, target, reduction="none"), 1e-5, "col losses")
    total = mmcl_fast.infonce(q, k, 2.0, reduction="sum", symmetric=False)
    assert_rel_close(total, F.cross_entropy(logits, target, reduction="sum"), 1e-5, "sum")


def test_thread_counts_agree_and_are_each_deterministic():
    x, y = torch.randn(900, 64), torch.randn(700, 64)
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs = [mmcl_fast.affine_lse(x, y, 3.0, backend="cpu") for _ in range(2)]
            assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
            results[threads] = runs[0]
    finally:
        torch.set_num_threads(previous)
    for threads in (2, 3):
        assert_rel_close(results[threads][0], results[1][0], 1e-6, "row_lse across thread counts")
        assert_rel_close(results[threads][1], results[1][1], 1e-6, "col_lse across thread counts")


def test_isa_environment_override():
    code = "import mmcl_fast.backends.cpu as c; print(c.isa())"
    env = dict(os.environ, MMCL_FAST_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    env["MMCL_FAST_CPU_ISA"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MMCL_FAST_CPU_ISA" in bad.stderr


def test_isa_the_cpu_lacks_is_a_clear_error():
    """Naming a compiled build whose instructions this CPU lacks raises (never SIGILL), in-process and at import."""
    missing = [name for name, ok in cpu_backend.compiled_isas().items() if not ok]
    if not missing:
        pytest.skip("this CPU runs every ISA build compiled here")
    with pytest.raises(RuntimeError, match=f"lacks the instructions of the {missing[0]} build"):
        cpu_backend.set_isa(missing[0])
    assert cpu_backend.isa() in ISAS  # the build in use did not change
    code = "import mmcl_fast.backends.cpu as c; print(c.isa())"
    env = dict(os.environ, MMCL_FAST_CPU_ISA=missing[0])
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and f"MMCL_FAST_CPU_ISA='{missing[0]}'" in bad.stderr, bad.stderr


def test_compiled_isas_list_the_portable_build_last():
    builds = cpu_backend.compiled_isas()
    assert list(builds)[-1] == "scalar" and builds["scalar"]
    assert cpu_backend.isa() == cpu_backend.runnable_isas()[0]  # auto picks the best build the CPU runs


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch, mmcl_fast
    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    n, d, dtype, backend = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4]
    torch.set_num_threads(2)
    x = torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype).requires_grad_()
    scale = torch.tensor(14.0, requires_grad=True)
    # warm up on a tiny problem so that lazy imports / allocator pools are not counted
    mmcl_fast.clip_loss(x[:8], y[:8], scale, backend=backend).backward()
    x.grad = y.grad = scale.grad = None
    base = hwm_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    base = min(base, hwm_kib())
    loss = mmcl_fast.clip_loss(x, y, scale, backend=backend)
    loss.backward()
    print(hwm_kib() - base, 2 * x.numel() * x.element_size() // 1024)
""")


def _peak_growth_kib(n, d, dtype="float32", backend="auto"):
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(n), str(d), dtype, backend], capture_output=True,
                         text=True, check=True)
    growth, inputs = map(int, out.stdout.split())
    return growth, inputs


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_no_quadratic_memory(backend):
    """N=8192, D=64: one N x N fp32 buffer would be 256 MiB; the inputs are 4 MiB (torch backend: + its tiles)."""
    from mmcl_fast.backends import blocked
    tiles = 3 * blocked.tile_elements(torch.device("cpu")) * 4 // 1024 if backend == "torch" else 0  # S, L, G
    growth, inputs = _peak_growth_kib(8192, 64, backend=backend)
    assert growth < 64 * 1024 + tiles, f"peak RSS grew by {growth / 1024:.1f} MiB (inputs {inputs / 1024:.1f} MiB)"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_memory_acceptance_n32768_d512(backend):
    """Acceptance: fwd+bwd at N=32768, D=512 fp32 raises peak RSS by at most 4x the two inputs (the torch
    backend: plus its tiles, three of tile_elements fp32 values at most)."""
    from mmcl_fast.backends import blocked
    tiles = 3 * blocked.tile_elements(torch.device("cpu")) * 4 // 1024 if backend == "torch" else 0  # S, L, G
    growth, inputs = _peak_growth_kib(32768, 512, backend=backend)
    print(f"{backend}: peak RSS growth {growth / 1024:.0f} MiB = {growth / inputs:.2f}x the inputs")
    assert growth <= 4 * inputs + tiles, (f"peak RSS grew by {growth / 1024:.0f} MiB, 4x inputs = "
                                          f"{4 * inputs / 1024:.0f} MiB (+ tiles {tiles / 1024:.0f} MiB)")


def test_blocked_linear_statistics(monkeypatch):
    """Positives and label-smoothing sums are computed over row blocks (bounded temporaries): force tiny blocks."""
    from mmcl_fast import _stats
    monkeypatch.setattr(_stats, "STATS_BLOCK_ROWS", 7)
    x, y = torch.randn(50, 9), torch.randn(23, 9)
    image_labels, text_labels = torch.randint(0, 23, (50,)), torch.randint(0, 50, (23,))
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = mmcl_fast.clip_loss(xs, ys, 2.0, 0.3, image_labels=image_labels, text_labels=text_labels,
                               label_smoothing=0.3)
    loss.backward()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    logits = 2.0 * xr @ yr.T + 0.3
    ref = 0.5 * (F.cross_entropy(logits, image_labels, label_smoothing=0.3)
                 + F.cross_entropy(logits.T, text_labels, label_smoothing=0.3))
    ref.backward()
    assert_rel_close(loss, ref, 1e-5, "loss")
    assert_rel_close(xs.grad, xr.grad, 1e-5, "d image")
    assert_rel_close(ys.grad, yr.grad, 1e-5, "d text")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_backend_many_tiles_match_reference(monkeypatch, dtype):
    """Tiny tiles (7 columns x 9 rows) so that rows and columns both span many tiles, with labels whose positives
    fall in every tile, label smoothing and a bias: the online merges and the per-tile target folding."""
    from mmcl_fast.backends import blocked
    monkeypatch.setattr(blocked, "TILE_ELEMENTS", {"cpu": 63})
    monkeypatch.setattr(blocked, "MAX_BLOCK_COLS", {"cpu": 7})
    n, m, d = 41, 30, 11
    x = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)
    y = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=1).to(dtype)
    image_labels, text_labels = torch.randint(0, m, (n,)), torch.randint(0, n, (m,))
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale, bias = torch.tensor(30.0, dtype=acc, requires_grad=True), torch.tensor(-2.0, dtype=acc, requires_grad=True)
    loss = mmcl_fast.clip_loss(xs, ys, scale, bias, image_labels=image_labels, text_labels=text_labels,
                               label_smoothing=0.2, backend="torch")
    loss.backward()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    sr, br = torch.tensor(30.0, dtype=torch.float64, requires_grad=True), torch.tensor(-2.0, dtype=torch.float64,
                                                                                        requires_grad=True)
    logits = sr * xr @ yr.T + br
    ref = 0.5 * (F.cross_entropy(logits, image_labels, label_smoothing=0.2)
                 + F.cross_entropy(logits.T, text_labels, label_smoothing=0.2))
    ref.backward()
    assert_rel_close(loss, ref, LOSS_RTOL[dtype], "loss")
    assert_rel_close(xs.grad, xr.grad, GRAD_RTOL[dtype], "d image")
    assert_rel_close(ys.grad, yr.grad, GRAD_RTOL[dtype], "d text")
    assert_rel_close(scale.grad, sr.grad, GRAD_RTOL[dtype], "d scale", floor=1.0)
    assert_rel_close(bias.grad, br.grad, GRAD_RTOL[dtype], "d bias", floor=1.0)
