"""The sweep: plan the records, run each one, write ``results.json``, the plots and the table.

A record is one (loss, impl, N, D, dtype, device). Per (loss, D, dtype) the sizes run in increasing N, so a
dense baseline is seen to grow until its estimated peak crosses the memory budget (then ``skipped``, never run
into swap) or it fails to allocate (``oom``, and larger N are skipped). Every impl of a problem gets the very
same inputs (saved once to a temporary file) and is checked against one float64 reference of the loss.

With ``world_size`` W > 1 a record is one process group of W ranks (gloo on CPU, NCCL on one GPU per rank):
N is the global batch, each rank holds N / W rows, and the impls are the loss's distributed forms.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .impls import DTYPES, get_loss
from .machine import describe
from .measure import measure, measure_distributed, measure_isolated

MIB = 2**20
GIB = 2**30
DEFAULT_CPU_BUDGET = 2 * GIB
CUDA_BUDGET_FRACTION = 0.9

# (sizes, dims, dtypes) per (device type, full?)
SWEEPS = {
    ("cpu", False): ([1024, 2048, 4096, 8192, 16384], [512], ["fp32", "bf16"]),
    ("cpu", True): ([1024, 2048, 4096, 8192, 16384, 32768], [512, 1024], ["fp32", "bf16"]),
    ("cuda", False): ([4096, 16384, 65536, 262144], [512], ["bf16"]),
    ("cuda", True): ([8192, 32768, 131072, 524288], [512, 768, 1024], ["bf16"]),
}
# timed repeats after the warm-up call: enough to fill target_seconds, within [min_repeats, max_repeats];
# per (device type, full?)
TIMING = {
    ("cpu", False): {"target_seconds": 3.0, "min_repeats": 1, "max_repeats": 5},
    ("cpu", True): {"target_seconds": 5.0, "min_repeats": 3, "max_repeats": 20},
    ("cuda", False): {"target_seconds": 1.0, "min_repeats": 5, "max_repeats": 100},
    ("cuda", True): {"target_seconds": 2.0, "min_repeats": 10, "max_repeats": 200},
}
RECORD_TIMEOUT_SECONDS = 3600
# A call predicted (from the same impl's previous size, time ~ N^2) to take longer than this is recorded as
# skipped: e.g. open_clip in bf16 on a CPU without native bf16 matmul (~1 GFLOP/s) would need 8 min per call at
# N = 8192. None: no limit.
DEFAULT_TIME_BUDGET = {"cpu": 60.0, "cuda": None}


@dataclass
class BenchConfig:
    out: Path
    device: str = "cpu"
    losses: list = field(default_factory=lambda: ["clip"])
    impls: list | None = None  # None: every impl that can run on the device
    sizes: list | None = None  # None: the sweep's default for the device
    dims: list | None = None
    dtypes: list | None = None
    full: bool = False
    mem_budget_bytes: int | None = None  # None: 2 GiB on CPU, 90% of the GPU's memory on CUDA
    repeats: int | None = None  # fixed number of timed repeats (default: adaptive, see TIMING)
    backend: str = "auto"  # mmcl_fast's backend
    seed: int = 0
    threads: int | None = None
    plots: bool = True
    time_budget_s: float | None = None  # None: DEFAULT_TIME_BUDGET of the device; 0: no limit
    world_size: int = 1  # > 1: each record is a process group of this many ranks
    dist_impl: str | None = None  # SigLipLoss's dist_impl (bidir, shift, reduce, gather); None: each impl's default

    def resolved(self) -> BenchConfig:
        """A copy with every default filled in for the device."""
        sizes, dims, dtypes = SWEEPS[(self.device, self.full)]
        budget = self.mem_budget_bytes
        if budget is None:
            if self.device == "cuda":
                budget = int(CUDA_BUDGET_FRACTION * torch.cuda.get_device_properties(0).total_memory)
            else:
                budget = DEFAULT_CPU_BUDGET
        time_budget = DEFAULT_TIME_BUDGET[self.device] if self.time_budget_s is None else (self.time_budget_s or None)
        return dataclasses.replace(self, sizes=list(self.sizes or sizes), dims=list(self.dims or dims),
                                   dtypes=list(self.dtypes or dtypes), mem_budget_bytes=budget,
                                   time_budget_s=time_budget)

    def timing(self) -> dict:
        timing = dict(TIMING[(self.device, self.full)])
        if self.repeats:
            timing["repeats"] = self.repeats
        return timing

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["timing"] = self.timing()
        return data


def impls_for(config: BenchConfig, loss_name: str) -> tuple[list[str], dict[str, str]]:
    """(impls that run, {impl: reason} for those that cannot run on this device)."""
    loss = get_loss(loss_name)
    device = torch.device(config.device)
    wanted = config.impls or list(loss.impls)
    unknown = [name for name in wanted if name not in loss.impls]
    if unknown:
        raise ValueError(f"unknown impl(s) {', '.join(unknown)} for loss {loss_name!r}; "
                         f"choose from: {', '.join(loss.impls)}")
    # feature-size limits (inf_cl's head size) are checked per record; here only "can it run at all"
    probe_dim = 256
    unavailable = {name: reason for name in wanted
                   if (reason := loss.impls[name].unavailable(device, probe_dim)) is not None}
    if config.world_size == 1:
        unavailable.update({name: "a distributed variant (--world-size > 1)" for name in wanted
                            if loss.impls[name].dist_only and name not in unavailable})
    if config.world_size > 1:
        for name in wanted:
            impl = loss.impls[name]
            if name in unavailable:
                continue
            if impl.make_dist_step is None:
                unavailable[name] = f"no distributed form (--world-size {config.world_size})"
            elif impl.dist_unavailable is not None and (reason := impl.dist_unavailable()) is not None:
                unavailable[name] = reason
    return [name for name in wanted if name not in unavailable], unavailable


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.0f} MiB"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as out:
        json.dump(data, out, indent=1)
    os.replace(tmp, path)


def _record(loss: str, impl: str, n: int, d: int, dtype: str, device: str, estimate: int,
            world_size: int = 1) -> dict:
    return {"loss": loss, "impl": impl, "n": n, "m": n, "d": d, "dtype": dtype, "device": device,
            "world_size": world_size, "input_mib": None, "status": "skipped", "seconds": None,
            "first_seconds": None, "repeats": 0, "peak_mib": None,
            "estimated_mib": round(estimate / MIB, 1), "rel_err": None, "loss_value": None,
            "reference_loss": None, "gflops": None, "ceiling_frac": None, "speedup": None,
            "memory_ratio": None, "over_budget": False, "note": None}


def _add_ratios(records: list[dict], anchors: dict[str, str]) -> None:
    """speedup = anchor time / time and memory_ratio = anchor peak / peak, against the same problem's anchor."""
    by_problem = {}
    for rec in records:
        if rec["status"] == "ok":
            by_problem[(rec["loss"], rec["impl"], rec["n"], rec["d"], rec["dtype"])] = rec
    for rec in records:
        anchor = by_problem.get((rec["loss"], anchors.get(rec["loss"]), rec["n"], rec["d"], rec["dtype"]))
        if rec["status"] != "ok" or anchor is None:
            continue
        rec["speedup"] = round(anchor["seconds"] / rec["seconds"], 3) if rec["seconds"] else None
        if rec["peak_mib"] and anchor["peak_mib"]:
            rec["memory_ratio"] = round(anchor["peak_mib"] / rec["peak_mib"], 2)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass


def run(config: BenchConfig, *, progress_console=None, show_progress: bool = True) -> dict:
    """Run the sweep described by `config` (already validated, see cli.py); returns the results dict.

    Writes ``config.out/results.json`` after every record (a long sweep that is stopped keeps what it
    measured), then ``summary.md`` (README-ready tables) and the PNG plots.
    """
    config = config.resolved()
    device = torch.device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    machine = describe(device, config.dtypes, sizes=config.sizes, dims=config.dims)
    machine["mem_budget_mib"] = round(config.mem_budget_bytes / MIB, 1)
    plan = {loss: impls_for(config, loss) for loss in config.losses}
    machine["unavailable_impls"] = {loss: unavailable for loss, (_, unavailable) in plan.items() if unavailable}
    results = {"machine": machine, "config": config.to_json(),
               "anchors": {name: get_loss(name).anchor for name in config.losses}, "records": []}
    records = results["records"]
    results_path = out / "results.json"
    total = sum(len(impls) for impls, _ in plan.values()) * len(config.sizes) * len(config.dims) * \
        len(config.dtypes)

    if show_progress:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=progress_console, transient=False)
    else:
        progress = _NoProgress()
    scratch = Path(tempfile.mkdtemp(prefix="mmcl-fast-bench-"))
    try:
        with progress:
            task = progress.add_task("benchmark", total=total)
            for loss_name, (impl_names, _) in plan.items():
                for d, dtype_name in itertools.product(config.dims, config.dtypes):
                    failed_at: dict[str, int] = {}  # impl -> the N where it ran out of memory
                    timed_at: dict[str, tuple[int, float]] = {}  # impl -> (N, seconds of its first call) so far
                    for n in sorted(config.sizes):
                        problem = _Problem(get_loss(loss_name), n, d, dtype_name, config, scratch)
                        for impl_name in impl_names:
                            progress.update(task, description=f"{loss_name} {impl_name:>9} n={n} d={d} {dtype_name}")
                            rec = _run_record(problem, impl_name, config, machine, failed_at, timed_at)
                            records.append(rec)
                            _write_json(results_path, results)
                            progress.update(task, advance=1)
                        problem.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _add_ratios(records, results["anchors"])
    _write_json(results_path, results)
    from .report import markdown_summary
    (out / "summary.md").write_text(markdown_summary(results))
    if config.plots:
        from .plot import plot_results
        results["plots"] = [str(p) for p in plot_results(results, out)]
    return results


class _Problem:
    """One (loss, N, D, dtype): its inputs, saved once for every impl's child process, and its float64 loss.

    Both are made on first use, so a problem whose impls are all skipped costs nothing."""

    def __init__(self, loss, n: int, d: int, dtype_name: str, config: BenchConfig, scratch: Path):
        self.loss, self.n, self.d, self.dtype_name = loss, n, d, dtype_name
        self.device = torch.device(config.device)
        self._seed = config.seed
        self._path = scratch / f"{loss.name}_{n}_{d}_{dtype_name}.pt"
        self._reference = None
        self.input_bytes = None  # of the whole (global) batch, known once the inputs are made

    def inputs_path(self) -> Path:
        if not self._path.exists():
            inputs = self.loss.make_inputs(self.n, self.d, DTYPES[self.dtype_name], self._seed)
            self.input_bytes = sum(t.numel() * t.element_size() for t in inputs.values())
            torch.save(inputs, self._path)
            self._reference = self.loss.reference({k: v.to(self.device) for k, v in inputs.items()},
                                                  self.loss.params)
        return self._path

    def reference(self) -> float:
        self.inputs_path()
        return self._reference

    def close(self) -> None:
        self._path.unlink(missing_ok=True)


def _run_record(problem: _Problem, impl_name: str, config: BenchConfig, machine: dict,
                failed_at: dict[str, int], timed_at: dict[str, tuple[int, float]]) -> dict:
    """Measure one impl on one problem, or record why it was skipped."""
    loss, n, d, dtype_name = problem.loss, problem.n, problem.d, problem.dtype_name
    impl = loss.impls[impl_name]
    world = config.world_size
    # per rank: N / W rows against all N columns; on CPU every rank shares the machine's memory
    estimate = impl.estimate_bytes(n // world, n, d, DTYPES[dtype_name])
    machine_estimate = estimate * (world if problem.device.type == "cpu" else 1)
    rec = _record(loss.name, impl_name, n, d, dtype_name, config.device, estimate, world)
    reason = impl.unavailable(problem.device, d)
    if reason is None and impl_name in failed_at:
        reason = f"out of memory at n={failed_at[impl_name]}"
    if reason is None and machine_estimate > config.mem_budget_bytes:
        rec["over_budget"] = True
        reason = (f"estimated {_size(machine_estimate)}{f' ({world} ranks)' if world > 1 else ''} > memory budget "
                  f"{_size(config.mem_budget_bytes)}")
    if reason is None and config.time_budget_s and impl_name in timed_at:
        prev_n, prev_seconds = timed_at[impl_name]
        predicted = prev_seconds * (n / prev_n) ** 2
        if predicted > config.time_budget_s:
            reason = (f"estimated {predicted:.0f} s per call (from {prev_seconds:.1f} s at n={prev_n}) > time "
                      f"budget {config.time_budget_s:.0f} s")
    if reason is not None:
        rec["note"] = reason
        return rec
    options = {"backend": config.backend}
    if config.dist_impl:
        options["dist_impl"] = config.dist_impl
    job = {"loss": loss.name, "impl": impl_name, "n": n, "d": d, "dtype": dtype_name, "device": config.device,
           "inputs_path": str(problem.inputs_path()), "options": options,
           "timing": config.timing(), "threads": config.threads}
    rec["input_mib"] = round(problem.input_bytes / MIB, 3) if problem.input_bytes is not None else None
    ceiling = machine["matmul_gflops"].get(dtype_name)
    if world > 1:
        # one process per rank; CPU ranks share the cores (threads: cores / W unless --threads says otherwise)
        job.update(world_size=world, threads=config.threads or max(1, (os.cpu_count() or 1) // world))
        result = measure_distributed(job, RECORD_TIMEOUT_SECONDS)
        rec["peak_mib_per_rank"] = [None if b is None else round(b / MIB, 2)
                                    for b in result.get("peak_bytes_per_rank") or []]
        if ceiling and problem.device.type == "cuda":
            ceiling *= world  # one GPU per rank
    # CPU: a fresh process per record (peak RSS is the record's own); CUDA: the allocator's counters in-process
    elif problem.device.type == "cpu":
        result = measure_isolated(job, RECORD_TIMEOUT_SECONDS)
    else:
        result = measure(job)
    _fill(rec, result, problem.reference(), loss.flops(n, n, d), ceiling)
    if rec["status"] == "oom":
        failed_at[impl_name] = n
    if rec["status"] == "ok":
        timed_at[impl_name] = (n, rec["first_seconds"])
    return rec


def _fill(rec: dict, result: dict, reference: float, flops: int, ceiling_gflops: float | None) -> None:
    rec["status"] = result.get("status", "error")
    rec["reference_loss"] = reference
    if result.get("peak_bytes") is not None:
        rec["peak_mib"] = round(result["peak_bytes"] / MIB, 2)
    rec["peak_method"] = result.get("peak_method")
    if result.get("loss_value") is not None:
        rec["loss_value"] = result["loss_value"]
        rec["rel_err"] = abs(result["loss_value"] - reference) / abs(reference) if reference else None
    if rec["status"] == "ok":
        rec["seconds"] = result["seconds"]
        rec["first_seconds"] = result["first_seconds"]
        rec["repeats"] = len(result["times"])
        rec["gflops"] = round(flops / result["seconds"] / 1e9, 2)
        if ceiling_gflops:
            rec["ceiling_frac"] = round(rec["gflops"] / ceiling_gflops, 4)
    if result.get("error"):
        rec["note"] = result["error"]
    if result.get("traceback"):
        rec["traceback"] = result["traceback"]
