"""Model registry: ``build_model(name, image_shape, levels=..., **hyperparams)`` and checkpoints."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ardetect.configs import as_plain
from ardetect.models.base import ARModel, MaskedLinear
from ardetect.models.fvsbn import FVSBN
from ardetect.models.gated_pixelcnn import GatedPixelCNN
from ardetect.models.made import MADE
from ardetect.models.nade import NADE
from ardetect.models.pixelcnn import PixelCNN
from ardetect.models.pixelcnnpp import PixelCNNPP
from ardetect.models.rnn import RasterLSTM
from ardetect.models.transformer import PixelTransformer

REGISTRY: dict[str, type[ARModel]] = {
    cls.name: cls
    for cls in (FVSBN, NADE, MADE, RasterLSTM, PixelCNN, GatedPixelCNN, PixelCNNPP, PixelTransformer)
}


def model_class(name: str) -> type[ARModel]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(REGISTRY))}") from None


def build_config(name: str, **hyperparams: Any) -> Any:
    """The model's frozen config; unknown or ill-typed hyperparameters raise with the field's name."""
    return model_class(name).Config(**hyperparams)  # type: ignore[attr-defined]


def build_model(name: str, image_shape: Sequence[int], levels: int = 2, **hyperparams: Any) -> ARModel:
    """Instantiate a registered model from its name, the (C, H, W) shape and its hyperparameters."""
    cls = model_class(name)
    return cls(image_shape, build_config(name, **hyperparams), levels)  # type: ignore[call-arg]


def checkpoint_dict(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """Everything needed to rebuild a model (a density model or the classifier): its ``name``, image
    shape, levels (density models), resolved config and CPU weights; ``torch.load(weights_only=True)``
    reads it back."""
    shape: Sequence[int] = model.image_shape  # type: ignore[assignment]
    header: dict[str, Any] = {"arch": model.name, "image_shape": list(shape)}
    if isinstance(model, ARModel):
        header["levels"] = model.levels
    return {
        **header,
        "config": as_plain(dataclasses.asdict(model.config)),  # type: ignore[call-overload]
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: ARModel, path: str | os.PathLike[str], **extra: Any) -> None:
    atomic_torch_save(checkpoint_dict(model, **extra), path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; run the training stage first (`dvc repro`)"
        )
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> ARModel:
    model = build_model(ckpt["arch"], ckpt["image_shape"], levels=ckpt["levels"], **ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def trained_model_paths(folder: str | os.PathLike[str], names: Sequence[str]) -> dict[str, Path]:
    """``{name: folder/name/model.pt}`` for the published models; FileNotFoundError naming every missing
    model and the command that trains it, before any work uses them."""
    paths = {name: Path(folder) / name / "model.pt" for name in names}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        files = ", ".join(str(paths[m]) for m in missing)
        raise FileNotFoundError(
            f"no trained model for {', '.join(missing)} (missing {files}); "
            f"train {'it' if len(missing) == 1 else 'them'} first: `dvc repro` "
            f"(or `dvc repro {' '.join(f'train@{m}' for m in missing)}`)"
        )
    return paths


def load_model(path: str | os.PathLike[str]) -> ARModel:
    """Rebuild a model from a checkpoint written by ``save_model`` (safe ``weights_only`` load)."""
    return model_from_checkpoint(load_checkpoint(path))


__all__ = [
    "REGISTRY",
    "ARModel",
    "MaskedLinear",
    "atomic_torch_save",
    "build_config",
    "build_model",
    "checkpoint_dict",
    "load_checkpoint",
    "load_model",
    "model_from_checkpoint",
    "save_model",
    "trained_model_paths",
]
