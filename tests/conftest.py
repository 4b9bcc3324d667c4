from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

torch.use_deterministic_algorithms(True, warn_only=True)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

# Under pytest-xdist (`-n auto`) each worker gets its share of the cores, so N workers do not each start
# an OpenMP team as large as the machine (N-fold oversubscription). Subprocesses inherit the share.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    share = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(share)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))


@pytest.fixture(autouse=True, scope="module")
def _seed_module() -> None:
    """Module fixtures (a trained classifier, attacked images) start from the same RNG state whichever
    tests ran before them in this process: under xdist that depends on how tests were distributed."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: extra OpenMP threads only add sync cost (up to 100x on a busy machine). A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
