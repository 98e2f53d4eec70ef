"""Per-rank memory of the distributed losses: a stated model, checked against the CPU measurements at small W and
projected to W = 64 and W = 1024 (N_local = 16384, D = 1024, bf16).

    python benchmarks/distributed_memory_model.py            # markdown tables on stdout + memory_model.json

The model counts the buffers of one forward + backward beyond the inputs, with n = N_local, N = W n, D features, b
bytes per feature element (2 for bf16, 4 for fp32) and 4 bytes per fp32 accumulator element:

- mmcl_fast CLIP ring: two travelling caption blocks (2 n D b), two fp32 dY accumulators (8 n D), the fp32 dX
  (4 n D) and, for 16-bit features, the rounded feature gradients (2 n D b). On GPUs the Triton kernels return
  fp32 partials that are then added (8 n D) and the accumulator's hop is overlapped (one more fp32 block, 4 n D).
- mmcl_fast SigLIP rings (bidir, shift, reduce): two travelling blocks (2 n D b), two fp32 accumulators (8 n D),
  the fp32 dX and dY computed in the forward (8 n D), the rounded gradients for 16-bit features (2 n D b); GPU: the
  fp32 partials (8 n D) and the overlapped accumulator (4 n D).
- mmcl_fast gather modes: the gathered block (N D b) and the fp32 dY of every column (4 N D) grow with W, plus
  8 n D (gloo stages the all-gather in one more N D b copy).
- open_clip ClipLoss(local_loss=True, gather_with_grad=True): both feature sets gathered (2 N D b) and about five
  live n x N logit-sized buffers in the features' dtype at the peak (5 n N b; the constant is fitted to the CPU runs).
- Inf-CL (inf-cl 1.2.1 ring, `cal_inf_loss` once per direction): fp32 copies of q, k and scale * q for each of the two
  calls, saved for their backward, then the next k block, the per-step fp32 dq / dk, the dq / dk sums and the dk in
  flight: about 10 fp32 (n, D) buffers (40 n D), independent of W. A reading of its ring code, not a measurement
  (Inf-CL needs CUDA).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "distributed-gloo-cpu"
GIB, MIB = 2**30, 2**20
PROJECTION = {"n": 16384, "dim": 1024, "bytes": 2, "worlds": (64, 1024)}


def model_bytes(system: str, world: int, n: int, dim: int, b: int, gpu: bool, gloo: bool = False) -> int:
    """Per-rank bytes of one forward + backward (the module docstring's model)."""
    nd, big = n * dim, world * n * dim
    rounded = 2 * nd * b if b < 4 else 0
    gpu_extra = 12 * nd if gpu else 0
    staging = big * b if gloo else 0
    return {
        "mmcl_fast CLIP ring": 2 * nd * b + 12 * nd + rounded + gpu_extra,
        "mmcl_fast SigLIP ring": 2 * nd * b + 16 * nd + rounded + gpu_extra,
        "mmcl_fast CLIP gather": big * (b + 4) + 8 * nd + rounded + staging,
        "mmcl_fast SigLIP gather": big * (b + 4) + 8 * nd + rounded + staging,
        "open_clip ClipLoss": 5 * n * world * n * b + 2 * big * b,
        "Inf-CL ring": 40 * nd,
    }[system]


# the committed runs: (file, impl) -> the modelled system
MEASURED = [
    ("clip-w{w}.json", "mmcl_fast", "mmcl_fast CLIP ring"),
    ("clip-w{w}.json", "mmcl_fast_gather", "mmcl_fast CLIP gather"),
    ("clip-w{w}.json", "open_clip", "open_clip ClipLoss"),
    ("siglip-bidir-w{w}.json", "mmcl_fast", "mmcl_fast SigLIP ring"),
    ("siglip-shift-w{w}.json", "mmcl_fast", "mmcl_fast SigLIP ring"),
    ("siglip-reduce-w{w}.json", "mmcl_fast", "mmcl_fast SigLIP ring"),
    ("siglip-bidir-w{w}.json", "mmcl_fast_gather", "mmcl_fast SigLIP gather"),
]


def check_rows() -> list[dict]:
    rows = []
    for world in (2, 4):
        for pattern, impl, system in MEASURED:
            path = RESULTS / pattern.format(w=world)
            if not path.exists():
                continue
            data = json.loads(path.read_text())
            record = next(r for r in data["records"] if r["impl"] == impl)
            n, dim = record["n"] // world, record["d"]
            predicted = model_bytes(system, world, n, dim, 4, gpu=False, gloo=True)
            label = system if "siglip" not in pattern or "gather" in system else f"{system} ({pattern.split('-')[1]})"
            rows.append({"system": label, "world": world, "n_local": n, "dim": dim,
                         "measured_mib": record["peak_mib"], "model_mib": predicted / MIB,
                         "seconds": record["seconds"], "machine": f"{data['machine']['cpu']}, "
                         f"{data['machine']['cpu_kernel_isa']} build, {data['machine']['date'][:10]}"})
    return rows


def projection_rows() -> list[dict]:
    n, dim, b = PROJECTION["n"], PROJECTION["dim"], PROJECTION["bytes"]
    rows = []
    for system in ("mmcl_fast CLIP ring", "mmcl_fast SigLIP ring", "mmcl_fast CLIP gather", "open_clip ClipLoss",
                   "Inf-CL ring"):
        rows.append({"system": system, **{f"W={w}": model_bytes(system, w, n, dim, b, gpu=True) / GIB
                                          for w in PROJECTION["worlds"]}})
    return rows


def main() -> int:
    checks, projections = check_rows(), projection_rows()
    print("Model vs measurement (gloo on CPU, fp32, per-rank peak of one forward + backward):\n")
    print("| system | W | N_local, D | measured | model | step (slowest rank) |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for row in checks:
        print(f"| {row['system']} | {row['world']} | {row['n_local']}, {row['dim']} | {row['measured_mib']:.0f} MiB | "
              f"{row['model_mib']:.0f} MiB | {row['seconds']:.2f} s |")
    if checks:
        print(f"\n({checks[0]['machine']})")
    worlds = PROJECTION["worlds"]
    print(f"\nProjected per-rank bytes, N_local = {PROJECTION['n']}, D = {PROJECTION['dim']}, bf16, GPU:\n")
    print("| system | " + " | ".join(f"W = {w}" for w in worlds) + " |")
    print("| --- | " + " | ".join("---:" for _ in worlds) + " |")
    for row in projections:
        print(f"| {row['system']} | " + " | ".join(f"{row[f'W={w}']:.2f} GiB" for w in worlds) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_model.json").write_text(json.dumps({"projection": PROJECTION, "checks": checks,
                                                           "projections": projections}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
