"""DVC stage `attack`: Foolbox attacks on the first N correctly classified test images.

One .npz per attack and ε under data/attacks/ (adversarial uint8 images, source test index, success
before/after 8-bit rounding, predicted label, perturbation norms), a summary table, and a figure. Under
torchrun each rank attacks its share of the batches; rank 0 alone logs to MLflow, writes and prints.
"""

from __future__ import annotations

import dataclasses

from ardetect import attacks, layout
from ardetect.classifier import load_classifier
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import load_split
from ardetect.devices import resolve_device
from ardetect.distributed import on_lead, process_group
from ardetect.io import staged_outputs, write_json
from ardetect.tracking import TrackingParams, run_stage, stage_run


@config_dataclass
class StageParams:
    attack: attacks.AttackParams = dataclasses.field(default_factory=attacks.AttackParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def main() -> None:
    params = load_sections(StageParams)
    p = params.attack
    device = resolve_device(p.device, "attack.device")
    test = load_split(layout.split_path("test"))
    model = load_classifier(layout.CLASSIFIER, device)
    inputs = [layout.DATASET, layout.CLASSIFIER]
    with on_lead(stage_run("attack", params.tracking, params=dataclasses.asdict(p), inputs=inputs)) as run:
        index = attacks.attacked_originals(model, test, p.num_images)
        images, labels = test["images"][index], test["labels"][index]
        results = attacks.run_attacks(model, images, labels, p, device=device, progress=p.progress)
        if run is None:  # another rank than 0: it attacked its share, rank 0 has every result
            return
        summary = attacks.attack_summary(results)
        with staged_outputs(layout.ATTACKS, layout.ATTACK_METRICS) as (out, metrics_path):
            out.mkdir()
            summary_csv, examples = attacks.save_attacks(out, results, index, images, labels)
            for _, row in summary.iterrows():
                rates = {k: row[k] for k in ("success_after_rounding", "success_before_rounding")}
                run.log_headline(rates, prefix=f"attack/{row['set']}")
            run.log_artifact(examples)
            run.log_artifact(summary_csv)
            write_json(metrics_path, attacks.attack_metrics(summary))
        print(summary.to_string(index=False))


if __name__ == "__main__":
    with process_group():  # one process, or a rank of torchrun's (before any CUDA work)
        run_stage(main)
