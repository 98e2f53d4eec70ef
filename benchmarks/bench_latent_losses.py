"""Latent-modality-structure losses (issue 4), mmcl_fast vs the straightforward dense PyTorch implementation.

    pytest benchmarks/bench_latent_losses.py --benchmark-only         # time, forward+backward
    python benchmarks/bench_latent_losses.py --memory [--n 8192]      # peak RSS growth, one fresh process each

Each case is grouped by loss and size so that the fused and the dense implementation print side by side. The
dense baselines are what one writes from the paper's formulas: N x N Gram / distance matrices and
`torch.nn.functional.cross_entropy`. Every timed loss is checked against a float64 dense value on the same
rounded inputs, so a fast but wrong implementation does not pass as a result. The memory mode runs one
forward+backward per (loss, implementation) in a fresh child process and reads its peak-RSS growth (VmHWM,
reset through /proc/self/clear_refs), next to the size of the inputs; it writes a JSON record with the
machine, versions and commit (default benchmarks/results/latent_losses_memory.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # tolerances.py, rss.py (also as a script)

import mmcl_fast  # noqa: E402
from rss import peak_rss_growth  # noqa: E402
from tolerances import LOSS_RTOL  # noqa: E402

DIM = 256
BRIDGE_T = 0.25
TEMPERATURE = 0.07
UNIFORMITY_T = 2.0
ROUNDS = {1024: 5, 4096: 3}
# the dense fp32 baselines round N x N intermediates in fp32 (and the GC one cancels): checked loosely
BASELINE_RTOL = 1e-3


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

def _unit(n: int, d: int, generator: torch.Generator, near: torch.Tensor | None = None, noise: float = 0.5):
    base = torch.randn(n, d, generator=generator)
    if near is not None:
        base = near + noise * base
    return F.normalize(base, dim=1)


def _inputs(case: str, n: int, d: int = DIM, seed: int = 0) -> list[torch.Tensor]:
    """Fresh unit-norm fp32 features for one case (leaves that require grad)."""
    gen = torch.Generator().manual_seed(seed)
    image = _unit(n, d, gen)
    text = _unit(n, d, gen, near=image, noise=1.0)
    if case == "geometric_consistency":
        tensors = [image, text, _unit(n, d, gen, near=image, noise=0.3), _unit(n, d, gen, near=text, noise=0.3)]
    elif case == "bridge_contrastive":
        tensors = [image, text, _unit(n, d, gen, near=image, noise=0.3)]
    elif case == "bridge_contrastive_per_sample_t":
        t = 0.1 + 0.8 * torch.rand(n, generator=gen)
        tensors = [image, text, _unit(n, d, gen, near=image, noise=0.3), t]
    elif case == "uniformity":
        tensors = [image]
    elif case == "feature_separation":
        image_indep, text_indep = _unit(n, d, gen), _unit(n, d, gen)
        tensors = [image, text, image_indep, text_indep, _unit(n, d, gen, near=image_indep, noise=0.3),
                   _unit(n, d, gen, near=text_indep, noise=0.3)]
    else:
        raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    return [t.requires_grad_(True) for t in tensors]


# ------------------------------------------------------------------------------------------------
# the two implementations of each loss
# ------------------------------------------------------------------------------------------------

def dense_gc(image, text, image_aug, text_aug):
    n = image.shape[0]
    image_text = image @ text.T
    loss = ((image_text - image_text.T) ** 2).sum() + ((image @ image.T - text @ text.T) ** 2).sum()
    loss = loss + ((image @ image.T - image_aug @ image_aug.T) ** 2).sum()
    loss = loss + ((text @ text.T - text_aug @ text_aug.T) ** 2).sum()
    loss = loss + (((image * text).sum(1) - (image_aug * text_aug).sum(1)) ** 2).sum()
    return loss / n


def dense_bridge(image, text, augmented, t=BRIDGE_T):
    bridge = t * image + (1 - t) * text
    logits = -torch.cdist(augmented, bridge) ** 2 / (2 * t * (1 - t))
    return F.cross_entropy(logits, torch.arange(image.shape[0]))


def dense_bridge_per_sample_t(image, text, augmented, t):
    """-||a_i - (t_i v_j + (1 - t_i) w_j)||^2 / (2 sigma_i^2) expanded into N x N products (the (N, N, D)
    difference tensor itself would not fit)."""
    t_col, s_col = t[:, None], (1 - t)[:, None]
    cross = t_col * (augmented @ image.T) + s_col * (augmented @ text.T)
    bridge_sq = (t_col ** 2 * (image * image).sum(1) + 2 * t_col * s_col * (image * text).sum(1)
                 + s_col ** 2 * (text * text).sum(1))
    sq_dist = (augmented * augmented).sum(1)[:, None] - 2 * cross + bridge_sq
    logits = -sq_dist / (2 * t_col * s_col)
    return F.cross_entropy(logits, torch.arange(image.shape[0]))


def dense_uniformity(x, t=UNIFORMITY_T):
    return torch.log(torch.exp(-t * torch.cdist(x, x) ** 2).mean())


def dense_separation(image, text, image_indep, text_indep, image_indep_aug, text_indep_aug):
    diag = torch.arange(image.shape[0])
    ortho = ((image * image_indep).sum(1) ** 2 + (text * text_indep).sum(1) ** 2).mean()
    contrast = (F.cross_entropy(image_indep @ image_indep_aug.T / TEMPERATURE, diag)
                + F.cross_entropy(text_indep @ text_indep_aug.T / TEMPERATURE, diag))
    return ortho + contrast + dense_uniformity(image_indep) + dense_uniformity(text_indep)


CASES = {
    "geometric_consistency": {
        "mmcl_fast": lambda *z: mmcl_fast.geometric_consistency_loss(*z),
        "dense": dense_gc,
    },
    "bridge_contrastive": {
        "mmcl_fast": lambda v, w, a: mmcl_fast.brownian_bridge_loss(v, w, a, BRIDGE_T, mode="contrastive"),
        "dense": dense_bridge,
    },
    "bridge_contrastive_per_sample_t": {
        "mmcl_fast": lambda v, w, a, t: mmcl_fast.brownian_bridge_loss(v, w, a, t, mode="contrastive"),
        "dense": dense_bridge_per_sample_t,
    },
    "uniformity": {
        "mmcl_fast": lambda x: mmcl_fast.uniformity_loss(x, UNIFORMITY_T),
        "dense": dense_uniformity,
    },
    "feature_separation": {
        "mmcl_fast": lambda *z: mmcl_fast.feature_separation_loss(*z, TEMPERATURE, UNIFORMITY_T),
        "dense": dense_separation,
    },
}
IMPLS = ("mmcl_fast", "dense")


def reference64(case: str, tensors) -> float:
    """The loss in float64 on the same rounded inputs (the dense formula, widened)."""
    with torch.no_grad():
        return float(CASES[case]["dense"](*(t.detach().double() for t in tensors)))


def make_step(case: str, impl: str, tensors):
    """One forward+backward (gradients w.r.t. every feature tensor); returns the detached loss."""
    fn = CASES[case][impl]
    features = [t for t in tensors if t.dim() == 2]

    def step():
        for t in features:
            t.grad = None
        loss = fn(*tensors)
        loss.backward()
        return loss.detach()

    return step


# ------------------------------------------------------------------------------------------------
# pytest-benchmark: time
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", list(ROUNDS))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_latent_loss_fwd_bwd(benchmark, case, n, impl):
    tensors = _inputs(case, n)
    expected = reference64(case, tensors)
    step = make_step(case, impl, tensors)
    benchmark.group = f"{case} fwd+bwd n={n} d={DIM} fp32"
    loss = benchmark.pedantic(step, rounds=ROUNDS[n], warmup_rounds=1, iterations=1)
    rtol = LOSS_RTOL[torch.float32] if impl == "mmcl_fast" else BASELINE_RTOL
    assert abs(float(loss) - expected) <= rtol * abs(expected), (float(loss), expected)


# ------------------------------------------------------------------------------------------------
# peak memory
# ------------------------------------------------------------------------------------------------

def peak_memory(case: str, impl: str, n: int, d: int = DIM) -> dict:
    """Peak RSS growth of one forward+backward of `impl` on `case` at size (n, d), in a fresh process.

    Returns {"growth_bytes", "input_bytes"}: the rise of the peak resident set over the resident size just
    before the step (inputs already built, a small warm-up step already run), and the bytes of the inputs.
    """
    setup = f"""
        import sys
        sys.path.insert(0, {HERE!r})
        import bench_latent_losses as bench
        def make_inputs(n):
            return bench._inputs({case!r}, n, {d})
        def step(inputs):
            bench.make_step({case!r}, {impl!r}, inputs)()
    """
    return peak_rss_growth(textwrap.dedent(setup), n)


def _machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "mmcl_fast": mmcl_fast.__version__, "commit": commit}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="measure peak RSS growth (the only mode for now)")
    parser.add_argument("--n", type=int, default=8192, help="batch size (default 8192)")
    parser.add_argument("--d", type=int, default=DIM, help=f"feature size (default {DIM})")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated implementations")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "latent_losses_memory.json"))
    args = parser.parse_args(argv)
    if not args.memory:
        parser.error("nothing to do: pass --memory (time is measured by pytest-benchmark, see the docstring)")
    if args.n < 1 or args.d < 1:
        parser.error("--n and --d must be positive")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for name, chosen, known in (("--cases", cases, CASES), ("--impls", impls, IMPLS)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            parser.error(f"unknown {name} {', '.join(unknown)}; choose from {', '.join(known)}")
    records = []
    print(f"{'case':34s} {'impl':10s} {'peak MiB':>10s} {'x inputs':>9s}")
    for case in cases:
        for impl in impls:
            probe = peak_memory(case, impl, args.n, args.d)
            ratio = probe["growth_bytes"] / probe["input_bytes"]
            records.append({"case": case, "impl": impl, "n": args.n, "d": args.d, "dtype": "fp32", **probe,
                            "ratio_to_inputs": round(ratio, 3)})
            print(f"{case:34s} {impl:10s} {probe['growth_bytes'] / 2**20:10.1f} {ratio:9.2f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as out:
        json.dump({"machine": _machine(), "records": records}, out, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
