"""`mmcl-fast bench`: how much faster and lighter mmcl_fast is, measured on this machine, for every loss.

    mmcl-fast bench                          # CLIP, quick run: table, results.json, summary.md, PNGs
    mmcl-fast bench --loss siglip            # SigLIP vs open_clip SigLipLoss (and its chunked mode where installed)
    mmcl-fast bench --loss bridge,uniformity,separation,geometry --sizes 1024,4096 --dim 256
    mmcl-fast bench --full --out results/    # the long sweep (the GPU sweep on CUDA)
    mmcl-fast bench --sizes 4096,8192 --dim 768 --dtype bf16 --impls mmcl_fast,open_clip
    mmcl-fast bench --world-size 2 --sizes 2048,4096 --dtype fp32   # distributed: W ranks per record
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from ..backends import BACKENDS
from ..cli.options import choice_list, int_list
from .impls import DTYPES, LOSSES

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip SigLipLoss's text exchange schemes

_SIZE_UNITS = {"": 2**30, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
               "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


class UsageError(ValueError):
    """A bad flag value found after parsing (the message names the flag)."""


def parse_mem_budget(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '2' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"--mem-budget takes a positive size such as 2GiB, 512MiB or 1.5 (GiB); got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="benchmark mmcl_fast against open_clip and a dense baseline on this machine",
        description="Time and peak memory of one forward+backward of a loss, mmcl_fast vs its anchor (clip: "
                    "open_clip ClipLoss, plus a naive dense loss and, on CUDA, Inf-CL; siglip: open_clip "
                    "SigLipLoss, its chunked mode where installed, a dense loss; bridge, bridge_per_sample_t, "
                    "uniformity, separation, geometry: the dense PyTorch formulas), every impl checked against a "
                    "float64 reference. Writes results.json, summary.md and PNG plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="bench-out", help="output directory (created if missing)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when a GPU is available, else cpu")
    parser.add_argument("--loss", default=["clip"], type=choice_list(LOSSES), metavar="|".join(LOSSES),
                        help="loss(es) to benchmark, comma-separated (`mmcl-fast info` lists each loss's impls)")
    parser.add_argument("--impls", default=None, metavar="NAME,...",
                        help="implementations to compare (default: all that run on the device)")
    parser.add_argument("--sizes", type=int_list("1024,4096", "positive integers", minimum=1), default=None, metavar="N,N,...",
                        help="batch sizes (default: 1024..16384 on CPU; --full: the long sweep)")
    parser.add_argument("--dim", type=int_list("512,1024", "positive integers", minimum=1), default=None, metavar="D[,D...]",
                        help="feature size(s) (default 512)")
    parser.add_argument("--dtype", type=choice_list(DTYPES), default=None, metavar="|".join(DTYPES),
                        help="feature dtype(s), comma-separated (default: fp32,bf16 on CPU, bf16 on CUDA)")
    parser.add_argument("--full", action="store_true",
                        help="the long sweep: CPU N up to 32768 and D in {512, 1024}; CUDA N in {8192, 32768, "
                             "131072, 524288}, D in {512, 768, 1024}, bf16")
    parser.add_argument("--mem-budget", type=parse_mem_budget, default=None, metavar="SIZE",
                        help="a run whose estimated peak exceeds this is recorded as skipped (default: 2GiB on "
                             "CPU, 90%% of GPU memory on CUDA)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="a call predicted (from the previous size) to take longer is recorded as skipped "
                             "(default: 60 on CPU, none on CUDA; 0: no limit)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats after the warm-up (default: adaptive, median reported)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="mmcl_fast backend")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--world-size", type=int, default=1, metavar="W",
                        help="> 1: every record is a process group of W ranks (gloo on CPU, NCCL with one GPU per "
                             "rank on CUDA), N is the global batch; impls without a distributed form are not run")
    parser.add_argument("--dist-impl", default=None, choices=DIST_IMPLS,
                        help="siglip with --world-size > 1: how SigLipLoss exchanges text blocks (default: each "
                             "impl's own, bidir for open_clip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=main)
    return parser


def _check_out(path: str) -> Path:
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None
    return out


def torch_cuda_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _resolve_device(choice: str) -> str:
    import torch
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def build_config(args: argparse.Namespace):
    """Validate the parsed flags and turn them into a BenchConfig (raises UsageError naming the flag)."""
    from .runner import BenchConfig, impls_for
    device = _resolve_device(args.device)
    for flag, value in (("--repeats", args.repeats), ("--threads", args.threads), ("--world-size", args.world_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    world = args.world_size
    if world > 1:
        from .runner import SWEEPS
        uneven = [n for n in args.sizes or SWEEPS[(device, args.full)][0] if n % world]
        if uneven:
            raise UsageError(f"--sizes {','.join(map(str, uneven))}: a global batch must split evenly over "
                             f"--world-size {world} (open_clip needs equal local batches)")
        if device == "cuda" and torch_cuda_count() < world:
            raise UsageError(f"--world-size {world} on --device cuda needs one GPU per rank; "
                             f"{torch_cuda_count()} visible")
    if args.dist_impl is not None and (world == 1 or args.loss != ["siglip"]):
        raise UsageError("--dist-impl applies to --loss siglip with --world-size > 1 only")
    triton_on_cpu = os.environ.get("TRITON_INTERPRET") == "1"
    if (args.backend == "cpu" and device != "cpu") or (args.backend == "triton" and device != "cuda"
                                                       and not triton_on_cpu):
        raise UsageError(f"--backend {args.backend} cannot run on --device {device}")
    impls = None
    if args.impls is not None:
        impls = [name.strip() for name in args.impls.split(",") if name.strip()]
        if not impls:
            raise UsageError("--impls: give at least one implementation name")
    config = BenchConfig(out=Path(args.out), device=device, losses=args.loss, impls=impls,
                         sizes=list(args.sizes) if args.sizes else None, dims=list(args.dim) if args.dim else None,
                         dtypes=args.dtype, full=args.full, mem_budget_bytes=args.mem_budget,
                         repeats=args.repeats, backend=args.backend, seed=args.seed, threads=args.threads,
                         plots=not args.no_plot, time_budget_s=args.time_budget, world_size=world,
                         dist_impl=args.dist_impl)
    for loss in config.losses:
        try:
            runnable, unavailable = impls_for(config, loss)
        except ValueError as exc:
            raise UsageError(f"--impls: {exc}") from None
        if impls is not None and unavailable:
            raise UsageError("--impls: " + "; ".join(f"{name} cannot run here: {why}"
                                                     for name, why in unavailable.items()))
        if impls is None and "mmcl_fast" in unavailable:  # a comparison without the subject is no comparison
            raise UsageError(f"--loss {loss}: mmcl_fast cannot run on --device {device}: {unavailable['mmcl_fast']} "
                             "(see `mmcl-fast info`; --impls picks the others)")
        if not runnable:
            raise UsageError(f"no implementation of loss {loss!r} can run on {device}")
    config.out = _check_out(args.out)
    return config


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    try:
        config = build_config(args)
    except UsageError as exc:
        print(f"mmcl-fast bench: error: {exc}", file=sys.stderr)
        return 2
    from .report import print_report, report_console
    from .runner import run
    results = run(config, progress_console=Console(stderr=True), show_progress=not args.quiet)
    console = report_console()
    print_report(results, console)
    out = config.out
    console.print(f"results: {out / 'results.json'}")
    console.print(f"summary: {out / 'summary.md'}")
    for plot in results.get("plots", []):
        console.print(f"plot:    {plot}")
    errors = [r for r in results["records"] if r["status"] == "error"]
    if errors:
        for rec in errors:
            print(f"mmcl-fast bench: {rec['impl']} n={rec['n']} d={rec['d']} {rec['dtype']} failed: {rec['note']}",
                  file=sys.stderr)
        return 1
    return 0
