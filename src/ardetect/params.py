"""``params.yaml``, typed and validated before any work starts.

Every section is a frozen dataclass; pydantic checks types and ranges. A bad file fails with each
offending key's path, its value and what is allowed, e.g.::

    params.yaml is invalid:
      - train.defaults.lr = -0.1: Input should be greater than 0
      - models.made.hparams.hiden: unknown key (did you mean 'hidden'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    NonNegativeInt,
    PositiveInt,
    TypeAdapter,
    ValidationError,
)

from ardetect.adaptive import AdaptiveConfig
from ardetect.attacks import AttackConfig
from ardetect.classifier import ClassifierConfig
from ardetect.configs import config_dataclass
from ardetect.scoring import ScoreConfig
from ardetect.tracking import TrackingParams  # tracking and training own their sections; composed here
from ardetect.training import Device, TrainParams

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class ParamsError(ValueError):
    """params.yaml has unknown keys, wrong types or out-of-range values (all listed in the message)."""


@config_dataclass
class DataParams:
    dataset: Literal["mnist", "fashion-mnist", "digits"] = "fashion-mnist"
    root: str | None = None
    val_fraction: Fraction = 1 / 12
    test_fraction: Fraction = 0.2
    seed: NonNegativeInt = 0
    max_train: PositiveInt | None = None
    max_val: PositiveInt | None = None
    max_test: PositiveInt | None = None


@config_dataclass
class BinarizeParams:
    mode: Literal["static", "dynamic"] = "dynamic"
    threshold: Fraction = 0.5
    resample_train: bool = True
    seed: NonNegativeInt = 0


@config_dataclass
class ModelEntry:
    arch: str
    levels: Literal[2, 256] = 2
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)


@config_dataclass
class TrainSection:
    models: list[str] = dataclasses.field(default_factory=lambda: ["fvsbn", "nade", "made"])
    defaults: TrainParams = dataclasses.field(default_factory=TrainParams)


@config_dataclass
class ClassifierParams(ClassifierConfig):
    device: Device = "auto"
    progress: bool = True


@config_dataclass
class AttackParams(AttackConfig):
    num_images: PositiveInt = 200  # the first N test images the classifier gets right
    device: Device = "auto"
    progress: bool = True


@config_dataclass
class ScoreParams(ScoreConfig):
    num_test: PositiveInt = 500  # first N clean test images (plus every attacked original)
    num_calib: PositiveInt = 1000  # clean test images, disjoint from the evaluated: fix the threshold
    num_train_ref: PositiveInt = 500  # training images: the reference distribution for p-values
    device: Device = "auto"
    progress: bool = True


@config_dataclass
class AdaptiveParams(AdaptiveConfig):
    model: str = "pixelcnn_8bit"  # the 8-bit density model whose detector is attacked (one of train.models)
    num_images: PositiveInt = 100  # the first N originals of the oblivious attacks (paired with them)
    device: Device = "auto"
    progress: bool = True


@config_dataclass
class DetectParams:
    fpr: Fraction = 0.05  # target false-positive rate, calibrated on clean test images (score.num_calib)
    alpha: Fraction = 0.05  # p-value level (PixelDefend)
    n_boot: PositiveInt = 1000  # bootstrap resamples for the AUROC interval
    level: Fraction = 0.95
    seed: NonNegativeInt = 0


@config_dataclass
class Params:
    data: DataParams = dataclasses.field(default_factory=DataParams)
    binarize: BinarizeParams = dataclasses.field(default_factory=BinarizeParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    classifier: ClassifierParams = dataclasses.field(default_factory=ClassifierParams)
    attack: AttackParams = dataclasses.field(default_factory=AttackParams)
    score: ScoreParams = dataclasses.field(default_factory=ScoreParams)
    adaptive: AdaptiveParams = dataclasses.field(default_factory=AdaptiveParams)
    detect: DetectParams = dataclasses.field(default_factory=DetectParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)

    def train_params(self, model: str) -> TrainParams:
        """The model's training params: ``train.defaults`` with ``models.<name>.train`` on top."""
        entry = self.models[model]
        return dataclasses.replace(self.train.defaults, **entry.train)


def _fields_at(schema: Any, loc: tuple[Any, ...]) -> list[str]:
    """Field names of the dataclass found by following ``loc`` from ``schema`` (for 'did you mean')."""
    cls = schema
    for part in loc:
        if not dataclasses.is_dataclass(cls):
            return []
        cls = typing.get_type_hints(cls).get(str(part))
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _format(loc: tuple[Any, ...], value: Any, msg: str, valid: list[str]) -> str:
    path = ".".join(str(p) for p in loc)
    if msg.startswith("Unexpected keyword argument") or msg.startswith("Extra inputs"):
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        extra = (
            f" (did you mean {hint[0]!r}?)" if hint else (f" (allowed: {', '.join(valid)})" if valid else "")
        )
        return f"{path}: unknown key{extra}"
    return f"{path} = {value!r}: {msg}"


def _errors(
    err: ValidationError, prefix: tuple[Any, ...] = (), valid_fields: list[str] | None = None
) -> list[str]:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after",))
        valid = valid_fields if valid_fields is not None else _fields_at(Params, loc[:-1])
        out.append(_format(prefix + loc, e.get("input"), e["msg"], valid))
    return out


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed YAML mapping; also checks model names and each model's hyperparameters."""
    from ardetect.models import REGISTRY, model_class

    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of sections, got {type(raw).__name__}")
    try:
        params = TypeAdapter(Params).validate_python(raw)
    except ValidationError as err:
        raise ParamsError(f"{source} is invalid:\n" + "\n".join(f"  - {m}" for m in _errors(err))) from None
    problems: list[str] = []
    for i, name in enumerate(params.train.models):
        if name not in params.models:
            problems.append(
                f"train.models[{i}] = {name!r}: no such entry under models "
                f"(defined: {', '.join(params.models) or 'none'})"
            )
    target = params.adaptive.model
    if target not in params.train.models:
        problems.append(
            f"adaptive.model = {target!r}: not a trained model "
            f"(train.models: {', '.join(params.train.models)})"
        )
    elif params.models[target].levels != 256:
        problems.append(
            f"adaptive.model = {target!r}: the adaptive attack needs an 8-bit model (levels: 256)"
        )
    if params.adaptive.num_images > params.attack.num_images:
        problems.append(
            f"adaptive.num_images = {params.adaptive.num_images}: at most attack.num_images = "
            f"{params.attack.num_images} (the adaptive sets reuse the oblivious attacks' originals)"
        )
    for name, entry in params.models.items():
        if entry.arch not in REGISTRY:
            problems.append(
                f"models.{name}.arch = {entry.arch!r}: unknown architecture "
                f"(allowed: {', '.join(sorted(REGISTRY))})"
            )
            continue
        cls = model_class(entry.arch)
        if entry.levels not in cls.supported_levels:
            problems.append(
                f"models.{name}.levels = {entry.levels}: {entry.arch} supports {list(cls.supported_levels)}"
            )
        config_cls = cls.Config  # type: ignore[attr-defined]
        try:
            TypeAdapter(config_cls).validate_python(entry.hparams)
        except ValidationError as err:
            names = [f.name for f in dataclasses.fields(config_cls)]
            problems += _errors(err, ("models", name, "hparams"), names)
        try:
            TypeAdapter(TrainParams).validate_python(
                {**dataclasses.asdict(params.train.defaults), **entry.train}
            )
        except ValidationError as err:
            problems += _errors(
                err, ("models", name, "train"), [f.name for f in dataclasses.fields(TrainParams)]
            )
    if problems:
        raise ParamsError(f"{source} is invalid:\n" + "\n".join(f"  - {m}" for m in problems))
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the repository root (where dvc.yaml is)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    return parse_params(raw or {}, str(path))
