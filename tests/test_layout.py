"""The package's layout holds: which layer may import which, no import cycle, the lab kept out of the library, one
accumulation-dtype rule, and every registered backend honouring the written contract (mmcl_fast.backends.Backend).
The table ALLOWED is the one docs/layout.md describes.

The import graph is read from the source (every import statement, those inside functions included), so a cycle
hidden behind a function-level import counts too.
"""
from __future__ import annotations

import ast
import inspect
import re
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmcl_fast"
CORE = {"_numerics", "_problem", "_validate", "_autocast", "_stats"}

# layer -> the layers it may import (besides itself). A layer is a top-level module or subpackage of mmcl_fast;
# "mmcl_fast" is the package's own __init__ (the public names).
ALLOWED = {
    "_numerics": set(),
    "_problem": set(),
    "_autocast": set(),
    "_stats": {"_numerics"},
    "_validate": {"_numerics", "_problem"},
    "backends": {"_C", "_numerics", "_problem", "_validate"},
    "_ops": CORE | {"backends"},
    "distributed": CORE | {"backends"},
    "losses": CORE | {"_ops", "backends", "distributed"},
    "cmcr": CORE | {"_ops", "losses"},
    "train": CORE | {"_ops", "backends", "losses", "distributed"},
    "integrations": CORE | {"_ops", "backends", "losses", "distributed", "train", "mmcl_fast"},
    "bench": CORE | {"_ops", "backends", "losses", "distributed", "train", "mmcl_fast", "_C", "cli"},
    "cli": {"backends", "bench", "mmcl_fast"},
    "__main__": {"cli"},
    "mmcl_fast": {"_ops", "losses", "distributed"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules) | {"mmcl_fast._C"}

    def owner(name: str) -> str:
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                targets = [f"{name}.{alias.name}" if f"{name}.{alias.name}" in known else name
                           for alias in node.names]
            for target in targets:
                if target.split(".")[0] in ("mmcl_fast", "studies", "examples"):
                    target = owner(target) if target.startswith("mmcl_fast") else target
                    if target != module:
                        graph[module].add(target)
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return "mmcl_fast" if len(parts) == 1 else parts[1]


def test_every_layer_imports_only_what_it_may():
    graph = _import_graph()
    layers = {_layer(m) for m in _modules()}
    assert layers <= set(ALLOWED), f"layers missing from ALLOWED (add them with their imports): {layers - set(ALLOWED)}"
    wrong = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                   if target.startswith("mmcl_fast") and _layer(target) != _layer(module)
                   and _layer(target) not in ALLOWED[_layer(module)])
    assert not wrong, "imports across layers that the layout does not allow:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = _import_graph()
    state: dict[str, int] = {}
    path: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(_modules()):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_library_imports_no_study_or_example():
    leaks = sorted(f"{module} imports {target}" for module, targets in _import_graph().items() for target in targets
                   if target.split(".")[0] in ("studies", "examples"))
    assert not leaks, leaks


def test_one_accumulation_dtype_rule():
    """float64 features accumulate in float64, everything else in float32: written once, in _numerics."""
    rule = re.compile(r"float64\s+if\s+.*float64\s+else|float32\s+if\s+.*!=\s*torch\.float64")
    repeats = [f"{path.relative_to(PACKAGE.parent)}:{number}" for path in PACKAGE.rglob("*.py")
               if path.name != "_numerics.py"
               for number, line in enumerate(path.read_text().splitlines(), 1) if rule.search(line)]
    assert not repeats, f"the accumulation-dtype rule is written again (use _numerics.accumulation_dtype): {repeats}"


def test_the_rule_detector_finds_a_repeat(tmp_path):
    """The pattern above matches the way the rule is usually written (so the test above can fail)."""
    rule = re.compile(r"float64\s+if\s+.*float64\s+else|float32\s+if\s+.*!=\s*torch\.float64")
    assert rule.search("acc = torch.float64 if x.dtype == torch.float64 else torch.float32")
    assert rule.search("acc = torch.float32 if x.dtype != torch.float64 else x.dtype")


def _contract_parameters(name: str) -> list[tuple[str, inspect._ParameterKind]]:
    from mmcl_fast.backends import Backend
    params = list(inspect.signature(getattr(Backend, name)).parameters.values())[1:]  # drop self
    return [(p.name, p.kind) for p in params]


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
def test_registered_backends_follow_the_contract(backend):
    from mmcl_fast.backends import BACKENDS, REGISTRY, get_backend
    assert BACKENDS == ("auto",) + tuple(REGISTRY)
    assert backend in REGISTRY
    if backend == "triton":
        pytest.importorskip("triton")
    module = get_backend(backend)
    for entry in ("lse_fwd", "lse_bwd", "sigmoid_loss"):
        params = [(p.name, p.kind) for p in inspect.signature(getattr(module, entry)).parameters.values()]
        assert params == _contract_parameters(entry), f"{backend}.{entry}{inspect.signature(getattr(module, entry))}"


def test_unknown_backend_names_the_registered_ones():
    import torch

    from mmcl_fast.backends import get_backend, resolve_backend
    with pytest.raises(ValueError, match="backend must be one of .*'reference'.*'torch'.*'cpu'.*'triton'"):
        resolve_backend("cuda", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="unknown concrete backend 'auto'"):
        get_backend("auto")


def test_the_lab_uses_only_public_names():
    """studies/ and examples/ import mmcl_fast's public names only: no module or name with a leading underscore
    (dunders such as __version__ are public)."""
    root = PACKAGE.parent
    private = []
    for folder in ("studies", "examples"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names if alias.name.split(".")[0] == "mmcl_fast"]
                elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("mmcl_fast"):
                    names = [f"{node.module}.{alias.name}" for alias in node.names]
                for name in names:
                    if any(part.startswith("_") and not part.startswith("__") for part in name.split(".")):
                        private.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    assert not private, "the lab imports private names of mmcl_fast (make them public first):\n" + "\n".join(private)
