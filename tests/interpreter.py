"""Run loss computations under Triton's interpreter (TRITON_INTERPRET=1) in one child process.

The interpreter must be switched on before triton is imported and must not leak into the rest of the pytest
session, so a test module hands its cases to ONE child: the child imports the test module from its file and
calls ``function(case, inputs)`` for each case (our losses with backend="triton", on CPU tensors), and sends the
results back. The float64 references are then computed in the parent, on the same (rounded) inputs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import torch

_CHILD = textwrap.dedent(r'''
    import importlib.util, os, sys, traceback
    import torch
    assert os.environ.get("TRITON_INTERPRET") == "1"
    module_file, function_name, in_path, out_path = sys.argv[1:5]
    sys.path.insert(0, os.path.dirname(module_file))
    spec = importlib.util.spec_from_file_location("_interpreted_cases", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function = getattr(module, function_name)
    results = {}
    for case, inputs in torch.load(in_path):
        try:
            results[case["id"]] = function(case, inputs)
        except Exception:
            results[case["id"]] = {"error": traceback.format_exc()}
    torch.save(results, out_path)
''')


def run_interpreted(module_file: str, function_name: str, jobs: list, timeout: float = 600.0) -> dict:
    """{case id: function(case, inputs)} for jobs = [(case, inputs), ...], computed under TRITON_INTERPRET=1.

    A case that raised comes back as {"error": traceback}; a child that failed as a whole raises RuntimeError.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save(jobs, in_path)
        done = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(module_file), function_name, in_path,
                               out_path], env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"interpreter child failed (rc={done.returncode}):\n{done.stdout[-2000:]}\n"
                               f"{done.stderr[-4000:]}")
        return torch.load(out_path)


def kernel_backends():
    """"auto" (the compiled CPU kernel here), and Triton on CUDA (the interpreter cases are separate)."""
    import torch
    return ["auto", "triton"] if torch.cuda.is_available() else ["auto"]


def device_for(backend):
    """The device a backend's test tensors live on."""
    import torch
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
