"""CPU acceptance run: mmcl_fast vs open_clip (ClipLoss or SigLipLoss), forward+backward, in one process.

    python benchmarks/cpu_acceptance.py [--loss clip|siglip] [--n 16384] [--d 512] [--repeats 3] [--dtypes fp32,bf16]
                                        [--out benchmarks/results/cpu_acceptance.json]

For each dtype it interleaves timed forward+backward runs of both implementations on the same unit-norm features
(median of the repeats after one warm-up each; correlated pairs as in `mmcl-fast bench`), measures torch's matmul
GFLOP/s for that dtype in the same process, and reports achieved GFLOP/s (the loss's fused FLOP count over the time:
CLIP 8 N^2 D, SigLIP 6 N^2 D) and each loss's relative error against a float64 reference.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import mmcl_fast
from mmcl_fast.bench.impls import paired_features, streamed_lse64
from mmcl_fast.bench.machine import describe


def reference_loss(x, y, scale: float) -> float:
    """Symmetric CLIP loss in float64 on the same rounded inputs, never N x N (row blocks)."""
    row_lse, col_lse = streamed_lse64(x, y, scale)
    positives = scale * (x.double() * y.double()).sum(1)
    return (0.5 * ((row_lse - positives).mean() + (col_lse - positives).mean())).item()


def reference_siglip(x, y, scale: float, bias: float, block: int = 2048) -> float:
    """SigLIP loss in float64 on the same rounded inputs, one block of rows at a time (never N x N)."""
    total = 0.0
    y64 = y.double()
    for start in range(0, x.shape[0], block):
        logits = scale * x[start:start + block].double() @ y64.T + bias
        rows = torch.arange(start, min(start + block, x.shape[0]))
        logits[rows - start, rows] *= -1  # positives: z = +1, i.e. softplus(-L)
        total += torch.nn.functional.softplus(logits).sum().item()
    return total / x.shape[0]


LOSSES = {
    # name: (mmcl_fast fn, open_clip class name, fused FLOPs per N^2 D, GEMMs of open_clip's fwd+bwd per N^2 D,
    #        logit_scale, logit_bias)
    "clip": (lambda x, y, s, b: mmcl_fast.clip_loss(x, y, s), "ClipLoss", 8, 12, 14.3, None),
    "siglip": (lambda x, y, s, b: mmcl_fast.siglip_loss(x, y, s, b), "SigLipLoss", 6, 6, 10.0, -10.0),
}


def fwd_bwd(loss_fn, x, y, scale, bias=None):
    x.grad = y.grad = scale.grad = None
    if bias is not None:
        bias.grad = None
    start = time.perf_counter()
    loss = loss_fn(x, y, scale, bias)
    loss.backward()
    return time.perf_counter() - start, loss.detach().double().item()


def matmul_gflops(dtype, size=4096, inner=None, repeats=3):
    """Best-of-repeats rate of a (size x inner) @ (inner x size) matmul (inner=None: square); the size shrinks (by
    2) until one product takes under 2 s, so a dtype that this CPU multiplies slowly (bf16 without AVX512-BF16 /
    AMX: ~1 GFLOP/s) is timed in seconds."""
    while True:
        k = inner or size
        a, b = torch.randn(size, k).to(dtype), torch.randn(k, size).to(dtype)
        first = _timed(lambda: a @ b)
        if first < 2.0 or size <= 512:
            break
        size //= 2
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size * size * (inner or size) / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(n: int, d: int, repeats: int, slow_anchor_s: float = 300.0, loss: str = "clip",
        dtypes=("fp32", "bf16")) -> dict:
    import open_clip
    ours_fn, anchor_class, fused_flops, anchor_gemm_flops, scale_value, bias_value = LOSSES[loss]
    open_clip_loss = getattr(open_clip.loss, anchor_class)()
    impls = {"mmcl_fast": ours_fn,
             "open_clip": (lambda x, y, s, b: open_clip_loss(x, y, s)) if bias_value is None else open_clip_loss}
    records = []
    for dtype_name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        x, y = paired_features(n, d, dtype, seed=0)
        x, y = x.requires_grad_(), y.requires_grad_()
        scale = torch.tensor(scale_value, requires_grad=True)
        bias = None if bias_value is None else torch.tensor(bias_value, requires_grad=True)
        if loss == "clip":
            reference = reference_loss(x.detach(), y.detach(), scale_value)
        else:
            reference = reference_siglip(x.detach(), y.detach(), scale_value, bias_value)
        times = {name: [] for name in impls}
        losses = {}
        ceiling = matmul_gflops(dtype)
        # the GEMM of the loss itself: (4096 x D) @ (D x 4096), K = D, as `mmcl-fast bench` measures its ceiling
        loss_shape_ceiling = matmul_gflops(dtype, 4096, d)
        # An anchor whose GEMMs alone (CLIP: 12 N^2 D FLOPs, SigLIP: 6) would take over `slow_anchor_s` at the
        # measured matmul rate is timed once, without warm-up (bf16 on a CPU without native bf16 matmul: many
        # minutes per call at N=16384); the record says so.
        single = {name for name in impls
                  if name != "mmcl_fast" and anchor_gemm_flops * n * n * d / (ceiling * 1e9) > slow_anchor_s}
        for name, fn in impls.items():  # warm-up (lazy imports, allocator pools)
            if name not in single:
                fwd_bwd(fn, x, y, scale, bias)
        for rep in range(repeats):
            for name, fn in impls.items():
                if name in single and rep:
                    continue
                seconds, losses[name] = fwd_bwd(fn, x, y, scale, bias)
                times[name].append(seconds)
        for name in impls:
            seconds = statistics.median(times[name])
            records.append({
                "loss": loss, "impl": name, "dtype": dtype_name, "n": n, "d": d, "seconds": seconds,
                "all_seconds": times[name], "gflops": fused_flops * n * n * d / seconds / 1e9, "matmul_gflops": ceiling,
                "matmul_gflops_loss_shape": loss_shape_ceiling,
                "rel_err": abs(losses[name] - reference) / abs(reference),
                "timed_once_without_warmup": name in single,
            })
        ours = next(r for r in records if r["impl"] == "mmcl_fast" and r["dtype"] == dtype_name)
        theirs = next(r for r in records if r["impl"] == "open_clip" and r["dtype"] == dtype_name)
        ours["speedup_vs_open_clip"] = theirs["seconds"] / ours["seconds"]
        ours["fraction_of_matmul"] = ours["gflops"] / ceiling
        ours["fraction_of_loss_shape_matmul"] = ours["gflops"] / loss_shape_ceiling
    machine = describe(torch.device("cpu"), list(dtypes), measure_matmul=False)
    return {"machine": machine, "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=sorted(LOSSES), default="clip")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-anchor-s", type=float, default=300.0,
                        help="time an anchor once (no warm-up) when its GEMMs alone would take longer than this")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_acceptance.json"))
    args = parser.parse_args()
    dtypes = [item.strip() for item in args.dtypes.split(",") if item.strip()]
    if not dtypes or any(item not in ("fp32", "bf16") for item in dtypes):
        parser.error(f"--dtypes takes fp32 and/or bf16, got {args.dtypes!r}")
    result = run(args.n, args.d, args.repeats, args.slow_anchor_s, args.loss, dtypes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"CPU: {result['machine']['cpu']}, CPU kernel ISA: {result['machine']['cpu_kernel_isa']}")
    for r in result["records"]:
        extra = (f"  {r['speedup_vs_open_clip']:.2f}x vs open_clip, {100 * r['fraction_of_matmul']:.0f}% of the "
                 f"square matmul, {100 * r['fraction_of_loss_shape_matmul']:.0f}% of the loss-shape matmul "
                 f"({r['matmul_gflops_loss_shape']:.0f} GFLOP/s)" if r["impl"] == "mmcl_fast" else "")
        print(f"{r['loss']} {r['impl']:>9} {r['dtype']} N={r['n']} D={r['d']}: {r['seconds']:.2f} s, {r['gflops']:.0f} GFLOP/s "
              f"(matmul {r['matmul_gflops']:.0f}), rel err {r['rel_err']:.1e}{extra}")


if __name__ == "__main__":
    main()
