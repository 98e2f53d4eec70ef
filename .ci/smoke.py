"""Smoke test of an installed mmcl_fast (a wheel in a fresh environment), run from outside the source tree.

Imports the package, checks that the compiled core loaded, runs clip_loss and siglip_loss forward + backward against
a float64 dense reference, and runs `mmcl-fast info` and `mmcl-fast --version` (the console script and
`python -m mmcl_fast`). Exits non-zero on any failure."""
import os
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F

import mmcl_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
here = os.path.dirname(os.path.abspath(mmcl_fast.__file__))
assert not here.startswith(ROOT + os.sep), f"imported the source tree ({here}), not the installed package"
from mmcl_fast.backends import cpu  # noqa: E402

assert cpu.available(), f"the compiled core did not import: {cpu._IMPORT_ERROR}"
print(f"mmcl_fast {mmcl_fast.__version__} from {here}; CPU kernel ISA: {cpu.isa()}")

torch.manual_seed(0)
x = F.normalize(torch.randn(37, 24, dtype=torch.float64), dim=1)
y = F.normalize(torch.randn(37, 24, dtype=torch.float64), dim=1)
scale, bias = 20.0, -4.0


def reference(kind):
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    logits = scale * xr @ yr.T + bias
    if kind == "clip":
        labels = torch.arange(37)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    else:
        z = 2 * torch.eye(37, dtype=torch.float64) - 1
        loss = -F.logsigmoid(z * logits).sum() / 37
    loss.backward()
    return loss.detach(), xr.grad, yr.grad


for kind, fn in (("clip", mmcl_fast.clip_loss), ("siglip", mmcl_fast.siglip_loss)):
    xf, yf = x.float().requires_grad_(), y.float().requires_grad_()
    loss = fn(xf, yf, scale, bias, backend="cpu")
    loss.backward()
    ref_loss, ref_dx, ref_dy = reference(kind)
    errors = [abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
              ((xf.grad.double() - ref_dx).abs().max() / ref_dx.abs().max()).item(),
              ((yf.grad.double() - ref_dy).abs().max() / ref_dy.abs().max()).item()]
    assert max(errors) <= 1e-5, f"{kind}: relative errors {errors}"
    print(f"{kind}: loss {loss.item():.6f}, relative errors {max(errors):.1e}")

script = shutil.which("mmcl-fast", path=os.path.dirname(sys.executable))
for argv in ([script, "--version"], [sys.executable, "-m", "mmcl_fast", "--version"], [script, "info"]):
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0, f"{argv}: {out.stderr[-2000:]}"
    print(out.stdout.strip().splitlines()[0])
print("smoke test passed")
