"""pytest-benchmark regression files (`pytest benchmarks/ --benchmark-only`), kept apart from the unit tests.

Files here are named bench_*.py; this hook collects them (the project's pytest settings collect test_*.py).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def pytest_collect_file(file_path, parent):
    # A file named on the command line is already collected by pytest itself: don't collect it twice.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
