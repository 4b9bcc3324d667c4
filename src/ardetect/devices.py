"""Where a stage runs: ``auto`` picks CUDA when it is visible, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(name: str, param: str = "device") -> torch.device:
    """``auto``/``cpu``/``cuda`` to a torch device; ``param`` names the params.yaml key in the error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"{param} is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu' in params.yaml"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
