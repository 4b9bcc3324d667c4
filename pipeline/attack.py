"""DVC stage `attack`: Foolbox attacks on the first N correctly classified test images.

One .npz per attack and ε under data/attacks/ (adversarial uint8 images, source test index, success
before/after 8-bit rounding, predicted label, perturbation norms), a summary table, and a figure.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ardetect.attacks import AttackParams, adversarial_figure, attack_summary, run_attacks, select_correct
from ardetect.attacksets import save_attack_set
from ardetect.classifier import load_classifier
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import load_split
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.report import save_figure
from ardetect.tracking import TrackingParams, run_stage, stage_run

DATA = Path("data/dataset")
CLASSIFIER = Path("data/classifier/model.pt")
OUTS = Path("data/attacks"), Path("data/metrics/attack.json")


@config_dataclass
class StageParams:
    attack: AttackParams = dataclasses.field(default_factory=AttackParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def main() -> None:
    params = load_sections(StageParams)
    p = params.attack
    device = resolve_device(p.device, "attack.device")
    test = load_split(DATA / "test.npz")
    if p.num_images > len(test["labels"]):
        raise ValueError(
            f"attack.num_images = {p.num_images} exceeds the {len(test['labels'])} test images; "
            "lower it in params.yaml"
        )
    model = load_classifier(CLASSIFIER, device)
    with stage_run("attack", params.tracking, params=dataclasses.asdict(p), inputs=[DATA, CLASSIFIER]) as run:
        index = select_correct(model, test["images"], test["labels"], p.num_images, param="attack.num_images")
        images, labels = test["images"][index], test["labels"][index]
        results = run_attacks(model, images, labels, p, device=device, progress=p.progress)
        summary = attack_summary(results)
        metrics = {
            row["set"]: {
                k: float(row[k])
                for k in (
                    "success_before_rounding",
                    "success_after_rounding",
                    "failed",
                    "mean_linf",
                    "mean_l2",
                    "seconds_per_image",
                )
            }
            for _, row in summary.iterrows()
        }
        with staged_outputs(*OUTS) as (out, metrics_path):
            out.mkdir()
            for r in results:
                save_attack_set(out, r, index, labels, success_before_rounding=r.success_before_rounding)
            # wall time stays in attack.json (not cached): in data/attacks it would change the folder's
            # hash on every run and rerun score and detect for nothing
            summary.drop(columns="seconds_per_image").to_csv(out / "summary.csv", index=False)
            save_figure(adversarial_figure(images, labels, results), out / "examples.png")
            for _, row in summary.iterrows():
                run.log_headline(
                    {
                        "success_after_rounding": row["success_after_rounding"],
                        "success_before_rounding": row["success_before_rounding"],
                    },
                    prefix=f"attack/{row['set']}",
                )
            run.log_artifact(out / "examples.png")
            run.log_artifact(out / "summary.csv")
            write_json(metrics_path, metrics)
        print(summary.to_string(index=False))


if __name__ == "__main__":
    run_stage(main)
