"""The lean core: `pip install mmcl_fast` needs torch and numpy only, and the losses run without any extra."""
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

EXTRAS_ONLY = ("rich", "matplotlib", "open_clip", "sklearn", "scipy", "triton", "pytest_benchmark")

_WITHOUT_EXTRAS = textwrap.dedent(f"""
    import sys
    blocked = {EXTRAS_ONLY!r}
    for name in blocked:  # as if not installed: `import name` raises, importlib.util.find_spec(name) is None
        sys.modules[name] = None
    import torch
    import mmcl_fast
    x = torch.nn.functional.normalize(torch.randn(37, 16), dim=1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(37, 16), dim=1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    losses = [mmcl_fast.ClipLoss()(x, y, scale), mmcl_fast.clip_loss(x, y, scale, backend="torch"),
              mmcl_fast.infonce(x, y, 2.0), mmcl_fast.uniformity_loss(x),
              mmcl_fast.brownian_bridge_loss(x, y, x, 0.25, mode="contrastive"),
              mmcl_fast.geometric_consistency_loss(x, y)]
    sum(losses).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    leaked = sorted(name for name, module in sys.modules.items() if name.split(".")[0] in blocked and module)
    print("ok", leaked)
""")


def test_losses_import_and_run_without_any_extra():
    out = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok []"


def test_core_dependencies_are_torch_and_numpy():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = sorted(dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"])
    assert names == ["numpy", "torch"]
    extras = project["optional-dependencies"]
    assert {"bench", "study", "test"} <= set(extras)
    assert any("open_clip_torch" in dep for dep in extras["bench"])


def test_cli_names_the_missing_extra():
    code = _WITHOUT_EXTRAS.split("import torch\n")[0] + textwrap.dedent("""
        from mmcl_fast.cli import main
        sys.exit(main(["misalign", "--quick"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "pip install 'mmcl_fast[study]'" in out.stderr
