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
"""
from __future__ import annotations

import gc
import importlib.util
import math
import multiprocessing
import signal
import statistics
import time
import traceback

import torch

from .impls import DTYPES, get_loss
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

