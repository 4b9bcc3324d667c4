"""The ``ardetect`` command: score images with a trained model, show the latest detection report.

``ardetect score IMAGE...`` gives each image's bits per dimension (BPD) under a trained density model,
its PixelDefend p-value against the model's ``train_ref`` rows of the score table and a verdict at the
threshold that gives ``--fpr`` false positives on the model's clean ``calib`` rows (test-pool images).
``ardetect report`` prints where the report and its figures are and the AUROC of every model × attack
set.

Both read a project built by ``dvc repro`` (``--root``, default the current folder). Exit codes: 0 on
success, 1 when pipeline outputs are missing (run ``dvc repro``), 2 on usage or input-file errors.
Heavy imports (torch, the models) happen inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from ardetect.models.base import ARModel
    from ardetect.params import Params

SCORES = Path("data/scores/scores.parquet")
MODELS = Path("data/models")
REPORT_DIR = Path("data/report")
DETECTION_METRICS = Path("data/metrics/detection.json")
SCORE_METRICS = Path("data/metrics/score.json")
CLASSIFIER_METRICS = Path("data/metrics/classifier.json")
REPRO = "run `dvc repro` in the project root first"


class CliError(Exception):
    """An error reported as one line on stderr, without a traceback, and exit code ``code``."""

    code = 2


class InputError(CliError):
    """A bad argument or input file (exit code 2)."""

    code = 2


class NotBuiltError(CliError):
    """A pipeline output (checkpoint, score table, report) is missing (exit code 1)."""

    code = 1


# --- images -------------------------------------------------------------------------------------


def _gray_from_pil(path: Path) -> np.ndarray:
    """A (H, W) uint8 gray image from a Pillow-readable file (mode L or 1; RGB/RGBA/P with equal channels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "L":
                return np.asarray(im, dtype=np.uint8).copy()
            if mode == "1":
                return np.asarray(im.convert("L"), dtype=np.uint8).copy()
            if mode in ("RGB", "RGBA", "P", "PA", "LA"):
                rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)  # (H, W, 4)
            else:
                raise InputError(
                    f"{path}: unsupported image mode {mode!r}; expected an 8-bit grayscale image (mode 'L')"
                )
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: not an image Pillow can read ({err})") from None
    if not (rgba[..., 3] == 255).all():
        raise InputError(f"{path}: image has transparent pixels; expected an opaque 8-bit grayscale image")
    rgb = rgba[..., :3]
    if not ((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])).all():
        raise InputError(
            f"{path}: colour image (mode {mode}, channels differ); expected an 8-bit grayscale image "
            "(mode 'L', or RGB with equal channels)"
        )
    return rgb[..., 0].copy()


def _gray_from_npy(path: Path) -> np.ndarray:
    """A (H, W) uint8 gray image from a .npy array: uint8 levels, or floats in [0, 1] (rounded to 1/255)."""
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path}: not a readable .npy array ({err})") from None
    if not isinstance(a, np.ndarray):
        raise InputError(f"{path}: expected one array in a .npy file, got {type(a).__name__}")
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])  # (1, H, W) or (H, W, 1)
    if a.ndim == 3 and (a.shape[0] in (3, 4) or a.shape[-1] in (3, 4)):
        raise InputError(f"{path}: colour image of shape {a.shape}; expected one gray channel (H, W)")
    if a.ndim != 2:
        raise InputError(f"{path}: expected a gray image of shape (H, W) or (1, H, W), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.copy()
    if not np.issubdtype(a.dtype, np.floating):
        raise InputError(
            f"{path}: wrong dtype {a.dtype}; expected uint8 gray levels 0..255 or floats in [0, 1]"
        )
    if not np.isfinite(a).all():
        raise InputError(f"{path}: array contains NaN or infinite values")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise InputError(
            f"{path}: float values must lie in [0, 1] (gray/255), got [{a.min():g}, {a.max():g}]"
        )
    return np.rint(a.astype(np.float64) * 255).astype(np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """Read one gray image as (H, W) uint8, or raise :class:`InputError` naming the file and the problem.

    ``.npy``: uint8 gray levels, or floats in [0, 1] rounded to the nearest of the 256 levels (the
    pipeline stores and scores 8-bit images), shape (H, W), (1, H, W) or (H, W, 1). Any other file is
    read with Pillow: 8-bit grayscale (mode ``L``; bilevel ``1`` too), or RGB/RGBA/palette images whose
    channels are all equal and which are opaque.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    return _gray_from_npy(path) if path.suffix.lower() == ".npy" else _gray_from_pil(path)


def check_size(path: str | Path, gray: np.ndarray, image_shape: Sequence[int]) -> None:
    """Raise :class:`InputError` unless the (H, W) image fits a model of ``image_shape`` (1, H, W)."""
    h, w = image_shape[-2:]
    if gray.shape != (h, w):
        raise InputError(f"{path}: expected {h}x{w}, got {gray.shape[0]}x{gray.shape[1]}")


# --- project ------------------------------------------------------------------------------------


def load_project_params(root: Path) -> Params:
    from ardetect.params import ParamsError, load_params

    path = root / "params.yaml"
    if not path.is_file():
        raise InputError(f"{path} not found; --root must be the project root (where dvc.yaml is)")
    try:
        return load_params(path)
    except ParamsError as err:
        raise InputError(str(err)) from None


def resolve_model(params: Params, root: Path, name: str | None = None) -> str:
    """The model to score with: ``name`` if given, else the first 8-bit model of ``train.models`` with a
    checkpoint, else the first model of ``train.models`` with a checkpoint. Background models (the
    reference of a likelihood ratio) are no detectors and are never chosen."""
    from ardetect.training import detector_models

    if name is not None:
        if name not in params.models:
            raise InputError(f"unknown model {name!r}; defined in params.yaml: {', '.join(params.models)}")
        if params.models[name].is_background:
            raise InputError(
                f"{name!r} is a background model (mutation_rate > 0), not a detector; choose one of "
                f"{', '.join(detector_models(params.train, params.models))}"
            )
        if not (root / MODELS / name / "model.pt").is_file():
            raise NotBuiltError(f"no checkpoint {root / MODELS / name / 'model.pt'}; {REPRO}")
        return name
    detectors = detector_models(params.train, params.models)  # not the background models
    trained = [n for n in detectors if (root / MODELS / n / "model.pt").is_file()]
    if not trained:
        raise NotBuiltError(
            f"no trained checkpoint under {root / MODELS} for any of train.models "
            f"({', '.join(params.train.models)}); {REPRO}"
        )
    eight_bit = [n for n in trained if params.models[n].levels == 256]
    return (eight_bit or trained)[0]


def reference_scores(root: Path, model: str) -> tuple[np.ndarray, np.ndarray]:
    """The model's ``train_ref`` and ``calib`` BPDs from the score table."""
    import pandas as pd

    path = root / SCORES
    if not path.is_file():
        raise NotBuiltError(f"no score table {path}; {REPRO}")
    table = pd.read_parquet(path, columns=["source", "model", "bpd"])
    rows = table[table["model"] == model]
    out = []
    for source in ("train_ref", "calib"):
        bpd = rows.loc[rows["source"] == source, "bpd"].to_numpy(np.float64)
        if not len(bpd):
            raise NotBuiltError(f"the score table {path} has no {source!r} rows for model {model!r}; {REPRO}")
        out.append(bpd)
    return out[0], out[1]


# --- scoring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    file: str
    model: str
    bpd: float
    bpd_se: float
    pvalue: float
    threshold: float
    fpr: float
    verdict: str  # adversarial | clean


def verdicts(
    files: Sequence[str],
    bpd: np.ndarray,
    se: np.ndarray,
    model: str,
    train_ref: np.ndarray,
    val: np.ndarray,
    fpr: float,
) -> list[Verdict]:
    """P-values against ``train_ref`` and verdicts at the ``fpr`` threshold on ``calib`` (flag: bpd > t)."""
    from ardetect.detection import pvalues, threshold_at_fpr

    threshold = threshold_at_fpr(val, fpr)
    p = pvalues(bpd, train_ref)
    return [
        Verdict(
            f,
            model,
            float(b),
            float(s),
            float(q),
            threshold,
            fpr,
            "adversarial" if b > threshold else "clean",
        )
        for f, b, s, q in zip(files, bpd, se, p)
    ]


def score_images(model: ARModel, images: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """BPD and standard error of (N, H, W) uint8 images, scored as the pipeline's score stage does.

    Dynamic binarization scores each image on its own (draws seeded with ``(score.seed, 0)``), so an
    image's score does not depend on the other files on the command line.
    """
    from ardetect.devices import resolve_device
    from ardetect.scoring import score_bpd

    device = resolve_device(params.score.device, "score.device")
    binarization = params.binarize.mode if model.levels == 2 else None
    x = images[:, None]  # (N, 1, H, W)
    kw: dict[str, Any] = dict(device=device, progress=False, threshold=params.binarize.threshold)
    if binarization != "dynamic":
        return score_bpd(model, x, binarization, params.score, **kw)
    parts = [score_bpd(model, x[i : i + 1], binarization, params.score, **kw) for i in range(len(x))]
    return np.concatenate([b for b, _ in parts]), np.concatenate([s for _, s in parts])


def format_verdicts(rows: Sequence[Verdict], n_ref: int, n_val: int, levels: int, binarization: str) -> str:
    kind = f"{levels} levels" + (f", {binarization} binarization" if levels == 2 else "")
    head = (
        f"model {rows[0].model} ({kind})"
        f": threshold {rows[0].threshold:.4f} bits/dim at {100 * rows[0].fpr:g}% FPR"
        f" on {n_val} clean calibration images,"
        f" p-values against {n_ref} train_ref images"
    )
    table = [("file", "bpd", "±se", "p-value", "threshold", "verdict")] + [
        (r.file, f"{r.bpd:.4f}", f"{r.bpd_se:.4f}", f"{r.pvalue:.4f}", f"{r.threshold:.4f}", r.verdict)
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    return "\n".join([head, "", *(line.rstrip() for line in lines)])


def cmd_score(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    images = [load_image(f) for f in args.images]  # file errors before any model work
    params = load_project_params(root)
    name = resolve_model(params, root, args.model)
    from ardetect.models import load_model

    model = load_model(root / MODELS / name / "model.pt")
    for f, gray in zip(args.images, images):
        check_size(f, gray, model.image_shape)
    train_ref, val = reference_scores(root, name)
    bpd, se = score_images(model, np.stack(images), params)
    rows = verdicts(args.images, bpd, se, name, train_ref, val, args.fpr)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_verdicts(rows, len(train_ref), len(val), model.levels, params.binarize.mode))
    return 0


# --- report -------------------------------------------------------------------------------------


def auroc_table(
    detection: dict[str, dict[str, dict[str, float]]],
    model_order: Sequence[str] = (),
    set_order: Sequence[str] = (),
) -> pd.DataFrame:
    """AUROC pivot of ``detection.json``: one row per model, one column per attack set.

    Rows follow ``model_order`` and columns ``set_order`` where given (names missing from them come
    after, in file order).
    """
    import pandas as pd

    long = pd.DataFrame(
        [
            {"model": m, "set": s, "auroc": v.get("auroc", math.nan)}
            for m, sets in detection.items()
            for s, v in sets.items()
        ],
        columns=["model", "set", "auroc"],
    )
    table = long.pivot(index="model", columns="set", values="auroc")

    def order(preferred: Sequence[str], found: pd.Series) -> list[str]:
        names = list(dict.fromkeys(found))
        return [n for n in preferred if n in names] + [n for n in names if n not in preferred]

    table = table.reindex(index=order(model_order, long["model"]), columns=order(set_order, long["set"]))
    table.index.name = table.columns.name = None
    return table


def _small_sets(detection: dict[str, dict[str, dict[str, float]]]) -> dict[str, int]:
    """Attack sets with fewer than MIN_CELL positives (smallest n over models), as report.md flags them."""
    from ardetect.detection import MIN_CELL

    n: dict[str, int] = {}
    for sets in detection.values():
        for name, v in sets.items():
            n[name] = min(n.get(name, 2**31), int(v.get("n_pos", 0)))
    return {k: v for k, v in n.items() if v < MIN_CELL}


def _model_order(root: Path) -> list[str]:
    """Model order from params.yaml's train.models (empty if unreadable)."""
    import yaml

    try:
        raw = yaml.safe_load((root / "params.yaml").read_text())
        return [str(m) for m in raw["train"]["models"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []


def _report_order(sets: Iterable[str]) -> list[str]:
    """Set slugs in report order: attack family, then ε numerically (8/255 before 25/255)."""
    from ardetect.attacksets import AttackSet

    return sorted(sets, key=lambda slug: AttackSet.from_slug(slug).sort_key)


def report_summary(root: Path) -> dict[str, Any]:
    """Paths of the latest report and figures, the AUROC table, small sets and the classifier metrics."""
    report = (root / REPORT_DIR / "report.md").resolve()
    metrics = (root / DETECTION_METRICS).resolve()
    for path in (report, metrics):
        if not path.is_file():
            raise NotBuiltError(f"no detection report ({path} is missing); {REPRO}")
    try:
        detection = json.loads(metrics.read_text())
    except json.JSONDecodeError as err:
        raise NotBuiltError(f"{metrics} is not valid JSON ({err}); {REPRO}") from None
    classifier_path = root / CLASSIFIER_METRICS
    classifier = json.loads(classifier_path.read_text()) if classifier_path.is_file() else None
    return {
        "report": str(report),
        "figures": [str(p) for p in sorted(report.parent.glob("*.png"))],
        "auroc": auroc_table(
            detection, _model_order(root), _report_order({s for sets in detection.values() for s in sets})
        ),
        "small_sets": _small_sets(detection),
        "classifier": classifier,
    }


def cmd_report(args: argparse.Namespace) -> int:
    s = report_summary(Path(args.root).resolve())
    if args.json:
        out = {**s, "auroc": {m: row.dropna().to_dict() for m, row in s["auroc"].iterrows()}}
        print(json.dumps(out, indent=2))
        return 0
    lines = [f"report:  {s['report']}", "figures:", *(f"  {p}" for p in s["figures"])]
    if s["classifier"]:
        acc = ", ".join(f"{k} {v:.4f}" for k, v in s["classifier"].items() if k.endswith("accuracy"))
        lines.append(f"classifier: {acc}")
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


# --- compression --------------------------------------------------------------------------------


def coding_model(params: Params, root: Path, name: str | None = None) -> str:
    """The 8-bit model that codes images: ``name`` if given, else the trained 8-bit model with the lowest
    clean test BPD in data/metrics/score.json (the shortest code), else the first of train.models."""
    from ardetect.compression import LEVELS, eight_bit_models

    if name is not None:
        name = resolve_model(params, root, name)
        if params.models[name].levels != LEVELS:
            raise InputError(f"{name!r} is a binary model; compression needs an 8-bit model (levels: 256)")
        return name
    eight_bit = eight_bit_models(params.train.models, params.models)
    candidates = [n for n in eight_bit if (root / MODELS / n / "model.pt").is_file()]
    if not candidates:
        raise NotBuiltError(f"no trained 8-bit model (levels: 256) under {root / MODELS}; {REPRO}")
    try:
        bpd = json.loads((root / SCORE_METRICS).read_text())
        return min(candidates, key=lambda n: float(bpd[n]["test_bpd_mean"]))
    except (OSError, ValueError, KeyError, TypeError):
        return candidates[0]


def cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from ardetect.compression import compress_images
    from ardetect.models import load_model

    root = Path(args.root).resolve()
    gray = load_image(args.image)  # file errors before any model work
    params = load_project_params(root)
    name = coding_model(params, root, args.model)
    model = load_model(root / MODELS / name / "model.pt")
    check_size(args.image, gray, model.image_shape)
    images = gray[None, None]  # (1, 1, H, W)
    data = compress_images(model, name, images)
    try:
        Path(args.out).write_bytes(data)
    except OSError as err:
        raise InputError(f"{args.out}: cannot write ({err.strerror})") from None
    with torch.inference_mode():
        bpd = float(model.bpd(torch.as_tensor(images).float())[0])
    print(
        f"{args.image} -> {args.out}: {len(data)} bytes with model {name} "
        f"({8 * len(data) / gray.size:.3f} bits/dim with the header; the model's BPD {bpd:.3f})"
    )
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from PIL import Image

    from ardetect.compression import CompressedFileError, decompress_images, read_file
    from ardetect.models import load_model

    root = Path(args.root).resolve()
    path = Path(args.input)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        header, _ = read_file(data)  # a corrupt file fails before any model work
        if header.num_images != 1:
            raise CompressedFileError(f"holds {header.num_images} images; `ardetect compress` writes one")
        params = load_project_params(root)
        name = coding_model(params, root, args.model or header.name)
        images = decompress_images(load_model(root / MODELS / name / "model.pt"), data)
    except CompressedFileError as err:
        raise InputError(f"{path}: {err}") from None
    try:
        Image.fromarray(images[0, 0], mode="L").save(args.out, format="PNG")
    except (OSError, ValueError) as err:
        raise InputError(f"{args.out}: cannot write a PNG ({err})") from None
    print(f"{path} -> {args.out}: {images.shape[-2]}x{images.shape[-1]} gray image (model {name})")
    return 0


# --- main ---------------------------------------------------------------------------------------


def _fpr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ardetect",
        description="Detect adversarial images by their bits per dimension under trained density models.",
        epilog="Reads a project built by `dvc repro`. "
        "Exit codes: 0 ok, 1 pipeline outputs missing, 2 bad input.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    root_help = "project root holding params.yaml and data/ (default: .)"

    score = sub.add_parser(
        "score",
        help="score images: BPD, p-value and verdict",
        description="BPD of each image under a trained model, its PixelDefend p-value against the model's "
        "train_ref scores, and a verdict at the threshold that gives --fpr false positives on the model's "
        "clean calibration scores (flagged when BPD > threshold).",
    )
    score.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="gray image of the model's size: PNG (8-bit grayscale) "
        "or .npy (uint8 0..255, or floats in [0, 1])",
    )
    score.add_argument(
        "--model",
        help="trained model name (default: the first 8-bit model of train.models with a checkpoint, "
        "else the first with a checkpoint)",
    )
    score.add_argument("--root", default=".", help=root_help)
    score.add_argument(
        "--fpr",
        type=_fpr,
        default=0.05,
        help="false-positive rate on clean calibration images (default: 0.05)",
    )
    score.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    score.set_defaults(func=cmd_score)

    report = sub.add_parser(
        "report",
        help="where the latest report is, and its AUROC table",
        description="Print the paths of the latest report and figures, and the AUROC of every model × attack "
        "set (from data/metrics/detection.json) with the classifier's accuracy.",
    )
    report.add_argument("--root", default=".", help=root_help)
    report.add_argument("--json", action="store_true", help="print JSON instead of text")
    report.set_defaults(func=cmd_report)

    model_help = (
        "8-bit model name (default: the trained 8-bit model with the lowest clean test BPD, else the "
        "first 8-bit model of train.models)"
    )
    compress = sub.add_parser(
        "compress",
        help="compress a gray image losslessly with an 8-bit model",
        description="Entropy-code (ANS) a gray image with an 8-bit model's conditionals: about the model's "
        "BPD bits per pixel, plus a header naming the model. Runs on the CPU; decompress with the same "
        "checkpoint.",
    )
    compress.add_argument("image", metavar="IMAGE", help="gray image of the model's size (PNG or .npy)")
    compress.add_argument("out", metavar="OUT", help="compressed file to write")
    compress.add_argument("--model", help=model_help)
    compress.add_argument("--root", default=".", help=root_help)
    compress.set_defaults(func=cmd_compress)

    decompress = sub.add_parser(
        "decompress",
        help="decompress a file written by `ardetect compress` to a PNG",
        description="Decode a file written by `ardetect compress` (one forward pass per pixel) and write "
        "the image as an 8-bit grayscale PNG, identical in pixels to the original.",
    )
    decompress.add_argument("input", metavar="IN", help="compressed file")
    decompress.add_argument("out", metavar="OUT.png", help="PNG to write")
    decompress.add_argument("--model", help="8-bit model name (default: the model named in the file)")
    decompress.add_argument("--root", default=".", help=root_help)
    decompress.set_defaults(func=cmd_decompress)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, message already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        code: int = args.func(args)
        return code
    except CliError as err:
        print(f"ardetect {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except BrokenPipeError:  # e.g. `ardetect report --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
