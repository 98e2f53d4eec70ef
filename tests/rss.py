"""Peak-memory probe for the no-quadratic-memory tests: run one step in a fresh process and read its VmHWM.

The step runs in a child Python so that nothing else of the test session (other tests' tensors, allocator caches)
is counted. The child builds its inputs, runs one small warm-up step (thread pools, kernel loading), resets the
kernel's peak-RSS mark (`/proc/self/clear_refs`, "5"), runs the measured step and reports how far the peak rose
above the resident size just before it, next to the bytes of its inputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_CHILD = r'''
import json, sys
import torch

def _status_kib(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(key + " not in /proc/self/status")

{setup}

step(make_inputs(64))
inputs = make_inputs({n})
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
base_kib = _status_kib("VmRSS")
step(inputs)
peak_kib = _status_kib("VmHWM")
print(json.dumps({{"growth_bytes": (peak_kib - base_kib) * 1024,
                   "input_bytes": sum(t.numel() * t.element_size() for t in inputs)}}))
'''


def peak_rss_growth(setup: str, n: int, timeout: float = 600.0) -> dict:
    """Peak RSS growth (bytes) of ``step(make_inputs(n))`` in a fresh process, and the inputs' size in bytes.

    `setup` is Python source defining ``make_inputs(n) -> list[Tensor]`` and ``step(inputs) -> None``.
    """
    if not os.path.exists("/proc/self/status"):
        raise RuntimeError("peak_rss_growth needs Linux /proc")
    code = _CHILD.format(setup=textwrap.dedent(setup), n=int(n))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed (rc={done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
