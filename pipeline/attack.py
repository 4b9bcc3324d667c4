"""DVC stage `attack`: Foolbox attacks on the first N correctly classified test images.

One .npz per attack and ε under data/attacks/ (adversarial uint8 images, source test index, success
before/after 8-bit rounding, predicted label, perturbation norms), a summary table, and a figure.
"""

from __future__ import annotations

import dataclasses

from ardetect import layout
from ardetect.attacks import (
    AttackParams,
    attack_metrics,
    attack_summary,
    attacked_originals,
    run_attacks,
    save_attacks,
)
from ardetect.classifier import load_classifier
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import load_split
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.tracking import TrackingParams, run_stage, stage_run


@config_dataclass
class StageParams:
    attack: AttackParams = dataclasses.field(default_factory=AttackParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def main() -> None:
    params = load_sections(StageParams)
    p = params.attack
    device = resolve_device(p.device, "attack.device")
    test = load_split(layout.split_path("test"))
    model = load_classifier(layout.CLASSIFIER, device)
    inputs = [layout.DATASET, layout.CLASSIFIER]
    with stage_run("attack", params.tracking, params=dataclasses.asdict(p), inputs=inputs) as run:
        index = attacked_originals(model, test, p.num_images)
        images, labels = test["images"][index], test["labels"][index]
        results = run_attacks(model, images, labels, p, device=device, progress=p.progress)
        summary = attack_summary(results)
        with staged_outputs(layout.ATTACKS, layout.ATTACK_METRICS) as (out, metrics_path):
            out.mkdir()
            summary_csv, examples = save_attacks(out, results, index, images, labels)
            for _, row in summary.iterrows():
                rates = {k: row[k] for k in ("success_after_rounding", "success_before_rounding")}
                run.log_headline(rates, prefix=f"attack/{row['set']}")
            run.log_artifact(examples)
            run.log_artifact(summary_csv)
            write_json(metrics_path, attack_metrics(summary))
        print(summary.to_string(index=False))


if __name__ == "__main__":
    run_stage(main)
