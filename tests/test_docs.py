"""The README and the docs site hold: generated tables equal what the committed JSON gives, the README stays a short
front door that starts with the commands CI runs, no page cites the internal spec, and the site builds strictly."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GENERATOR = DOCS / "gen_tables.py"

pytestmark = pytest.mark.skipif(not GENERATOR.is_file() or not (ROOT / "mkdocs.yml").is_file(),
                                reason="no docs/ and mkdocs.yml here (an installed package, not a clone)")


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kwargs)


@pytest.mark.skipif(not (ROOT / "benchmarks" / "results").is_dir(),
                    reason="the committed results are not here (an sdist leaves them out)")
def test_generated_tables_equal_the_committed_pages():
    result = _run(str(GENERATOR), "--check")
    assert result.returncode == 0, f"python docs/gen_tables.py --check failed:\n{result.stdout}{result.stderr}"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_tables", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (ROOT / "benchmarks" / "results").is_dir(),
                    reason="the committed results are not here (an sdist leaves them out)")
def test_generator_rewrites_a_stale_block_keeping_its_indent_and_is_idempotent():
    gen = _generator()
    page = "prose\n    <!-- generated:late-training -->\n    stale\n    <!-- /generated:late-training -->\nmore prose\n"
    used: set[str] = set()
    fresh = gen.render(page, used)
    assert used == {"late-training"} and "stale" not in fresh
    assert fresh.startswith("prose\n") and fresh.endswith("\nmore prose\n")
    assert all(line.startswith("    ") or not line for line in fresh.splitlines()[1:-1])
    assert gen.render(fresh, set()) == fresh


def test_generator_refuses_an_unknown_block():
    with pytest.raises(SystemExit, match="unknown generated block"):
        _generator().render("<!-- generated:nope -->\nx\n<!-- /generated:nope -->\n", set())


def test_readme_is_a_short_front_door_that_starts_with_install_and_test():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the front door stays within 200 (details: docs/)"
    fence = next(i for i, line in enumerate(lines) if line.startswith("```"))
    assert fence <= 3, "the README opens with its install / test / bench commands, right under the title"
    commands = [line.split("#")[0].strip() for line in lines[fence + 1:fence + 4]]
    assert commands == ['pip install -e ".[test]"', "python -m pytest", "mmcl-fast bench"], commands


@pytest.mark.skipif(not (ROOT / ".ci" / "run").is_file(), reason="no .ci/ here (an sdist leaves it out)")
def test_ci_runs_the_readme_commands_and_the_strict_docs_build():
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('pip install -e ".[test]"', "python -m pytest", "mkdocs build --strict"):
        assert command in ci, f".ci/run does not run {command!r}"


def test_no_page_cites_the_internal_spec():
    word = "SP" + "EC"  # spelled apart, so that a search of the repository for the word does not land here
    pages = [README] + sorted(DOCS.rglob("*.md")) + [GENERATOR, ROOT / "mkdocs.yml"]
    cited = [str(p.relative_to(ROOT)) for p in pages if word in p.read_text()]
    assert not cited, f"these pages cite {word}, a document the reader cannot open: {cited}"


def test_readme_has_no_issue_numbers_or_commit_hashes():
    text = README.read_text()
    assert not re.search(r"\bissue \d+|#\d{2,}\b", text), "issue numbers belong to the tracker, not the README"
    assert not re.search(r"\bcommit [0-9a-f]{7,}\b", text), "commit hashes belong to docs/benchmarks.md's tables"


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text()):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_mkdocs_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs / mkdocstrings are not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = _run("-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site"), env=env,
                  timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    assert (tmp_path / "site" / "design" / "index.html").is_file()


def _anchors(page: Path) -> set[str]:
    """The anchors of a docs page: explicit `{#id}` attributes and the slugs of headings without one."""
    found = set()
    for line in page.read_text().splitlines():
        if not line.startswith("#"):
            continue
        explicit = re.search(r"\{#([\w-]+)\}", line)
        if explicit:
            found.add(explicit.group(1))
        else:
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\s-]", "", title).strip().replace(" ", "-"))
    return found


SOURCE_DIRS = ("mmcl_fast", "csrc", "tests", "benchmarks", "studies", "examples", ".ci")
SOURCE_SUFFIXES = {".py", ".h", ".cpp", ".txt", ".toml", ""}


def _sources():
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SOURCE_SUFFIXES and "results" not in path.parts:
                yield path


def test_every_docs_reference_in_the_code_has_a_target():
    """Code and comments cite the design notes as docs/<page>.md#<anchor> (with more anchors of the same page after
    a comma as #<anchor>): each page and anchor must exist."""
    missing = []
    for path in _sources():
        for match in re.finditer(r"docs/([\w/-]+\.md)((?:#[\w-]+)?(?:,\s*#[\w-]+)*)", path.read_text(errors="ignore")):
            page = DOCS / match.group(1)
            where = f"{path.relative_to(ROOT)}: {match.group(0)}"
            if not page.is_file():
                missing.append(where)
                continue
            wanted = re.findall(r"#([\w-]+)", match.group(2))
            if any(anchor not in _anchors(page) for anchor in wanted):
                missing.append(where)
    assert not missing, "references to docs pages or anchors that do not exist:\n" + "\n".join(missing)


def test_no_code_cites_the_internal_spec():
    word = "SP" + "EC"
    cited = [str(p.relative_to(ROOT)) for p in _sources() if p != Path(__file__).resolve()
             and re.search(rf"\b{word}\b", p.read_text(errors="ignore"))]
    assert not cited, f"these files cite {word}, a document outside the repository; link docs/ instead: {cited}"


_RUN_EXAMPLES = r'''
import pathlib, re, sys, tempfile
import torch
import torch.distributed as dist
import torch.nn.functional as F

# a one-process gloo group, so that the distributed examples run as they are written
dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/store", rank=0, world_size=1)


def prelude():
    """The names the examples take as given: small random unit features, a scale and a bias, rank and world."""
    n, d = 64, 32
    feat = lambda: F.normalize(torch.randn(n, d), dim=1).requires_grad_()  # noqa: E731
    names = ("image_features", "text_features", "img", "txt", "img_aug", "txt_aug", "img_ind", "txt_ind",
             "img_ind_aug", "txt_ind_aug", "image_local", "text_local")
    return {**{name: feat() for name in names}, "logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-10.0),
            "w_br": 0.1, "w_gc": 0.1, "w_sep": 0.1, "rank": 0, "world": 1}


ran = 0
for page in sys.argv[1:]:
    namespace = prelude()  # one namespace per page: a later example may use an earlier one's imports
    text = pathlib.Path(page).read_text()
    for number, match in enumerate(re.finditer(r"(<!-- illustrative: [^>]*-->\n)?```python\n(.*?)```", text, re.S)):
        if match.group(1):
            continue
        exec(compile(match.group(2), f"{page} example {number}", "exec"), namespace)
        ran += 1
print(f"ran {ran} examples")
'''


def test_code_examples_run():
    """Every Python example in the README and the docs runs against the installed API (on small random features, in
    a one-process gloo group), except those marked `<!-- illustrative: why -->` (they need a model or data)."""
    pages = [README] + sorted(DOCS.rglob("*.md"))
    result = _run("-c", _RUN_EXAMPLES, *map(str, pages), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert int(result.stdout.split()[-2]) >= 5, result.stdout
