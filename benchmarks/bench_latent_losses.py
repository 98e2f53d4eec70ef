"""Latent-modality-structure losses: a thin caller of the `mmcl-fast bench` harness.

    pytest benchmarks/bench_latent_losses.py --benchmark-only         # time, forward+backward (pytest-benchmark)
    python benchmarks/bench_latent_losses.py --memory [--n 8192]      # peak RSS growth, one fresh process each

Both modes take the losses, inputs, implementations and float64 references from the bench registry
(`mmcl_fast/bench/cases/latent.py`: bridge, bridge_per_sample_t, uniformity, separation, geometry; mmcl_fast
vs the dense PyTorch formulas). The memory mode is

    mmcl-fast bench --loss bridge,bridge_per_sample_t,uniformity,separation,geometry --sizes N --dim 256 \\
        --dtype fp32 --repeats 1 --mem-budget 8GiB --time-budget 0 --out benchmarks/results/latent-losses

(one fresh child process per record, peak-RSS growth of the first call after a warm-up, results.json with
machine, versions and commit, summary.md and plots) followed by a table of each peak against the size of the
record's inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch

from mmcl_fast.bench.impls import get_loss

HERE = os.path.dirname(os.path.abspath(__file__))
LATENT_LOSSES = ("bridge", "bridge_per_sample_t", "uniformity", "separation", "geometry")
IMPLS = ("mmcl_fast", "dense")
DIM = 256
ROUNDS = {1024: 5, 4096: 3}
# the dense fp32 baselines round N x N intermediates in fp32 (and the geometry one cancels): checked loosely
BASELINE_RTOL = 1e-3


# ------------------------------------------------------------------------------------------------
# pytest-benchmark: time
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_name", LATENT_LOSSES)
@pytest.mark.parametrize("n", list(ROUNDS))
@pytest.mark.parametrize("impl", IMPLS)
def test_latent_loss_fwd_bwd(benchmark, loss_name, n, impl):
    from tolerances import LOSS_RTOL  # tests/ is on the path under pytest (benchmarks/conftest.py)
    loss = get_loss(loss_name)
    inputs = loss.make_inputs(n, DIM, torch.float32, 0)
    expected = loss.reference(inputs, loss.params)
    step = loss.impls[impl].make_step(inputs, loss.params, {})
    benchmark.group = f"{loss_name} fwd+bwd n={n} d={DIM} fp32"
    value = benchmark.pedantic(step, rounds=ROUNDS[n], warmup_rounds=1, iterations=1)
    benchmark.extra_info["gflops"] = round(loss.flops(n, n, DIM) / benchmark.stats.stats.median / 1e9, 1)
    rtol = LOSS_RTOL[torch.float32] if impl == "mmcl_fast" else BASELINE_RTOL
    assert abs(float(value) - expected) <= rtol * abs(expected), (float(value), expected)


# ------------------------------------------------------------------------------------------------
# peak memory: the harness
# ------------------------------------------------------------------------------------------------

def bench_argv(losses, impls, n: int, d: int, out: str, mem_budget: str) -> list[str]:
    """The `mmcl-fast bench` arguments of the memory mode."""
    return ["bench", "--loss", ",".join(losses), "--impls", ",".join(impls), "--sizes", str(n), "--dim", str(d),
            "--dtype", "fp32", "--repeats", "1", "--mem-budget", mem_budget, "--time-budget", "0", "--no-plot",
            "--out", out]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="measure peak RSS growth through `mmcl-fast bench`")
    parser.add_argument("--n", type=int, default=8192, help="batch size (default 8192)")
    parser.add_argument("--d", type=int, default=DIM, help=f"feature size (default {DIM})")
    parser.add_argument("--losses", default=",".join(LATENT_LOSSES), help="comma-separated losses (default: all)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated implementations")
    parser.add_argument("--mem-budget", default="8GiB", help="skip a record estimated above this (default 8GiB)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "latent-losses"), help="output directory")
    args = parser.parse_args(argv)
    if not args.memory:
        parser.error("nothing to do: pass --memory (time is measured by pytest-benchmark, see the docstring)")
    if args.n < 1 or args.d < 1:
        parser.error("--n and --d must be positive")
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    unknown = [name for name in losses if name not in LATENT_LOSSES]
    if unknown:
        parser.error(f"unknown --losses {', '.join(unknown)}; choose from {', '.join(LATENT_LOSSES)}")
    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    from mmcl_fast.cli import main as mmcl_fast_main
    code = mmcl_fast_main(bench_argv(losses, impls, args.n, args.d, args.out, args.mem_budget))
    if code not in (0, 1):  # 1: some record failed, still reported below
        return code
    with open(os.path.join(args.out, "results.json")) as results:
        records = json.load(results)["records"]
    print(f"{'loss':22s} {'impl':10s} {'peak MiB':>10s} {'x inputs':>9s}")
    for rec in records:
        peak = float("nan") if rec["peak_mib"] is None else rec["peak_mib"]
        ratio = peak / rec["input_mib"] if rec["input_mib"] else float("nan")
        print(f"{rec['loss']:22s} {rec['impl']:10s} {peak:10.1f} {ratio:9.2f}  {rec['status']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
