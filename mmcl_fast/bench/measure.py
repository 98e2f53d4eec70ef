"""Measure one record: time and peak memory of one implementation's forward+backward on one problem.

`measure(job)` runs in the calling process. `measure_isolated(job)` runs it in a fresh child process (forked
from a forkserver that has torch and the implementations already imported, so a child starts in milliseconds)
and is what CPU records use: the peak-RSS growth then belongs to this record alone, and a record killed by
the kernel's out-of-memory killer comes back as status ``oom`` instead of taking the sweep down with it.

Protocol of one record:
  1. load the inputs (saved once per problem by the runner, so every impl and the float64 reference see the
     very same rounded tensors) and move them to the device;
  2. pre-warm the impl on a tiny problem (libraries load code, thread pools start, kernels compile);
  3. first full-size call inside the peak-memory probe: its peak is the record's memory, its time is
     reported as ``first_seconds`` (it is the warm-up);
  4. timed repeats; ``seconds`` is their median.

`measure_distributed(job)` runs one record of a process group of ``job["world_size"]`` ranks (gloo on CPU, NCCL
on CUDA, one fresh process per rank): every rank takes its rows of the same global inputs and runs the
impl's distributed step under the same protocol; a repeat's time is the slowest rank's, the memory is the
largest per-rank peak, and the loss is the mean of the per-rank losses (the global loss).
"""
from __future__ import annotations

import gc
import importlib.util
import math
import multiprocessing
import os
import signal
import statistics
import tempfile
import time
import traceback
from datetime import timedelta

import torch

from .impls import DTYPES, get_loss, split_rows
from .memory import peak_probe

_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "defaultcpuallocator")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    start = time.perf_counter()
    loss = step()
    _sync(device)
    return time.perf_counter() - start, loss


def _repeat_count(first_seconds: float, timing: dict) -> int:
    if timing.get("repeats"):
        return int(timing["repeats"])
    wanted = math.ceil(timing["target_seconds"] / max(first_seconds, 1e-9))
    return max(timing["min_repeats"], min(timing["max_repeats"], wanted))


def measure(job: dict) -> dict:
    """Run one record in this process. `job` keys: loss, impl, n, d, dtype, device, inputs_path, options, timing,
    threads. Returns {status, seconds, first_seconds, times, peak_bytes, peak_method, loss_value, error}."""
    result = {"status": "error", "seconds": None, "first_seconds": None, "times": [], "peak_bytes": None,
              "peak_method": None, "loss_value": None, "error": None}
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    device = torch.device(job["device"])
    loss_bench = get_loss(job["loss"])
    impl = loss_bench.impls[job["impl"]]
    dtype = DTYPES[job["dtype"]]
    options = job.get("options", {})
    try:
        # 1. the problem's inputs, exactly as the float64 reference saw them
        with torch.no_grad():
            saved = torch.load(job["inputs_path"], map_location="cpu", weights_only=True)
            inputs = {name: tensor.to(device) for name, tensor in saved.items()}
            del saved
        # 2. pre-warm on a tiny problem of the same kind
        tiny = {name: t.to(device) for name, t in
                loss_bench.make_inputs(min(job["n"], 64), job["d"], dtype, 12345).items()}
        impl.make_step(tiny, loss_bench.params, options)()
        del tiny
        step = impl.make_step(inputs, loss_bench.params, options)
        # 3. the first full-size call: peak memory and warm-up
        with peak_probe(device) as probe:
            first_seconds, loss = _timed(step, device)
        result.update(first_seconds=first_seconds, peak_bytes=probe.peak_bytes, peak_method=probe.method,
                      loss_value=float(loss))
        # 4. timed repeats
        times = []
        for _ in range(_repeat_count(first_seconds, job["timing"])):
            seconds, _ = _timed(step, device)
            times.append(seconds)
        result.update(status="ok", times=times, seconds=statistics.median(times))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a record, the sweep goes on
        result["status"] = "oom" if _is_oom(exc) else "error"
        result["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
        if result["status"] == "error":
            result["traceback"] = traceback.format_exc(limit=8)
    finally:
        inputs = step = loss = None  # noqa: F841 - release device memory before the next record
        if device.type == "cuda":  # in-process records: free the device for the next one
            gc.collect()
            torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------
# isolation: one fresh process per record
# ---------------------------------------------------------------------------------------------

_CONTEXT = None


def _context():
    """A forkserver context whose server has torch, mmcl_fast and the baselines imported once."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _CONTEXT = multiprocessing.get_context("forkserver")
            preload = ["mmcl_fast.bench.measure"]
            preload += [m for m in ("open_clip.loss",) if importlib.util.find_spec(m.split(".")[0])]
            _CONTEXT.set_forkserver_preload(preload)
        else:  # not Linux: slower, same semantics
            _CONTEXT = multiprocessing.get_context("spawn")
    return _CONTEXT


def _child_main(job: dict, conn) -> None:
    try:
        conn.send(measure(job))
    finally:
        conn.close()


def measure_isolated(job: dict, timeout_seconds: float | None = None, *, target=None) -> dict:
    """`measure(job)` in a fresh child process; a child that dies (e.g. SIGKILL by the OOM killer) -> ``oom``.

    `target(job, conn)` replaces the child's entry point (tests use it to simulate a killed child).
    """
    ctx = _context()
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=target or _child_main, args=(job, child_conn), daemon=True)
    process.start()
    child_conn.close()
    result = None
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    try:
        while result is None:
            if parent_conn.poll(0.2):
                try:
                    result = parent_conn.recv()
                except EOFError:
                    break
            elif not process.is_alive() and not parent_conn.poll(0.2):
                break
            elif deadline is not None and time.monotonic() > deadline:
                process.kill()
                result = {"status": "error", "error": f"timed out after {timeout_seconds:.0f} s"}
    except BaseException:  # Ctrl-C: stop the child at once
        process.kill()
        raise
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
        parent_conn.close()
    if result is None:
        code = process.exitcode
        if code is not None and code < 0 and -code == signal.SIGKILL:
            result = {"status": "oom", "error": "the child process was killed (SIGKILL, most likely out of memory)"}
        else:
            result = {"status": "error", "error": f"the child process exited with code {code} without a result"}
    return result



# ---------------------------------------------------------------------------------------------
# distributed records: one fresh process per rank, in a real process group
# ---------------------------------------------------------------------------------------------

def measure_rank(job: dict, rank: int, world_size: int, init_method: str) -> dict:
    """One rank of a distributed record (see the module docstring); returns this rank's result, whose
    ``loss_value`` is the global loss (mean over ranks) and whose ``times`` line up with the other ranks'."""
    import warnings

    import torch.distributed as dist
    # open_clip's gather calls torch.distributed.nn.all_gather, which warns on every call in recent torch
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    result = {"status": "error", "seconds": None, "first_seconds": None, "times": [], "peak_bytes": None,
              "peak_method": None, "loss_value": None, "error": None, "rank": rank}
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    cuda = job["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=job.get("collective_timeout", 600)))
    loss_bench = get_loss(job["loss"])
    impl = loss_bench.impls[job["impl"]]
    dtype = DTYPES[job["dtype"]]
    options = dict(job.get("options", {}), rank=rank, world_size=world_size)
    try:
        with torch.no_grad():
            saved = torch.load(job["inputs_path"], map_location="cpu", weights_only=True)
            inputs = {name: t.to(device) for name, t in split_rows(saved, rank, world_size).items()}
            del saved
        # pre-warm (thread pools, kernels, communication buffers) on a tiny global batch of equal local batches
        tiny = loss_bench.make_inputs(16 * world_size, job["d"], dtype, 12345)
        impl.make_dist_step({k: t.to(device) for k, t in split_rows(tiny, rank, world_size).items()},
                            loss_bench.params, options)()
        del tiny
        step = impl.make_dist_step(inputs, loss_bench.params, options)
        dist.barrier()
        with peak_probe(device) as probe:
            first_seconds, loss = _timed(step, device)
        result.update(first_seconds=first_seconds, peak_bytes=probe.peak_bytes, peak_method=probe.method)
        # every rank runs the same number of repeats: the count follows the slowest rank's first call
        slowest = torch.tensor([first_seconds], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times = []
        for _ in range(_repeat_count(float(slowest), job["timing"])):
            dist.barrier()
            seconds, loss = _timed(step, device)
            times.append(seconds)
        total = loss.detach().double().reshape(1).to(device)
        dist.all_reduce(total)
        result.update(status="ok", times=times, seconds=statistics.median(times),
                      loss_value=float(total) / world_size)
    except Exception as exc:  # noqa: BLE001 - becomes the record; the parent stops the other ranks
        result["status"] = "oom" if _is_oom(exc) else "error"
        result["error"] = f"rank {rank}: {type(exc).__name__}: {exc}".strip()[:2000]
        if result["status"] == "error":
            result["traceback"] = traceback.format_exc(limit=8)
    else:
        dist.destroy_process_group()
    return result


def _rank_main(job: dict, rank: int, world_size: int, init_method: str, conn) -> None:
    try:
        conn.send(measure_rank(job, rank, world_size, init_method))
    finally:
        conn.close()


def combine_ranks(results: list[dict]) -> dict:
    """The record of a process group from its ranks' results: slowest rank per repeat, largest per-rank peak."""
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        worst = next((r for r in failed if r.get("status") == "oom"), failed[0])
        return {**worst, "peak_bytes_per_rank": [r.get("peak_bytes") for r in results]}
    times = [max(r["times"][i] for r in results) for i in range(min(len(r["times"]) for r in results))]
    peaks = [r["peak_bytes"] for r in results]
    return {"status": "ok", "times": times, "seconds": statistics.median(times),
            "first_seconds": max(r["first_seconds"] for r in results),
            "peak_bytes": None if None in peaks else max(peaks), "peak_bytes_per_rank": peaks,
            "peak_method": results[0]["peak_method"], "loss_value": results[0]["loss_value"], "error": None}


def measure_distributed(job: dict, timeout_seconds: float | None = None, *, target=None) -> dict:
    """`measure_rank` in ``job["world_size"]`` fresh processes (one per rank), combined by `combine_ranks`.

    A rank that dies without a result (SIGKILL: out of memory) or a group past the timeout stops every rank:
    the others would wait in a collective for it. `target` replaces each rank's entry point (tests).
    """
    world_size = int(job["world_size"])
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="mmcl-fast-dist-") as rendezvous:
        init_method = "file://" + os.path.join(rendezvous, "store")
        ranks = []
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            process = ctx.Process(target=target or _rank_main, args=(job, rank, world_size, init_method, child_conn),
                                  daemon=True)
            process.start()
            child_conn.close()
            ranks.append((process, parent_conn))
        results: list[dict | None] = [None] * world_size
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        failure = None
        try:
            while failure is None and any(r is None for r in results):
                for rank, (process, conn) in enumerate(ranks):
                    if results[rank] is not None:
                        continue
                    if conn.poll(0.1):
                        try:
                            results[rank] = conn.recv()
                        except EOFError:
                            failure = _dead_rank(rank, process)
                    elif not process.is_alive() and not conn.poll(0.1):
                        failure = _dead_rank(rank, process)
                    if results[rank] is not None and results[rank].get("status") != "ok":
                        failure = results[rank]  # the other ranks may be stuck in a collective
                    if failure is not None:
                        break
                if failure is None and deadline is not None and time.monotonic() > deadline:
                    failure = {"status": "error", "error": f"timed out after {timeout_seconds:.0f} s"}
        finally:
            for process, conn in ranks:
                if process.is_alive() and (failure is not None or any(r is None for r in results)):
                    process.kill()
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
                    process.join()
                conn.close()
    if failure is not None:
        return {**failure, "peak_bytes_per_rank": [r and r.get("peak_bytes") for r in results]}
    return combine_ranks(results)


def _dead_rank(rank: int, process) -> dict:
    process.join(timeout=1)
    code = process.exitcode
    if code is not None and code < 0 and -code == signal.SIGKILL:
        return {"status": "oom", "error": f"rank {rank} was killed (SIGKILL, most likely out of memory)"}
    return {"status": "error", "error": f"rank {rank} exited with code {code} without a result"}
