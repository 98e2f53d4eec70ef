"""GPU benchmark of the Triton backend: symmetric CLIP loss, forward + backward, bf16, against the anchors.

    python benchmarks/bench_triton_gpu.py                          # the full sweep (N x D below), ~15 min
    python benchmarks/bench_triton_gpu.py --sizes 32768 --dims 768 # one problem
    python benchmarks/bench_triton_gpu.py --max-n                  # + largest N that fits, D=512 bf16
    pytest benchmarks/bench_triton_gpu.py --benchmark-only         # pytest-benchmark regression case

Per (N, D) and implementation: median time of a full forward + backward (features and logit_scale get
gradients), the peak `torch.cuda.max_memory_allocated` above the inputs, the achieved rate 8 N^2 D / time (the
4 GEMM-equivalents of a fused symmetric loss; the same count is used for every implementation, so the rates
compare times), and that rate over torch's bf16 matmul rate measured in the same run on an (N, D) x (D, N)
GEMM. Implementations: mmcl_fast (backend="triton"; "mmcl_fast:cublas" runs the backward's two GEMMs in
cuBLAS instead of the Triton GEMM), open_clip `ClipLoss` (dense N x N; skipped when its
logits would not fit), Inf-CL `cal_inf_loss` in both directions (when `inf_cl` imports). Our loss is checked
against a float64 streamed reference on the same rounded inputs (sizes up to --check-up-to).

Writes benchmarks/results/triton_gpu_<device>.json (device, torch/triton versions, commit, date, every record)
and a .png next to it, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = (8192, 32768, 131072, 524288)
DIMS = (512, 768, 1024)
IMPLS = ("mmcl_fast", "mmcl_fast:cublas", "inf_cl", "open_clip")
LOGIT_SCALE = 100.0
TOLERANCE = 1e-4  # relative, bf16 inputs, fp32 loss (tests/tolerances.py LOSS_RTOL)


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------

def _cuda_seconds(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def matmul_tflops(n: int, d: int, repeats: int = 10) -> float:
    """torch's bf16 (n, d) x (d, n) GEMM rate, best of `repeats`: the ceiling the loss is compared with."""
    a = torch.randn(n, d, device="cuda").bfloat16()
    b = torch.randn(n, d, device="cuda").bfloat16()
    torch.mm(a, b.T)
    best = min(_cuda_seconds(lambda: torch.mm(a, b.T)) for _ in range(repeats))
    del a, b
    return 2 * n * n * d / best / 1e12


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release():
    gc.collect()
    torch.cuda.empty_cache()


def measure(impl_name: str, n: int, d: int, *, target_seconds: float, check: bool) -> dict:
    """One record: warm-up (autotuning included), peak memory of one step, median of timed repeats.

    impl_name: an impl of the bench registry, or "mmcl_fast:cublas" (mmcl_fast with the backward GEMMs in
    cuBLAS instead of Triton, MMCL_FAST_TRITON_GEMM=cublas)."""
    from mmcl_fast.bench.impls import get_loss, paired_features
    clip = get_loss("clip")
    base_name, _, engine = impl_name.partition(":")
    impl = clip.impls[base_name]
    record = {"impl": impl_name, "n": n, "d": d, "dtype": "bf16", "status": "ok"}
    reason = impl.unavailable(torch.device("cuda"), d)
    if reason:
        return {**record, "status": "unavailable", "error": reason}
    free, _ = torch.cuda.mem_get_info()
    if impl.dense and impl.estimate_bytes(n, n, d, torch.bfloat16) > 0.9 * free:
        need = impl.estimate_bytes(n, n, d, torch.bfloat16) / 2**30
        return {**record, "status": "skipped", "error": f"dense N x N needs ~{need:.0f} GiB, {free / 2**30:.0f} free"}
    step = None
    previous_engine = os.environ.get("MMCL_FAST_TRITON_GEMM")
    os.environ["MMCL_FAST_TRITON_GEMM"] = engine or "triton"
    try:
        image, text = paired_features(n, d, torch.bfloat16, seed=0)
        inputs = {"image": image.cuda(), "text": text.cuda()}
        del image, text
        options = {"backend": "triton"} if base_name == "mmcl_fast" else {}
        step = impl.make_step(inputs, clip.params, options)
        first = _cuda_seconds(step)  # compiles and autotunes
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        probe_seconds = _cuda_seconds(step)
        record["peak_bytes_above_inputs"] = torch.cuda.max_memory_allocated() - base
        record["peak_bytes"] = torch.cuda.max_memory_allocated()
        repeats = max(2, min(20, math.ceil(target_seconds / max(probe_seconds, 1e-6))))
        times = [_cuda_seconds(step) for _ in range(repeats)]
        record.update(first_seconds=first, seconds=statistics.median(times), times=times)
        if check:
            ours = float(step())
            exact = clip.reference(inputs, clip.params)
            record["loss"], record["reference_loss"] = ours, exact
            record["rel_error"] = abs(ours - exact) / abs(exact)
            if base_name == "mmcl_fast" and record["rel_error"] > TOLERANCE:
                record["status"] = "wrong"
        if base_name == "mmcl_fast":
            record["configs"] = _chosen_configs()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a record
        record.update(status="oom" if _is_oom(exc) else "error", error=f"{type(exc).__name__}: {exc}"[:1000])
    finally:
        inputs = step = None  # noqa: F841
        _release()
        if previous_engine is None:
            os.environ.pop("MMCL_FAST_TRITON_GEMM", None)
        else:
            os.environ["MMCL_FAST_TRITON_GEMM"] = previous_engine
    return record


def _chosen_configs() -> dict:
    """The tile shapes the autotuner picked (for the record)."""
    from mmcl_fast.backends.triton import matmul, sweep
    chosen = {}
    for name, kernel in (("forward", sweep._lse_partials_kernel), ("gradient_tiles", sweep._grad_tile_kernel),
                         ("gemm", matmul._accumulate_matmul_kernel)):
        config = getattr(kernel, "best_config", None)
        if config is not None:
            chosen[name] = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return chosen


def largest_n(d: int = 512, probes=(65536, 131072, 262144)) -> dict:
    """Largest N whose forward + backward fits the GPU, from the peak memory measured at a few N.

    Every buffer of the loss is O(N): peak = a N + b. The fit over the probes gives the N where the peak
    reaches the device's memory (less 2 GiB for the CUDA context and allocator slack)."""
    peaks = []
    for n in probes:
        record = measure("mmcl_fast", n, d, target_seconds=0.0, check=False)
        if record["status"] != "ok":
            return {"d": d, "status": record["status"], "error": record.get("error"), "probes": peaks}
        peaks.append((n, record["peak_bytes"]))
    ns = [n for n, _ in peaks]
    ys = [p for _, p in peaks]
    mean_n, mean_y = statistics.fmean(ns), statistics.fmean(ys)
    slope = sum((n - mean_n) * (y - mean_y) for n, y in zip(ns, ys)) / sum((n - mean_n) ** 2 for n in ns)
    intercept = mean_y - slope * mean_n
    total = torch.cuda.get_device_properties(0).total_memory
    n_max = int((total - 2 * 2**30 - intercept) / slope)
    residual = max(abs(y - (slope * n + intercept)) / y for n, y in peaks)
    return {"d": d, "dtype": "bf16", "status": "ok", "probes": [{"n": n, "peak_bytes": p} for n, p in peaks],
            "bytes_per_row": slope, "fixed_bytes": intercept, "device_bytes": total,
            "largest_n_predicted": n_max, "max_fit_residual": residual}


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------

def table(records: list[dict], ceilings: dict) -> str:
    by_problem = {}
    for r in records:
        by_problem.setdefault((r["n"], r["d"]), {})[r["impl"]] = r
    lines = ["| N | D | impl | time (ms) | peak above inputs (GiB) | TFLOP/s | % of bf16 matmul | vs Inf-CL | "
             "vs open_clip |", "|---|---|---|---|---|---|---|---|---|"]
    for (n, d), impls in sorted(by_problem.items()):
        for name in IMPLS:
            r = impls.get(name)
            if r is None:
                continue
            if r["status"] not in ("ok", "wrong"):
                lines.append(f"| {n} | {d} | {name} | {r['status']} | | | | | |")
                continue
            tflops = 8 * n * n * d / r["seconds"] / 1e12
            ratios = []
            for anchor in ("inf_cl", "open_clip"):
                other = impls.get(anchor)
                ok = other is not None and other["status"] == "ok" and name != anchor
                ratios.append(f"{other['seconds'] / r['seconds']:.2f}x" if ok else "")
            lines.append(f"| {n} | {d} | {name} | {r['seconds'] * 1e3:.1f} | "
                         f"{r['peak_bytes_above_inputs'] / 2**30:.2f} | {tflops:.0f} | "
                         f"{100 * tflops / ceilings[str(d)]:.0f}% | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def plot(records: list[dict], ceilings: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = sorted({r["d"] for r in records})
    fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for name in IMPLS:
            points = sorted((r["n"], 8 * r["n"] ** 2 * d / r["seconds"] / 1e12) for r in records
                            if r["impl"] == name and r["d"] == d and r["status"] == "ok")
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.axhline(ceilings[str(d)], color="gray", linestyle="--", label="torch bf16 matmul")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N = M")
        ax.set_ylabel("8 N^2 D / time (TFLOP/s)")
        ax.set_title(f"CLIP loss fwd+bwd, bf16, D={d}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--dims", default=",".join(map(str, DIMS)))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--target-seconds", type=float, default=2.0, help="time budget per record's repeats")
    parser.add_argument("--check-up-to", type=int, default=131072, help="largest N checked against float64")
    parser.add_argument("--max-n", action="store_true", help="also predict the largest N that fits (D=512)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/triton_gpu_<gpu>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_gpu needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from mmcl_fast.bench.machine import describe
    sizes = [int(s) for s in args.sizes.split(",")]
    dims = [int(s) for s in args.dims.split(",")]
    impls = [s for s in args.impls.split(",") if s]
    device_name = torch.cuda.get_device_name(0)
    machine = describe(torch.device("cuda"), ["bf16"], sizes=sizes, dims=dims, measure_matmul=False)
    ceilings = {str(d): matmul_tflops(min(max(sizes), 16384), d) for d in dims}
    result = {"benchmark": "clip_loss fwd+bwd, bf16, logit_scale=100", "device": device_name,
              "torch": torch.__version__, "triton": triton.__version__, "commit": machine.get("git_commit"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "staged_chunk_mb": float(os.environ.get("MMCL_FAST_TRITON_CHUNK_MB", "128")),
              "bf16_matmul_tflops": ceilings, "machine": machine, "records": []}
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"triton_gpu_{_slug(device_name)}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for d in dims:
        for n in sizes:
            for name in impls:
                record = measure(name, n, d, target_seconds=args.target_seconds, check=n <= args.check_up_to)
                result["records"].append(record)
                shown = f"{record['seconds'] * 1e3:.1f} ms" if record["status"] == "ok" else record.get("error", "")
                print(f"N={n} D={d} {name}: {record['status']} {shown}", flush=True)
                with open(out, "w") as f:  # keep what is done if a later record dies
                    json.dump(result, f, indent=1)
    if args.max_n:
        result["largest_n"] = largest_n()
        print("largest N (D=512, bf16):", result["largest_n"].get("largest_n_predicted"), flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result["records"], ceilings))
    plot(result["records"], ceilings, os.path.splitext(out)[0] + ".png")
    print(f"wrote {out}")
    return 0 if all(r["status"] != "wrong" for r in result["records"]) else 1


# ---------------------------------------------------------------------------------------------------------------
# pytest-benchmark regression case (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------------

def test_triton_clip_fwd_bwd_gpu(benchmark):
    import pytest
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mmcl_fast.bench.impls import get_loss, paired_features
    clip = get_loss("clip")
    n, d = 32768, 768
    image, text = paired_features(n, d, torch.bfloat16, seed=0)
    inputs = {"image": image.cuda(), "text": text.cuda()}
    step = clip.impls["mmcl_fast"].make_step(inputs, clip.params, {"backend": "triton"})
    step()

    def synced():
        step()
        torch.cuda.synchronize()
    benchmark.pedantic(synced, rounds=5, warmup_rounds=1)
    benchmark.extra_info["tflops"] = 8 * n * n * d / benchmark.stats.stats.median / 1e12


if __name__ == "__main__":
    sys.exit(main())
