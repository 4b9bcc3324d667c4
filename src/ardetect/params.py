"""The whole ``params.yaml``, typed and validated: every section and the checks across sections.

Each section's dataclass lives in the module that uses it (``data.DataParams``, ``training.TrainParams``,
``attacks.AttackParams``, …); this module only composes them. Stage scripts validate just the sections
they read (``ardetect.configs.load_sections``), so their imports, and hence their DVC deps, stay
narrow; the first stage (``download``), the CLI and the tests validate the whole file here, so a typo
anywhere fails before any training. A bad file fails with each offending key's path, its value and what
is allowed, e.g.::

    params.yaml is invalid:
      - train.defaults.lr = -0.1: Input should be greater than 0
      - models.made.hparams.hiden: unknown key (did you mean 'hidden'?)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ardetect.adaptive import AdaptiveParams, adaptive_problems
from ardetect.attacks import AttackParams
from ardetect.classifier import ClassifierParams
from ardetect.compression import CompressParams, compress_problems
from ardetect.configs import ParamsError, config_dataclass, load_sections, parse_sections
from ardetect.data import BinarizeParams, DataParams
from ardetect.detection import DetectParams
from ardetect.ood import OodParams, ood_problems
from ardetect.purify import PurifyParams, purify_problems
from ardetect.scoring import ScoreParams
from ardetect.tracking import TrackingParams
from ardetect.training import ModelEntry, TrainParams, TrainSection, model_problems, model_train_params

__all__ = [
    "AdaptiveParams",
    "AttackParams",
    "BinarizeParams",
    "ClassifierParams",
    "CompressParams",
    "DataParams",
    "DetectParams",
    "ModelEntry",
    "OodParams",
    "Params",
    "ParamsError",
    "PurifyParams",
    "ScoreParams",
    "TrackingParams",
    "TrainParams",
    "TrainSection",
    "adaptive_problems",
    "load_params",
    "parse_params",
]


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
    ood: OodParams = dataclasses.field(default_factory=OodParams)
    purify: PurifyParams = dataclasses.field(default_factory=PurifyParams)
    compress: CompressParams = dataclasses.field(default_factory=CompressParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)

    def problems(self) -> list[str]:
        return (
            model_problems(self.train, self.models)
            + adaptive_problems(self.adaptive, self.train, self.models, self.attack)
            + ood_problems(self.ood, self.train, self.models, self.data.dataset)
            + purify_problems(self.purify, self.train, self.models, self.attack.num_images)
            + compress_problems(self.compress, self.train.models, self.models)
        )

    def train_params(self, model: str) -> TrainParams:
        """The model's training params: ``train.defaults`` with ``models.<name>.train`` on top."""
        return model_train_params(self.train.defaults, self.models[model])


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed YAML mapping: every section, unknown sections, model names and hyperparameters."""
    return parse_sections(Params, raw, source, partial=False)


def load_params(path: str | Path = "params.yaml") -> Params:
    return load_sections(Params, path)
