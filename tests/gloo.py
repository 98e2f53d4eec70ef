"""Run a test's worker function in W spawned processes (one gloo rank each) and collect what every rank saved.

The worker is called as ``target(rank, world, work_dir, *args)``; it writes ``rank{r}.pt`` with its results, or
``rank{r}.err`` with a traceback if it fails. A rank that fails or hangs (a collective that never matches) fails
the test with the traceback / rank numbers instead of blocking the session.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import traceback
from pathlib import Path

import torch


def spawn_ranks(target, world: int, work_dir, args: tuple = (), timeout: float = 300.0) -> list:
    """[rank 0's saved results, ..., rank W-1's] after running ``target`` in W fresh 'spawn' processes."""
    work_dir = Path(work_dir)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, world, str(work_dir), *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    errors = {rank: (work_dir / f"rank{rank}.err").read_text()
              for rank in range(world) if (work_dir / f"rank{rank}.err").exists()}
    assert not errors, "rank(s) failed:\n" + "\n".join(f"--- rank {r}\n{e}" for r, e in errors.items())
    assert not hung, f"rank(s) {hung} did not finish within {timeout} s (collective hang?)"
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return [torch.load(work_dir / f"rank{rank}.pt") for rank in range(world)]


def run_rank(rank: int, world: int, work_dir, body, *, backend: str = "gloo", timeout_s: float = 120.0,
             threads: int = 1) -> None:
    """What a spawned rank does around its test body: join the process group (FileStore rendezvous in work_dir),
    save ``body()``'s results as rank{rank}.pt, leave the group together; on any failure write rank{rank}.err
    (the traceback that `spawn_ranks` reports) and re-raise."""
    import torch.distributed as dist
    try:
        torch.set_num_threads(threads)  # W processes share this machine's cores
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{work_dir}/rendezvous", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        results = body()
        torch.save(results, os.path.join(work_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(work_dir, f"rank{rank}.err"), "w") as handle:
            handle.write(traceback.format_exc())
        raise
