from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

torch.use_deterministic_algorithms(True, warn_only=True)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


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
