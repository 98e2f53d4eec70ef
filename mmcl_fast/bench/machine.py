"""Describe the machine a benchmark ran on: hardware, versions, commit, and its measured matmul ceiling.

Every number the bench writes carries this block, so a result can be read as a fraction of what the hardware
does on a plain GEMM of the same dtype, and traced back to the code that produced it.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from .memory import total_ram_bytes

PACKAGES = ("mmcl_fast", "torch", "triton", "open_clip_torch", "inf_cl", "numpy", "rich", "matplotlib")


def git_commit(short: bool = False) -> str | None:
    """HEAD of the checkout mmcl_fast is imported from, with '-dirty' when tracked files have local changes; None
    outside a git checkout (an installed wheel) or without git. short: the abbreviated hash."""
    source_dir = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(source_dir), "rev-parse"] + (["--short"] if short else []) + ["HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", str(source_dir), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    found = {name: package_version(name) for name in PACKAGES}
    if found.get("inf_cl") is None:
        found["inf_cl"] = package_version("inf-cl")
    found["torch"] = torch.__version__  # with its local build tag (+cu130, +cpu)
    found["torch_cuda"] = torch.version.cuda
    found["python"] = platform.python_version()
    return found


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kernel_isa() -> str | None:
    """The ISA build of the compiled CPU kernel chosen at import ('avx512', 'scalar', ...), None if unavailable."""
    try:
        from ..backends import cpu
        return cpu.isa() if cpu.available() else None
    except Exception:  # noqa: BLE001 - a broken build is reported as unavailable
        return None


def cuda_devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                        "memory_gib": round(props.total_memory / 2**30, 1)})
    return devices


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int, d: int, repeats: int = 5) -> float:
    """Measured rate of torch's (n, d) @ (d, n) GEMM (the shape of one loss tile sweep), in GFLOP/s.

    The best of `repeats` timed runs: a ceiling is what the hardware can do, so a run slowed down by another
    process on the machine should not lower it.
    """
    a = torch.randn(n, d, device=device).to(dtype)
    b = torch.randn(n, d, device=device).to(dtype)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b.T)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first one is the warm-up
            times.append(time.perf_counter() - start)
    return 2 * n * n * d / min(times) / 1e9


def matmul_shape(device: torch.device, sizes=(), dims=()) -> tuple[int, int]:
    """(n, d) of the ceiling GEMM: the sweep's largest problem, capped where the GEMM rate has saturated
    (CPU 4096 x 512, CUDA 16384 x 1024), floored so that a tiny sweep still times a real GEMM."""
    cap_n, cap_d = (16384, 1024) if device.type == "cuda" else (4096, 512)
    n = min(cap_n, max(256, max(sizes, default=cap_n)))
    d = min(cap_d, max(64, max(dims, default=cap_d)))
    return n, d


def environment(device: torch.device | None = None) -> dict:
    """What a study or example run records about where it ran (cheap: no measurement): versions, commit, UTC date,
    CPU model and the compiled kernel's ISA build, core count, and the GPU's name for a CUDA device."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return {"mmcl_fast": package_version("mmcl_fast"), "torch": torch.__version__, "commit": git_commit(short=True),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "processor": cpu_model(), "cpu_kernel_isa": cpu_kernel_isa(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def describe(device: torch.device, dtypes: list[str], *, sizes=(), dims=(), measure_matmul: bool = True) -> dict:
    from .registry import DTYPES
    n, d = matmul_shape(device, sizes, dims)
    machine = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round((total_ram_bytes() or 0) / 2**30, 1),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "cuda": cuda_devices(),
        "cpu_kernel_isa": cpu_kernel_isa(),
        "versions": versions(),
        "git_commit": git_commit(),
        "matmul_shape": [n, d, n],
        "matmul_gflops": {},
    }
    if measure_matmul:
        for name in dtypes:
            machine["matmul_gflops"][name] = round(matmul_gflops(DTYPES[name], device, n, d), 1)
    return machine
