from __future__ import annotations

import os

import pytest
import torch

torch.use_deterministic_algorithms(True, warn_only=True)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
