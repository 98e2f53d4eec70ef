"""`mmcl-fast info`: versions, and which backends and benchmark implementations can run on this machine."""
from __future__ import annotations

import argparse
import importlib
import json
import os

import torch


def backends() -> dict:
    """{backend: {"available": bool, "detail": str}} for the primitive's backends on this machine."""
    found = {"reference": {"available": True, "detail": "dense PyTorch (ground truth; materialises N x M)"},
             "torch": {"available": True, "detail": "blocked plain-torch ops, any device (exact, never N x M)"}}
    try:
        from ..backends import cpu
        if cpu.available():
            builds = ", ".join(f"{name}{'' if ok else ' (CPU lacks it)'}" for name, ok in cpu.compiled_isas().items())
            detail = f"compiled C++ kernel, ISA in use: {cpu.isa()}; builds: {builds}"
            if cpu.isa() == cpu.PORTABLE_ISA:
                detail += ("; WARNING: the portable build is several times slower than a SIMD build"
                           + (" (this CPU runs no SIMD build compiled here)" if cpu.portable_only()
                              else " (set MMCL_FAST_CPU_ISA=auto)"))
            found["cpu"] = {"available": True, "detail": detail, "isa": cpu.isa()}
        else:
            found["cpu"] = {"available": False, "detail": f"mmcl_fast._C does not import: {cpu._IMPORT_ERROR}"}
    except Exception as exc:  # noqa: BLE001 - report, never crash `info`
        found["cpu"] = {"available": False, "detail": f"{type(exc).__name__}: {exc}"}
    triton_version = None
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    if triton_version is None:
        found["triton"] = {"available": False, "detail": "the triton package is not installed"}
    else:
        try:
            importlib.import_module("mmcl_fast.backends.triton")
            importable = None
        except Exception as exc:  # noqa: BLE001
            importable = f"{type(exc).__name__}: {exc}"
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        usable = importable is None and (torch.cuda.is_available() or interpret)
        if importable is not None:
            detail = f"triton {triton_version}; mmcl_fast.backends.triton does not import ({importable})"
        elif torch.cuda.is_available():
            detail = f"triton {triton_version} on {torch.cuda.get_device_name(0)}"
        elif interpret:
            detail = f"triton {triton_version}, interpreter on CPU tensors (TRITON_INTERPRET=1)"
        else:
            detail = f"triton {triton_version} installed, but no CUDA device (set TRITON_INTERPRET=1 to interpret)"
        found["triton"] = {"available": usable, "detail": detail}
    return found


def collect() -> dict:
    from ..backends import resolve_backend
    from .impls import LOSSES
    from .machine import cpu_model, cuda_devices, versions
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    impls = {}
    for loss_name, loss in LOSSES.items():
        impls[loss_name] = {}
        for name, impl in loss.impls.items():
            impls[loss_name][name] = {dev: impl.unavailable(torch.device(dev), 512) or "ok" for dev in devices}
    return {
        "versions": versions(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda_devices(),
        "backends": backends(),
        "auto_backend": {dev: resolve_backend("auto", torch.device(dev), torch.float32) for dev in devices},
        "bench_impls": impls,
    }


def print_plain(data: dict) -> None:
    """The same report as `print_info`, in plain text (a bare install has no rich)."""
    print("versions")
    for name, version in data["versions"].items():
        print(f"  {name}: {version or 'not installed'}")
    print("machine")
    print(f"  cpu: {data['cpu']}, {data['cores']} cores, torch threads: {data['torch_threads']}")
    for dev in data["cuda"] or []:
        print(f"  cuda:{dev['index']}: {dev['name']} (sm {dev['capability']}, {dev['memory_gib']} GiB)")
    if not data["cuda"]:
        print("  cuda: no CUDA device")
    print("backends of the streamed-LSE primitive")
    for name, entry in data["backends"].items():
        print(f"  {name}: {'yes' if entry['available'] else 'no'} - {entry['detail']}")
    print("backend='auto' picks: " + ", ".join(f"{dev} -> {b}" for dev, b in data["auto_backend"].items()))
    print("benchmark implementations (mmcl-fast bench; needs pip install 'mmcl_fast[bench]')")
    for loss, impls in data["bench_impls"].items():
        for name, per_device in impls.items():
            print(f"  {loss} {name}: " + ", ".join(f"{dev} {status}" for dev, status in per_device.items()))


def print_info(data: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print_plain(data)
        return
    console = Console()
    versions = Table(title="versions", title_justify="left", show_header=False)
    for name, version in data["versions"].items():
        versions.add_row(name, version or "[dim]not installed[/dim]")
    console.print(versions)
    hardware = Table(title="machine", title_justify="left", show_header=False)
    hardware.add_row("cpu", f"{data['cpu']}, {data['cores']} cores, torch threads: {data['torch_threads']}")
    if data["cuda"]:
        for dev in data["cuda"]:
            hardware.add_row(f"cuda:{dev['index']}", f"{dev['name']} (sm {dev['capability']}, "
                                                      f"{dev['memory_gib']} GiB)")
    else:
        hardware.add_row("cuda", "no CUDA device")
    console.print(hardware)
    table = Table(title="backends of the streamed-LSE primitive", title_justify="left")
    table.add_column("backend")
    table.add_column("available")
    table.add_column("detail", overflow="fold")
    for name, entry in data["backends"].items():
        table.add_row(name, "[green]yes[/green]" if entry["available"] else "[red]no[/red]", entry["detail"])
    console.print(table)
    console.print("backend='auto' picks: " + ", ".join(f"{dev} -> {b}" for dev, b in data["auto_backend"].items()))
    bench = Table(title="benchmark implementations (mmcl-fast bench)", title_justify="left")
    bench.add_column("loss")
    bench.add_column("impl")
    devices = next(iter(next(iter(data["bench_impls"].values())).values())).keys()
    for dev in devices:
        bench.add_column(dev, overflow="fold")
    for loss, impls in data["bench_impls"].items():
        for name, per_device in impls.items():
            bench.add_row(loss, name, *(("[green]ok[/green]" if per_device[d] == "ok" else per_device[d])
                                        for d in devices))
    console.print(bench)


def main(args: argparse.Namespace) -> int:
    data = collect()
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print_info(data)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("info", help="versions and available backends",
                                   description="Versions, the compiled CPU kernel's ISA, Triton and CUDA devices, "
                                               "and which benchmark implementations can run here.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=main)
    return parser
