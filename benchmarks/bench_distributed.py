"""Distributed losses: per-rank peak memory and step time in real process groups, a thin caller of the harness.

    python benchmarks/bench_distributed.py                        # gloo, 2 ranks, N = 2048 4096 8192, D = 512
    python benchmarks/bench_distributed.py --sizes 4096 --world-size 3 --dtype bf16
    python benchmarks/bench_distributed.py --loss siglip --dist-impl shift   # SigLipLoss, text blocks in a ring
    python benchmarks/bench_distributed.py --dist-backend nccl    # one CUDA device per rank

It runs

    mmcl-fast bench --loss clip --world-size W --sizes ... --dim D --dtype ... --impls mmcl_fast,open_clip \\
        --repeats R --time-budget 0 --out benchmarks/results/distributed-gloo-wW-fp32

Every (implementation, N) record is a fresh process group of W ranks (gloo on CPU, NCCL on one GPU per rank), so
no allocator cache of an earlier record hides or inflates its memory. clip: both sides run
``ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)`` and backpropagate loss / W (DDP
averaging); open_clip builds two N/W x N logit matrices per rank, mmcl_fast gathers the captions only and
streams its N/W x N block through the fused kernel. siglip: ``SigLipLoss(rank, world_size, dist_impl)`` on both
sides. Per rank: the peak RSS growth of the first step after a warm-up (CUDA: max_memory_allocated growth);
a step's time is the slowest rank's, median over the repeats; the global loss (mean of the per-rank losses) is
checked against the float64 loss of the concatenated batch. Writes results.json (machine, versions, commit),
summary.md, and with --plot the PNGs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def bench_argv(args: argparse.Namespace) -> list[str]:
    """The `mmcl-fast bench` arguments for these flags."""
    out = args.out or RESULTS_DIR / f"distributed-{args.dist_backend}-w{args.world_size}-{args.dtype}" \
        f"{'' if args.loss == 'clip' else '-' + args.loss}"
    argv = ["bench", "--loss", args.loss, "--world-size", str(args.world_size),
            "--device", "cuda" if args.dist_backend == "nccl" else "cpu",
            "--sizes", ",".join(map(str, args.sizes)), "--dim", str(args.dim), "--dtype", args.dtype,
            "--impls", ",".join(args.impls), "--repeats", str(args.repeats), "--time-budget", "0",
            "--seed", str(args.seed), "--out", str(out)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.mem_budget:
        argv += ["--mem-budget", args.mem_budget]
    if args.dist_impl:
        argv += ["--dist-impl", args.dist_impl]
    if not args.plot:
        argv.append("--no-plot")
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="global batch sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--impls", nargs="+", default=["mmcl_fast", "open_clip"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per record after the warm-up step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / W)")
    parser.add_argument("--dist-backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--dist-impl", choices=("bidir", "shift", "reduce", "gather"), default=None,
                        help="siglip: how SigLipLoss exchanges text blocks (default: each impl's own)")
    parser.add_argument("--mem-budget", default=None, help="skip a record estimated above this (harness default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default benchmarks/results/distributed-<backend>-w<W>-<dtype>)")
    parser.add_argument("--plot", action="store_true", help="also write the PNG plots")
    args = parser.parse_args(argv)
    from mmcl_fast.cli import main as mmcl_fast_main
    return mmcl_fast_main(bench_argv(args))


if __name__ == "__main__":
    sys.exit(main())
