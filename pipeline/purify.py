"""DVC stage `purify`: PixelDefend purification of clean and attacked images, and BPDA against it.

The first ``purify.num_images`` attacked originals (``clean``) and the same rows of every attack set
(data/attacks, data/adaptive) are purified under the 8-bit model ``purify.model`` at each
``purify.eps_defend`` and classified before and after; ``bpda_pgd_e<k>`` is L∞ PGD through purifier
and classifier (BPDA) on the first ``purify.bpda_images`` originals, crafted against each ε_defend.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ardetect.attacks import AttackParams
from ardetect.attacksets import AttackSet
from ardetect.classifier import load_classifier
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import load_split
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.models import load_model, trained_model_paths
from ardetect.purify import (
    BPDA_ATTACK,
    CLEAN,
    DecodeStats,
    PurifyParams,
    as_metrics,
    bpda_pgd,
    check_purifier,
    evaluation_sets,
    purify_figure,
    purify_problems,
    purify_sets,
)
from ardetect.report import save_figure
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection

DATA, ATTACKS, ADAPTIVE, MODELS = (Path(f"data/{d}") for d in ("dataset", "attacks", "adaptive", "models"))
CLASSIFIER = Path("data/classifier/model.pt")
OUTS = Path("data/purify"), Path("data/metrics/purify.json")
SHOWN = (CLEAN, "pgd_e8")  # sets drawn in the example figures, with the BPDA set


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
    p = params.purify
    device = resolve_device(p.device, "purify.device")
    model_path = trained_model_paths(MODELS, [p.model])[p.model]
    density = load_model(model_path).to(device).eval()
    check_purifier(density)
    clf = load_classifier(CLASSIFIER, device)
    test = load_split(DATA / "test.npz")
    files = sorted(ATTACKS.glob("*.npz")) + sorted(ADAPTIVE.glob("*.npz"))
    sets = evaluation_sets(test["images"], test["labels"], files, p.num_images)
    clean_images, labels = (a[: p.bpda_images] for a in sets[CLEAN])
    bpda_slug = AttackSet(BPDA_ATTACK, p.bpda_epsilon).slug
    inputs = [DATA, ATTACKS, ADAPTIVE, model_path.parent, CLASSIFIER]
    with stage_run("purify", params.tracking, params=dataclasses.asdict(p), inputs=inputs) as run:
        stats, start = DecodeStats(), time.perf_counter()
        results = []
        for eps in p.eps_defend:
            results += purify_sets(clf, density, sets, eps, p.batch_size, device, p.progress, stats)
            adversarial = bpda_pgd(clf, density, clean_images, labels, eps, p, device)
            bpda = {bpda_slug: (adversarial, labels)}
            results += purify_sets(clf, density, bpda, eps, p.batch_size, device, p.progress, stats)
        seconds = time.perf_counter() - start
        metrics = {p.model: as_metrics(results)}
        with staged_outputs(*OUTS) as (out, metrics_path):
            out.mkdir()
            for eps in p.eps_defend:
                shown = [r for r in results if r.eps_defend == eps and r.slug in (*SHOWN, bpda_slug)]
                path = save_figure(purify_figure(shown), out / f"examples_eps{eps}.png")
                run.log_artifact(path)
            for key, by_set in metrics[p.model].items():
                for slug, m in by_set.items():
                    run.log_headline(m, prefix=f"purify/{p.model}/eps{key}/{slug}")
            run.log_metrics({"seconds": seconds, "decode_passes": float(stats.passes)})
            write_json(metrics_path, metrics)
        for key, by_set in metrics[p.model].items():
            line = ", ".join(
                f"{slug} {m['accuracy_before']:.0%}→{m['accuracy_after']:.0%}" for slug, m in by_set.items()
            )
            print(f"ε_defend={key}: {line}")
        print(f"purified {stats.images} images with {stats.passes} decoding passes in {seconds:.1f} s")


if __name__ == "__main__":
    run_stage(main)
