"""Peak-memory probes for one benchmark record.

CPU: the peak resident set size (RSS) growth of the process that runs the record. Linux keeps the peak in
``VmHWM`` of ``/proc/self/status``; writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS, so
``peak = VmHWM(after) - VmRSS(at reset)`` is the largest amount of memory the measured call had resident at
once. The record runs in a fresh child process (see `measure.py`), so no allocator cache of an earlier record
hides or inflates it.

CUDA: the caching allocator's own counters, ``torch.cuda.max_memory_allocated`` minus the allocation at the
start (exact at the allocator level, no process isolation needed).
"""
from __future__ import annotations

import os

_STATUS = "/proc/self/status"


def _status_bytes(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...) in bytes, or None where there is none."""
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


def hwm_bytes() -> int | None:
    return _status_bytes("VmHWM")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Give the allocator's free pages back to the kernel (glibc malloc_trim), so that memory freed before a block
    and reused inside it counts as growth, as it would in a fresh process. A no-op without glibc."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Context manager: ``peak_bytes`` = peak RSS growth of this process inside the block (the allocator's free
    pages are released first, so the block cannot hide growth in memory an earlier step freed).

    Where the peak cannot be reset, the growth of VmHWM over its value at entry is reported instead (a lower
    bound that is exact when the block sets a new lifetime peak, the normal case in a fresh child process);
    ``method`` says which one was used.
    """

    def __enter__(self):
        self.peak_bytes: int | None = None
        _release_free_heap()
        self.method = "clear_refs" if _reset_hwm() else "hwm_growth"
        self._rss0 = rss_bytes()
        self._hwm0 = hwm_bytes()
        return self

    def __exit__(self, *exc):
        hwm = hwm_bytes()
        if hwm is None or self._rss0 is None:
            self.method = "unavailable"
            return False
        base = self._rss0 if self.method == "clear_refs" else max(self._rss0, self._hwm0 or 0)
        self.peak_bytes = max(0, hwm - base)
        return False


class CudaPeak:
    """Context manager: ``peak_bytes`` = max allocated CUDA memory inside the block minus the allocation at entry."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)
        self.peak_bytes: int | None = None
        self.method = "cuda_max_memory_allocated"
        return self

    def __exit__(self, *exc):
        import torch
        torch.cuda.synchronize(self.device)
        self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        return False


def peak_probe(device):
    """The probe for tensors on `device` (a torch.device)."""
    return CudaPeak(device) if device.type == "cuda" else RssPeak()


def total_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
