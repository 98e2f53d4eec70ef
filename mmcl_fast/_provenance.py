"""Where a result came from: the git commit of the checkout mmcl_fast is imported from (benchmarks, studies)."""
from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(short: bool = False) -> str | None:
    """HEAD of the checkout mmcl_fast is imported from, with '-dirty' when tracked files have local changes; None
    outside a git checkout (an installed wheel) or without git. short: the abbreviated hash."""
    source_dir = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(source_dir), "rev-parse"] + (["--short"] if short else []) + ["HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", str(source_dir), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
