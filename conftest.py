"""What every test folder shares (tests/, studies/*/tests/, examples/*/tests/): the --runslow option, the skips of
slow and GPU-only tests, and a fresh but reproducible seed per test. In pytest's default import mode the folder of
this file, the repository root, goes on sys.path: the studies' and the examples' tests import `studies.…`,
`examples.…` and `tests.tolerances` from there."""
import zlib

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (`pytestmark = pytest.mark.usefixtures("one_thread")`): for small ops
    one thread is faster than two fighting over a shared 2-core CPU, and immune to OpenMP waiting for a busy core."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh but reproducible random inputs per test: the seed derives from the test's id."""
    import torch
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
