"""The ``ardetect`` command: score images with a trained model, show the latest detection report,
compress/decompress gray images with an 8-bit model, and render the pipeline's plots offline.

``ardetect score IMAGE...`` gives each image's bits per dimension (BPD) under a trained density model,
its PixelDefend p-value against the model's ``train_ref`` rows of the score table and a verdict at the
threshold that gives ``--fpr`` false positives on the model's clean ``calib`` rows (test-pool images).
``ardetect report`` prints where the report and its figures are and the AUROC of every model × attack set.

All read a project built by ``dvc repro`` (``--root``, default the current folder). Exit codes: 0 on
success, 1 when pipeline outputs are missing (run ``dvc repro``), 2 on usage or input-file errors.
Heavy imports (torch, the models) happen inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ardetect import layout
from ardetect.images import ImageError, check_size, load_image
from ardetect.layout import CLASSIFIER_METRICS, DETECTION_METRICS, SCORES
from ardetect.project import (
    CliError,
    InputError,
    NotBuiltError,
    coding_model,
    fpr_arg,
    load_project_params,
    reference_scores,
    report_summary,
    resolve_model,
)

if TYPE_CHECKING:
    from ardetect.models.base import ARModel
    from ardetect.params import Params

__all__ = ["CLASSIFIER_METRICS", "DETECTION_METRICS", "SCORES", "NotBuiltError", "check_size", "main"]


def score_images(model: ARModel, images: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """BPD and standard error of (N, H, W) uint8 images, as the score stage scores them, each on its own."""
    from ardetect.devices import resolve_device
    from ardetect.scoring import score_alone

    device = resolve_device(params.score.device, "score.device")
    return score_alone(model, images, params.binarize.mode, params.binarize.threshold, params.score, device)


def cmd_score(args: argparse.Namespace) -> int:
    """BPD of each image under a trained model, its PixelDefend p-value against the model's train_ref
    scores, and a verdict at the threshold that gives --fpr false positives on the model's clean
    calibration scores (flagged when BPD > threshold)."""
    from ardetect.detection import verdict_table, verdicts
    from ardetect.models import load_model

    root = Path(args.root).resolve()
    images = [load_image(f) for f in args.images]  # file errors before any model work
    params = load_project_params(root)
    name = resolve_model(params, root, args.model)
    model = load_model(root / layout.model_path(name))
    for f, gray in zip(args.images, images):
        check_size(f, gray, model.image_shape)
    train_ref, calib = reference_scores(root, name)
    bpd, se = score_images(model, np.stack(images), params)
    rows = verdicts(args.images, bpd, se, name, train_ref, calib, args.fpr)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    kind = f"{model.levels} levels" + (f", {params.binarize.mode} binarization" if model.levels == 2 else "")
    print(
        f"model {name} ({kind}): threshold {rows[0].threshold:.4f} bits/dim at {100 * args.fpr:g}% FPR on "
        f"{len(calib)} clean calibration images, p-values against {len(train_ref)} train_ref images\n"
    )
    print(verdict_table(rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the paths of the latest report and figures, and the AUROC of every model × attack set (from
    data/metrics/detection.json) with the classifier's accuracy."""
    s = report_summary(Path(args.root).resolve())
    if args.json:
        print(
            json.dumps(
                {**s, "auroc": {m: row.dropna().to_dict() for m, row in s["auroc"].iterrows()}}, indent=2
            )
        )
        return 0
    lines = [f"report:  {s['report']}", "figures:", *(f"  {p}" for p in s["figures"])]
    if s["classifier"]:
        lines.append(
            "classifier: "
            + ", ".join(f"{k} {v:.4f}" for k, v in s["classifier"].items() if k.endswith("accuracy"))
        )
    lines += [
        "",
        "AUROC (rows: models, columns: attack sets)",
        s["auroc"].to_string(float_format="{:.3f}".format),
    ]
    if s["small_sets"]:
        few = ", ".join(f"{k} (n={v})" for k, v in s["small_sets"].items())
        lines.append(f"few successful adversarial images, AUROC unreliable: {few}")
    print("\n".join(lines))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """Entropy-code (ANS) a gray image with an 8-bit model's conditionals: about the model's BPD bits per
    pixel, plus a header naming the model. Runs on the CPU; decompress with the same checkpoint."""
    from ardetect.compression import compress_image
    from ardetect.models import load_model

    root = Path(args.root).resolve()
    gray = load_image(args.image)  # file errors before any model work
    params = load_project_params(root)
    name = coding_model(params, root, args.model)
    model = load_model(root / layout.model_path(name))
    check_size(args.image, gray, model.image_shape)
    data, bpd = compress_image(model, name, gray)
    try:
        Path(args.out).write_bytes(data)
    except OSError as err:
        raise InputError(f"{args.out}: cannot write ({err.strerror})") from None
    print(
        f"{args.image} -> {args.out}: {len(data)} bytes with model {name} "
        f"({8 * len(data) / gray.size:.3f} bits/dim with the header; the model's BPD {bpd:.3f})"
    )
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    """Decode a file written by `ardetect compress` (one forward pass per pixel) and write the image as an
    8-bit grayscale PNG, identical in pixels to the original."""
    from PIL import Image

    from ardetect.compression import CompressedFileError, decompress_images, single_image_header
    from ardetect.models import load_model

    root, path = Path(args.root).resolve(), Path(args.input)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        header = single_image_header(data)  # a corrupt file fails before any model work
        name = coding_model(load_project_params(root), root, args.model or header.name)
        images = decompress_images(load_model(root / layout.model_path(name)), data)
    except CompressedFileError as err:
        raise InputError(f"{path}: {err}") from None
    try:
        Image.fromarray(images[0, 0], mode="L").save(args.out, format="PNG")
    except (OSError, ValueError) as err:
        raise InputError(f"{args.out}: cannot write a PNG ({err})") from None
    print(f"{path} -> {args.out}: {images.shape[-2]}x{images.shape[-1]} gray image (model {name})")
    return 0


def cmd_plots(args: argparse.Namespace) -> int:
    """Render `dvc plots` offline (vl-convert): OUT/index.html with Vega inline, an SVG and PNG per plot."""
    from ardetect import plots

    out, dvc = Path(args.out).resolve(), str(Path(sys.executable).with_name("dvc"))
    try:
        os.chdir(args.root)
        files = plots.render_static(plots.plot_specs(args.targets, dvc), out)
        page = plots.render_html(out, args.targets, dvc)
    except plots.PlotsError as err:
        raise NotBuiltError(str(err)) from None
    print(f"{page} and {len(files)} SVG/PNG files in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ardetect",
        description="Detect adversarial images by their bits per dimension under trained density models.",
        epilog="Reads a project built by `dvc repro`. Exit codes: 0 ok, 1 outputs missing, 2 bad input.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd: dict[str, argparse.ArgumentParser] = {}
    for func, summary in COMMANDS.items():  # each command's docstring is its --help description
        name = func.__name__.removeprefix("cmd_")
        cmd[name] = sub.add_parser(name, help=summary, description=func.__doc__)
        cmd[name].add_argument(
            "--root", default=".", help="project root with params.yaml and data/ (default: .)"
        )
        cmd[name].set_defaults(func=func)
    cmd["score"].add_argument("images", nargs="+", metavar="IMAGE", help=IMAGE_HELP)
    cmd["score"].add_argument("--model", help=SCORE_MODEL_HELP)
    cmd["score"].add_argument("--fpr", type=fpr_arg, default=0.05, help=FPR_HELP)
    cmd["score"].add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    cmd["report"].add_argument("--json", action="store_true", help="print JSON instead of text")
    cmd["compress"].add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
    cmd["compress"].add_argument("out", metavar="OUT", help="compressed file to write")
    cmd["compress"].add_argument("--model", help=CODING_MODEL_HELP)
    cmd["decompress"].add_argument("input", metavar="IN", help="compressed file")
    cmd["decompress"].add_argument("out", metavar="OUT.png", help="PNG to write")
    cmd["decompress"].add_argument("--model", help="8-bit model name (default: the model named in the file)")
    cmd["plots"].add_argument("targets", nargs="*", help="plot files or folders (default: every plot)")
    cmd["plots"].add_argument("--out", default="dvc_plots", help="output folder (default: dvc_plots)")
    return parser


COMMANDS = {
    cmd_score: "score images: BPD, p-value and verdict",
    cmd_report: "where the latest report is, and its AUROC table",
    cmd_compress: "compress a gray image losslessly with an 8-bit model",
    cmd_decompress: "decompress a file written by `ardetect compress` to a PNG",
    cmd_plots: "render the pipeline's `dvc plots` offline (HTML, SVG, PNG)",
}
IMAGE_HELP = "gray image of the model's size: PNG (8-bit grayscale) or .npy (uint8, or floats in [0, 1])"
SCORE_MODEL_HELP = (
    "trained model (default: the first 8-bit model of train.models with a checkpoint, else the first)"
)
CODING_MODEL_HELP = "8-bit model (default: the trained one with the lowest clean test BPD, else the first)"
FPR_HELP = "false-positive rate on clean calibration images (default: 0.05)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, message already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        code: int = args.func(args)
        return code
    except (CliError, ImageError) as err:
        print(f"ardetect {args.command}: error: {err}", file=sys.stderr)
        return err.code if isinstance(err, CliError) else InputError.code
    except BrokenPipeError:  # e.g. `ardetect report --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
