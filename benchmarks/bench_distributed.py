"""Distributed CLIP loss: per-rank peak memory and step time, mmcl_fast vs open_clip, in real process groups.

    python benchmarks/bench_distributed.py                        # gloo, 2 ranks, N = 2048 4096 8192, D = 512
    python benchmarks/bench_distributed.py --sizes 4096 --world-size 3 --dtype bf16
    python benchmarks/bench_distributed.py --dist-backend nccl    # one CUDA device per rank

Both sides run ``ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)`` forward and
``(loss / W).backward()`` on the same per-rank inputs (global batch N split evenly, logit_scale 100). open_clip
gathers image and text features and builds two N/W x N logit matrices per rank; mmcl_fast gathers the captions
only and streams the N/W x N block through the fused kernel, merging column LSEs across ranks (O(N) numbers).

Every (implementation, N) record runs in a fresh group of W processes, so no allocator cache of an earlier record
hides or inflates its memory. Per rank: the peak RSS growth over the measured steps (CPU: VmHWM reset through
/proc/self/clear_refs; CUDA: max_memory_allocated growth) and each step's wall time; a step's time is the slowest
rank's. Each record's global loss (sum_r loss_r / W) is checked against a float64 loss computed in row chunks in
the parent. Writes JSON (+ a PNG with --plot) with the machine, versions and commit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("mmcl_fast", "open_clip")
LOGIT_SCALE = 100.0
WARMUP_LOCAL_BATCH = 64
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def global_features(n: int, dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch every rank slices from (regenerated identically in the parent for the check)."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=generator), dim=1).to(dtype)
    text = F.normalize(torch.randn(n, dim, generator=generator), dim=1).to(dtype)
    return image, text


def reference_loss(image: torch.Tensor, text: torch.Tensor, scale: float, chunk: int = 1024) -> float:
    """float64 CLIP loss on the global batch, in row chunks (chunk x N logits at a time)."""
    image, text = image.double(), text.double()
    n = image.shape[0]
    row_terms = 0.0
    col_lse = torch.full((n,), -math.inf, dtype=torch.float64)
    for start in range(0, n, chunk):
        logits = scale * image[start:start + chunk] @ text.T
        labels = torch.arange(start, start + logits.shape[0])
        row_terms += F.cross_entropy(logits, labels, reduction="sum").item()
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
    positives = scale * (image * text).sum(1)
    return 0.5 * (row_terms + (col_lse - positives).sum().item()) / n


def _make_loss(impl: str, rank: int, world: int):
    if impl == "mmcl_fast":
        from mmcl_fast import ClipLoss
    else:
        from open_clip.loss import ClipLoss
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)


def _worker(rank: int, world: int, init_file: str, config: dict, out_file: str) -> None:
    import torch.distributed as dist

    from mmcl_fast.bench.memory import peak_probe
    try:
        torch.set_num_threads(config["threads"])
        device = torch.device("cuda", rank) if config["dist_backend"] == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(config["dist_backend"], init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600))
        dtype, n_global = DTYPES[config["dtype"]], config["global_batch"]
        loss_fn = _make_loss(config["impl"], rank, world)
        scale = torch.tensor(LOGIT_SCALE, device=device, requires_grad=True)

        def step(image, text):
            image.grad = text.grad = scale.grad = None
            loss = loss_fn(image, text, scale)
            (loss / world).backward()
            return loss.detach()

        warm = [F.normalize(torch.randn(WARMUP_LOCAL_BATCH, config["dim"]), dim=1).to(device, dtype)
                .requires_grad_() for _ in range(2)]
        step(*warm)  # thread pools, kernels, communication buffers
        del warm
        image, text = global_features(n_global, config["dim"], dtype, config["seed"])
        rows = slice(rank * n_global // world, (rank + 1) * n_global // world)
        image = image[rows].clone().to(device).requires_grad_()
        text = text[rows].clone().to(device).requires_grad_()
        times = []
        dist.barrier()
        with peak_probe(device) as probe:
            for _ in range(config["repeats"]):
                start = time.perf_counter()
                loss = step(image, text)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
                dist.barrier()
        total = loss.float().clone()
        dist.all_reduce(total)
        record = {"rank": rank, "local_batch": image.shape[0], "peak_bytes": probe.peak_bytes,
                  "memory_method": probe.method, "step_s": times, "global_loss": float(total) / world}
        with open(out_file, "w") as handle:
            json.dump(record, handle)
        dist.destroy_process_group()
    except BaseException:
        with open(out_file + ".err", "w") as handle:
            handle.write(traceback.format_exc())
        raise


def run_record(config: dict, world: int, timeout_s: float) -> list[dict]:
    """One (implementation, N) record in a fresh group of `world` processes; returns the per-rank records."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="mmcl_bench_dist_") as tmp:
        outs = [os.path.join(tmp, f"rank{rank}.json") for rank in range(world)]
        procs = [ctx.Process(target=_worker, args=(rank, world, os.path.join(tmp, "rendezvous"), config, outs[rank]))
                 for rank in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout_s)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        errors = [Path(out + ".err").read_text() for out in outs if os.path.exists(out + ".err")]
        if errors or not all(os.path.exists(out) for out in outs):
            raise RuntimeError(f"record {config} failed:\n" + "\n".join(errors or ["(timed out)"]))
        return [json.loads(Path(out).read_text()) for out in outs]


def summarize(config: dict, per_rank: list[dict], reference: float | None) -> dict:
    world = len(per_rank)
    step_s = [max(rank["step_s"][i] for rank in per_rank) for i in range(len(per_rank[0]["step_s"]))]
    n, n_local = config["global_batch"], per_rank[0]["local_batch"]
    loss = per_rank[0]["global_loss"]
    return {
        **{key: config[key] for key in ("impl", "global_batch", "dim", "dtype", "dist_backend", "threads")},
        "world_size": world,
        "local_batch": n_local,
        "peak_bytes_per_rank": [rank["peak_bytes"] for rank in per_rank],
        "peak_mib_max_rank": round(max(rank["peak_bytes"] or 0 for rank in per_rank) / 2**20, 1),
        "memory_method": per_rank[0]["memory_method"],
        "step_s": step_s,
        # the first measured step also pays one-time costs (first touch of the large buffers): median of all
        "median_step_s": statistics.median(step_s),
        # what each side must hold at least: open_clip two N_local x N fp32 logit matrices (+ their softmax
        # gradients), mmcl_fast the gathered captions and their gradient
        "logits_mib_open_clip": round(2 * n_local * n * 4 / 2**20, 1),
        "gathered_mib_mmcl_fast": round(2 * n * config["dim"] * DTYPES[config["dtype"]].itemsize / 2**20, 1),
        "global_loss": loss,
        "reference_loss_fp64": reference,
        "loss_rel_err": None if reference is None else abs(loss - reference) / abs(reference),
    }


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for impl in IMPLS:
        rows = sorted((r for r in records if r["impl"] == impl), key=lambda r: r["global_batch"])
        if not rows:
            continue
        sizes = [r["global_batch"] for r in rows]
        ax_mem.plot(sizes, [r["peak_mib_max_rank"] for r in rows], "o-", label=impl)
        ax_time.plot(sizes, [r["median_step_s"] for r in rows], "o-", label=impl)
    first = records[0]
    for ax, label in ((ax_mem, "peak RSS growth per rank (MiB)"), (ax_time, "fwd+bwd step (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"ClipLoss(local_loss, gather_with_grad), {first['dist_backend']}, W={first['world_size']}, "
                 f"D={first['dim']}, {first['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="global batch sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeats", type=int, default=3, help="measured steps per record")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / W)")
    parser.add_argument("--dist-backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the float64 loss check in the parent")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per record")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--plot", action="store_true", help="also write a PNG next to the JSON")
    args = parser.parse_args(argv)

    from mmcl_fast.bench.machine import describe
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.world_size)
    device = torch.device("cuda") if args.dist_backend == "nccl" else torch.device("cpu")
    out = args.out or RESULTS_DIR / f"distributed_{args.dist_backend}_w{args.world_size}_{args.dtype}.json"
    machine = describe(device, [args.dtype], measure_matmul=False)
    records = []
    for n in args.sizes:
        if n % args.world_size:
            parser.error(f"global batch {n} is not a multiple of --world-size {args.world_size} (open_clip needs "
                         "equal local batches)")
        reference = None
        if not args.no_check:
            reference = reference_loss(*global_features(n, args.dim, DTYPES[args.dtype], args.seed), LOGIT_SCALE)
        for impl in args.impls:
            config = {"impl": impl, "global_batch": n, "dim": args.dim, "dtype": args.dtype, "seed": args.seed,
                      "repeats": args.repeats, "threads": threads, "dist_backend": args.dist_backend}
            record = summarize(config, run_record(config, args.world_size, args.timeout), reference)
            records.append(record)
            err = "-" if record["loss_rel_err"] is None else f"{record['loss_rel_err']:.1e}"
            print(f"{impl:>10}  N={n:>6}  W={args.world_size}  peak/rank {record['peak_mib_max_rank']:>8.1f} MiB  "
                  f"step {record['median_step_s']:.3f} s  loss rel.err {err}", flush=True)
    for n in args.sizes:  # ratios to open_clip measured in the same run
        by_impl = {r["impl"]: r for r in records if r["global_batch"] == n}
        if set(IMPLS) <= set(by_impl):
            ours, theirs = by_impl["mmcl_fast"], by_impl["open_clip"]
            ours["memory_ratio_vs_open_clip"] = round(theirs["peak_mib_max_rank"] / max(ours["peak_mib_max_rank"],
                                                                                        1e-9), 2)
            ours["speedup_vs_open_clip"] = round(theirs["median_step_s"] / ours["median_step_s"], 2)
            print(f"N={n}: open_clip / mmcl_fast  memory {ours['memory_ratio_vs_open_clip']}x  "
                  f"time {ours['speedup_vs_open_clip']}x")
    machine["loadavg_at_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                               "records": records}, indent=1))
    print(f"wrote {out}")
    if args.plot:
        plot(records, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
