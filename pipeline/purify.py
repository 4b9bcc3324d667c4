"""DVC stage `purify`: PixelDefend purification of the attacked originals and each attack set (but those
aimed at the conditional detector) per ε_defend, the classifier before and after, BPDA PGD through the
purifier (ardetect.purify); under torchrun ranks share the batches, rank 0 alone logs, writes, prints."""

from __future__ import annotations

import dataclasses

from ardetect import layout
from ardetect.attacks import AttackParams
from ardetect.classifier import load_classifier
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import load_split
from ardetect.devices import resolve_device
from ardetect.distributed import on_lead, process_group
from ardetect.io import staged_outputs, write_json
from ardetect.models import load_model, trained_model_paths
from ardetect.purify import PurifyParams, check_purifier, evaluation_sets, purify_problems, run_purify
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection


@config_dataclass
class StageParams:
    purify: PurifyParams = dataclasses.field(default_factory=PurifyParams)
    attack: AttackParams = dataclasses.field(default_factory=AttackParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)

    def problems(self) -> list[str]:
        return purify_problems(self.purify, self.train, self.models, self.attack.num_images)


def main() -> None:
    params = load_sections(StageParams)
    p, device = params.purify, resolve_device(params.purify.device, "purify.device")
    model_path = trained_model_paths(layout.MODELS, [p.model])[p.model]
    check_purifier(density := load_model(model_path).to(device).eval())
    clf = load_classifier(layout.CLASSIFIER, device)
    test = load_split(layout.split_path("test"))
    sets = evaluation_sets(test["images"], test["labels"], layout.attack_files(False), p.num_images)
    inputs = [layout.DATASET, layout.ATTACKS, layout.ADAPTIVE, model_path.parent, layout.CLASSIFIER]
    with on_lead(stage_run("purify", params.tracking, params=dataclasses.asdict(p), inputs=inputs)) as run:
        result = run_purify(clf, density, sets, p, device)
        if run is None:  # another rank than 0: it did its share, rank 0 has every result
            return
        with staged_outputs(layout.PURIFY, layout.PURIFY_METRICS) as (out, metrics_path):
            out.mkdir()
            for path in result.save_figures(out):
                run.log_artifact(path)
            run.log_headline(result.headline(), prefix=f"purify/{p.model}")
            run.log_metrics({"seconds": result.seconds, "decode_passes": float(result.stats.passes)})
            write_json(metrics_path, {p.model: result.metrics()})
        print(result.summary())


if __name__ == "__main__":
    with process_group():  # one process, or a rank of torchrun's (before any CUDA work)
        run_stage(main)
