"""The lean core: `pip install mmcl_fast` needs torch only; the losses, `mmcl-fast info` and `--version` run without
any extra; one version source; the compiled core's absence is announced, not silent; the wheel holds the library
only (the studies and the examples live beside it)."""
import importlib.util
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

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


def test_core_dependency_is_torch_alone():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = sorted(dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"])
    assert names == ["torch"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (Path(__file__).parents[1] / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "version" in project["dynamic"] and "version" not in project  # one source: mmcl_fast.__version__
    extras = project["optional-dependencies"]
    assert {"bench", "study", "test"} <= set(extras)
    assert any("open_clip_torch" in dep for dep in extras["bench"])


def test_cli_names_the_missing_extra():
    code = _WITHOUT_EXTRAS.split("import torch\n")[0] + textwrap.dedent("""
        from mmcl_fast.cli import main
        sys.exit(main(["bench", "--sizes", "8", "--dim", "4", "--out", sys.argv[1]]))
    """)
    with tempfile.TemporaryDirectory() as out_dir:
        out = subprocess.run([sys.executable, "-c", code, out_dir], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "pip install 'mmcl_fast[bench]'" in out.stderr


ROOT = Path(__file__).parents[1]
# what of the studies (studies/) and of the digits example (examples/digits/) once lived in the package
LAB_MODULES = ("mmcl_fast.misalign", "mmcl_fast.cmcr.world", "mmcl_fast.cmcr.spaces", "mmcl_fast.cmcr.study",
               "mmcl_fast.cmcr.cli", "mmcl_fast.cmcr.plot", "mmcl_fast.train.run", "mmcl_fast.train.data",
               "mmcl_fast.train.cli")
LAB_FILES = {"world.py", "spaces.py", "run.py"}  # by name, anywhere in the package


def test_wheel_package_holds_the_library_only():
    """The wheel packs the folders of tool.scikit-build's wheel.packages: mmcl_fast alone, with no study or example
    module in it; the sdist leaves the studies and the examples out."""
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]
    assert build["wheel"]["packages"] == ["mmcl_fast"]
    assert {"studies", "examples"} <= set(build["sdist"]["exclude"])
    package = ROOT / "mmcl_fast"
    for name in LAB_MODULES:
        assert importlib.util.find_spec(name) is None, f"{name} is importable"
        path = package.joinpath(*name.split(".")[1:])
        assert not path.exists() and not path.with_suffix(".py").exists(), f"{path} is in the package"
    lab = sorted(str(path.relative_to(ROOT)) for path in package.rglob("*.py") if path.name in LAB_FILES)
    assert not lab, f"study or example modules in the package: {lab}"
    import mmcl_fast.cmcr
    assert {"CMCRConnector", "semantic_enhance", "retrieval_metrics"} <= set(mmcl_fast.cmcr.__all__)
    assert not {"ThreeModalityWorld", "WorldConfig"} & set(dir(mmcl_fast.cmcr))


def test_bare_install_cli_info_and_version():
    """Without rich / matplotlib / open_clip: `mmcl-fast info` prints plain text, --version and python -m work."""
    code = _WITHOUT_EXTRAS.split("import torch\n")[0] + textwrap.dedent("""
        from mmcl_fast.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    info = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr[-3000:]
    assert "backends of the streamed-LSE primitive" in info.stdout and "backend='auto' picks" in info.stdout
    import mmcl_fast
    for argv in ([sys.executable, "-c", code, "--version"], [sys.executable, "-m", "mmcl_fast", "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == f"mmcl-fast {mmcl_fast.__version__}", out


def test_missing_compiled_core_warns_once_and_falls_back():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["mmcl_fast._C"] = None   # as if the compiled core failed to build or import
        import torch, mmcl_fast
        from mmcl_fast.backends import resolve_backend
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            picked = [resolve_backend("auto", torch.device("cpu"), torch.float32) for _ in range(3)]
            x = torch.randn(5, 4, requires_grad=True)
            mmcl_fast.clip_loss(x, torch.randn(5, 4), 10.0).backward()
        messages = [str(w.message) for w in caught if "mmcl_fast._C" in str(w.message)]
        print(picked, len(messages), messages[0] if messages else "")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("['torch', 'torch', 'torch'] 1 mmcl_fast: the compiled CPU core"), out.stdout
