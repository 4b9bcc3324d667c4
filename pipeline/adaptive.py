"""DVC stage `adaptive`: Foolbox attacks that know the detector (classifier + the BPD threshold of
``adaptive.model`` at ``detect.fpr``, and the conditional detector of ``adaptive.conditional_model``):
the sets ``adaptive_pgd_e<k>``, ``adaptive_cw``, ``adaptive_cond_*`` (``adaptive.adaptive_attacks``)."""

from __future__ import annotations

import dataclasses

from ardetect import layout
from ardetect.adaptive import AdaptiveParams, adaptive_attacks, adaptive_problems, load_densities
from ardetect.attacks import AttackParams
from ardetect.classifier import load_classifier
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import load_split
from ardetect.detection import DetectParams
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.scoring import ScoreParams
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection


@config_dataclass
class StageParams:
    adaptive: AdaptiveParams = dataclasses.field(default_factory=AdaptiveParams)
    attack: AttackParams = dataclasses.field(default_factory=AttackParams)
    score: ScoreParams = dataclasses.field(default_factory=ScoreParams)
    detect: DetectParams = dataclasses.field(default_factory=DetectParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)

    def problems(self) -> list[str]:
        return adaptive_problems(self.adaptive, self.train, self.models, self.attack)


def main() -> None:
    params = load_sections(StageParams)
    p = params.adaptive
    device = resolve_device(p.device, "adaptive.device")
    model, conditional = load_densities(p, layout.MODELS, device)  # fails first, naming what is missing
    clf = load_classifier(layout.CLASSIFIER, device)
    test = load_split(layout.split_path("test"))
    inputs = [layout.DATASET, layout.MODELS]
    with stage_run("adaptive", params.tracking, params=dataclasses.asdict(p), inputs=inputs) as run:
        fpr = params.detect.fpr
        result = adaptive_attacks(clf, model, test, p, params.attack, params.score, fpr, device, conditional)
        with staged_outputs(layout.ADAPTIVE, layout.ADAPTIVE_METRICS) as (out, metrics_path):
            out.mkdir()
            for f in result.save(out):
                run.log_artifact(f)
            metrics = result.metrics(p.sweep_steps)
            for r in result.all_results:
                run.log_headline(r.summary(), prefix=f"adaptive/{r.attack_set.slug}")
            write_json(metrics_path, metrics)
        print("\n".join(result.lines()))


if __name__ == "__main__":
    run_stage(main)
