"""DVC stage `adaptive`: Foolbox attacks that know the detector (classifier + BPD threshold together).

The threshold τ is the detector's own: ``detect.fpr`` on the clean calibration images of the score
stage, under the 8-bit model ``adaptive.model``. A strength sweep (detected-logit scale, relaxed vs
straight-through gradients, per-step BPD) picks the strongest scale; the sets ``adaptive_pgd_e<k>`` and
``adaptive_cw`` then attack the first ``adaptive.num_images`` originals of the oblivious attacks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ardetect.adaptive import AdaptiveParams, adaptive_problems, run_adaptive, strength_sweep, sweep_figure
from ardetect.attacks import AttackParams, adversarial_figure, select_correct
from ardetect.attacksets import AttackSet, save_attack_set
from ardetect.classifier import load_classifier, predict
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import load_split
from ardetect.detection import DetectParams, threshold_at_fpr
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.models import load_model, trained_model_paths
from ardetect.report import save_figure
from ardetect.scoring import ScoreParams, clean_test_pools, score_bpd
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection

DATA, MODELS, CLASSIFIER = Path("data/dataset"), Path("data/models"), Path("data/classifier/model.pt")
OUTS = Path("data/adaptive"), Path("data/metrics/adaptive.json")


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
    density = load_model(trained_model_paths(MODELS, [p.model])[p.model]).to(device)
    clf = load_classifier(CLASSIFIER, device)
    test = load_split(DATA / "test.npz")
    images, labels = test["images"], test["labels"]
    attacked = select_correct(clf, images, labels, params.attack.num_images, param="attack.num_images")
    _, calib = clean_test_pools(
        predict(clf, images) == labels,
        attacked,
        params.score.num_test,
        params.score.num_calib,
        params.score.seed,
    )
    calib_bpd, _ = score_bpd(density, images[calib], None, params.score, device, progress=False)
    tau = threshold_at_fpr(calib_bpd, params.detect.fpr)
    index = attacked[: p.num_images]
    x, y = images[index], labels[index]
    with stage_run("adaptive", params.tracking, params=dataclasses.asdict(p), inputs=[DATA, MODELS]) as run:
        sweep_eps = p.epsilons[0]
        n_sweep = p.sweep_images
        sweep = strength_sweep(
            clf, density, x[:n_sweep], y[:n_sweep], sweep_eps, tau, p, device=device, progress=p.progress
        )
        relaxed = [r for r in sweep if r.relax]
        scale = max(relaxed, key=lambda r: r.result.joint.mean()).scale  # the strongest setting
        sets = [AttackSet("adaptive_pgd", e) for e in p.epsilons] + [AttackSet("adaptive_cw")]
        results = [
            run_adaptive(clf, density, x, y, s, tau, scale, p, device=device, progress=p.progress)
            for s in sets
        ]
        clean_bpd, _ = score_bpd(density, x, None, params.score, device, progress=False)
        sets_metrics = {r.attack_set.slug: r.summary() for r in results}
        metrics = {
            "model": p.model,
            "threshold": tau,
            "scale": scale,
            "clean_bpd_mean": float(clean_bpd.mean()),
            "sets": sets_metrics,
            "sweep": {
                f"{r.label} ({r.result.attack_set.slug}, {p.sweep_steps} steps)": {
                    **r.result.summary(),
                    "final_relaxed_bpd": float(r.bpd_per_step[-1]),
                }
                for r in sweep
            },
        }
        with staged_outputs(*OUTS) as (out, metrics_path):
            out.mkdir()
            for r in results:
                save_attack_set(
                    out,
                    r,
                    index,
                    y,
                    target=r.target,
                    bpd=r.bpd,
                    evaded=r.evaded,
                    joint=r.joint,
                    threshold=tau,
                    scale=scale,
                )
            save_figure(sweep_figure(sweep, float(clean_bpd[:n_sweep].mean()), tau), out / "sweep.png")
            save_figure(adversarial_figure(x, y, results), out / "examples.png")
            for slug, m in sets_metrics.items():
                run.log_headline(m, prefix=f"adaptive/{slug}")
            run.log_artifact(out / "sweep.png")
            run.log_artifact(out / "examples.png")
            write_json(metrics_path, metrics)
        for slug, m in sets_metrics.items():
            print(
                f"{slug}: classifier fooled {m['classifier_success']:.0%}, of those under τ "
                f"{m['evasion_rate']:.0%}, both {m['joint_success']:.0%} (scale {scale:g}, τ = {tau:.3f} bpd)"
            )


if __name__ == "__main__":
    run_stage(main)
