"""The `ardetect` command on a tiny fake project: score (table, JSON, PNG/.npy, bad files), report, help."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from ardetect import cli
from ardetect.detection import COLUMNS, pvalues, threshold_at_fpr, verdicts
from ardetect.models import build_model, save_model
from ardetect.scoring import Binarization, ScoreConfig, score_bpd

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
NUM_DRAWS, SEED = 4, 3


@dataclass
class Project:
    root: Path
    images: dict[str, np.ndarray]  # name -> (8, 8) uint8
    bpd: dict[str, dict[str, tuple[float, float]]]  # model -> image name -> (bpd, se) by score_bpd
    train_ref: dict[str, np.ndarray]
    val: dict[str, np.ndarray]


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_params(root: Path) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["models"] = ["tiny_bin", "tiny_8bit"]
    raw["models"] = {
        "tiny_bin": {"arch": "fvsbn"},
        "tiny_8bit": {
            "arch": "pixelcnn",
            "levels": 256,
            "hparams": {"channels": 4, "blocks": 1, "head_channels": 4},
        },
    }
    raw["binarize"]["mode"] = "dynamic"
    raw["adaptive"]["model"] = "tiny_8bit"
    raw["adaptive"]["conditional_model"] = None
    raw["purify"]["model"] = "tiny_8bit"
    raw["ood"]["background"] = {}
    raw["score"].update(num_draws=NUM_DRAWS, seed=SEED, device="cpu")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("project")
    _write_params(root)
    models = {
        "tiny_bin": build_model("fvsbn", SHAPE),
        "tiny_8bit": build_model("pixelcnn", SHAPE, levels=256, channels=4, blocks=1, head_channels=4),
    }
    with torch.no_grad():
        for p in models["tiny_bin"].parameters():
            p.copy_(2 * torch.randn_like(p))
    for name, model in models.items():
        save_model(model, root / "data/models" / name / "model.pt")

    rng = np.random.default_rng(0)
    images = {
        "smooth": np.tile(np.linspace(0, 255, 8).astype(np.uint8), (8, 1)),
        "noise": rng.integers(0, 256, (8, 8)).astype(np.uint8),
    }
    config = ScoreConfig(num_draws=NUM_DRAWS, seed=SEED)
    bpd: dict[str, dict[str, tuple[float, float]]] = {}
    for name, model in models.items():
        binarization: Binarization = "dynamic" if model.levels == 2 else None
        bpd[name] = {}
        for key, img in images.items():  # each image on its own (row 0), as the CLI does
            b, s = score_bpd(model, img[None, None], binarization, config, progress=False)
            bpd[name][key] = (float(b[0]), float(s[0]))

    # Reference rows: val scores put the 5%-FPR threshold midway between the two images' BPDs.
    frames, train_ref, val = [], {}, {}
    for name in models:
        lo, hi = sorted(b for b, _ in bpd[name].values())
        assert hi - lo > 1e-6, f"{name}: the two images must score differently"
        mid, spread = (lo + hi) / 2, hi - lo
        val[name] = np.r_[np.linspace(mid - 2 * spread, mid - 0.1 * spread, 95), mid, np.full(4, hi + spread)]
        train_ref[name] = np.linspace(lo - spread, hi + spread, 50)
        for source, values in (("train_ref", train_ref[name]), ("calib", val[name])):
            frames.append(
                pd.DataFrame(
                    {
                        "image_id": np.arange(len(values)),
                        "source": source,
                        "attack": None,
                        "epsilon": np.nan,
                        "model": name,
                        "bpd": values,
                        "bpd_se": 0.0,
                        "label": 0,
                        "prediction": 0,
                        "success": pd.array([pd.NA] * len(values), dtype="boolean"),
                    }
                )
            )
    table = pd.concat(frames, ignore_index=True)[list(COLUMNS)]
    (root / "data/scores").mkdir(parents=True)
    table.to_parquet(root / cli.SCORES, index=False)

    report = root / "data/report"
    report.mkdir(parents=True)
    (report / "report.md").write_text("# report\n")
    for fig in ("roc.png", "bpd_densities.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(report / fig)
    (root / "data/metrics").mkdir(parents=True)
    detection = {
        m: {
            "pgd_e8": {"auroc": 0.61 + i / 10, "n_pos": 50.0},
            "fgsm_e8": {"auroc": 0.72 + i / 10, "n_pos": 3.0},
            "pgd_e25": {"auroc": 0.81 + i / 10, "n_pos": 50.0},
            "adaptive_pgd_e8": {"auroc": 0.55 + i / 10, "n_pos": 40.0},
        }
        for i, m in enumerate(["tiny_bin", "tiny_8bit"])
    }
    (root / cli.DETECTION_METRICS).write_text(json.dumps(detection, sort_keys=True))
    (root / cli.CLASSIFIER_METRICS).write_text(json.dumps({"test_accuracy": 0.9078, "epochs_run": 4}))

    png_dir = root / "images"
    png_dir.mkdir()
    for key, img in images.items():
        Image.fromarray(img, mode="L").save(png_dir / f"{key}.png")
    return Project(root, images, bpd, train_ref, val)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _png(project: Project, key: str) -> str:
    return str(project.root / "images" / f"{key}.png")


def _expected(project: Project, model: str, key: str, fpr: float = 0.05) -> dict[str, object]:
    b, s = project.bpd[model][key]
    t = threshold_at_fpr(project.val[model], fpr)
    return {
        "model": model,
        "bpd": b,
        "bpd_se": s,
        "pvalue": float(pvalues([b], project.train_ref[model])[0]),
        "threshold": t,
        "fpr": fpr,
        "verdict": "adversarial" if b > t else "clean",
    }


# --- help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        (["--help"], ["score", "report"]),
        (["score", "--help"], ["--model", "--fpr", "--json", "--root"]),
        (["report", "--help"], ["--json", "--root"]),
    ],
)
def test_help_for_every_command(
    capsys: pytest.CaptureFixture[str], argv: list[str], options: list[str]
) -> None:
    """Each command's help names its own usage and the options it takes."""
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    assert out.startswith(f"usage: ardetect {' '.join(argv[:-1])}".rstrip())
    for option in options:
        assert option in out, f"{' '.join(argv)} does not mention {option}"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], project: Project) -> None:
    assert _run(capsys, "frobnicate")[0] == 2
    assert _run(capsys, "score")[0] == 2  # no IMAGE
    code, _, err = _run(capsys, "score", _png(project, "smooth"), "--fpr", "1.5")
    assert code == 2 and "must lie in (0, 1)" in err
    code, _, err = _run(capsys, "score", _png(project, "smooth"), "--root", str(project.root), "--model", "x")
    assert code == 2 and "unknown model 'x'" in err and "tiny_8bit" in err


def test_module_and_console_script_help() -> None:
    commands = [[sys.executable, "-m", "ardetect.cli", "--help"]]
    script = Path(sys.executable).parent / "ardetect"
    if script.exists():  # after `pip install -e .`
        commands.append([str(script), "--help"])
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "score" in done.stdout and "report" in done.stdout


# --- score ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_bin", "tiny_8bit"])
def test_score_json_matches_score_bpd_and_thresholds(
    capsys: pytest.CaptureFixture[str], project: Project, model: str
) -> None:
    files = [_png(project, "smooth"), _png(project, "noise")]
    code, out, err = _run(capsys, "score", *files, "--root", str(project.root), "--model", model, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["file"] for r in rows] == files
    for row, key in zip(rows, ("smooth", "noise")):
        expected = _expected(project, model, key)
        assert row["bpd"] == pytest.approx(expected.pop("bpd"), rel=1e-9)
        assert row["bpd_se"] == pytest.approx(expected.pop("bpd_se"), rel=1e-9, abs=1e-12)
        assert {k: row[k] for k in expected} == expected
    # the threshold lies between the two images: exactly the higher-BPD one is flagged
    lo, hi = sorted(rows, key=lambda r: r["bpd"])
    assert lo["threshold"] == pytest.approx((lo["bpd"] + hi["bpd"]) / 2)
    assert lo["bpd"] < lo["threshold"] < hi["bpd"]
    assert (lo["verdict"], hi["verdict"]) == ("clean", "adversarial")
    assert (rows[1]["bpd_se"] > 0) == (model == "tiny_bin")  # Monte-Carlo error only under dynamic draws


def test_score_table_output(capsys: pytest.CaptureFixture[str], project: Project) -> None:
    files = [_png(project, "smooth"), _png(project, "noise")]
    code, out, _ = _run(capsys, "score", *files, "--root", str(project.root))
    assert code == 0
    head, _, *lines = out.strip().splitlines()
    assert head.startswith("model tiny_8bit (256 levels)")  # the default: the first 8-bit model
    assert "at 5% FPR on 100 clean calibration images" in head and "against 50 train_ref images" in head
    assert lines[0].split() == ["file", "bpd", "±se", "p-value", "threshold", "verdict"]
    for line, f, key in zip(lines[1:], files, ("smooth", "noise")):
        e = _expected(project, "tiny_8bit", key)
        assert line.split() == [
            f,
            f"{e['bpd']:.4f}",
            f"{e['bpd_se']:.4f}",
            f"{e['pvalue']:.4f}",
            f"{e['threshold']:.4f}",
            e["verdict"],
        ]


def test_score_fpr_moves_the_threshold(capsys: pytest.CaptureFixture[str], project: Project) -> None:
    f = _png(project, "smooth")
    code, out, _ = _run(capsys, "score", f, "--root", str(project.root), "--json", "--fpr", "0.5")
    assert code == 0
    row = json.loads(out)[0]
    assert row["fpr"] == 0.5
    assert row["threshold"] == threshold_at_fpr(project.val["tiny_8bit"], 0.5)


def test_npy_and_gray_rgb_inputs_score_like_the_png(
    capsys: pytest.CaptureFixture[str], project: Project, tmp_path: Path
) -> None:
    img = project.images["noise"]
    inputs = {
        "u8.npy": img,
        "chw.npy": img[None],
        "float.npy": img.astype(np.float32) / 255,
        "float64_hw1.npy": (img.astype(np.float64) / 255)[..., None],
    }
    files = []
    for name, a in inputs.items():
        np.save(tmp_path / name, a)
        files.append(str(tmp_path / name))
    Image.fromarray(np.stack([img] * 3, -1), mode="RGB").save(tmp_path / "rgb.png")
    files.append(str(tmp_path / "rgb.png"))
    for model in ("tiny_bin", "tiny_8bit"):
        code, out, err = _run(
            capsys, "score", *files, "--root", str(project.root), "--model", model, "--json"
        )
        assert code == 0, err
        bpd = [r["bpd"] for r in json.loads(out)]
        assert bpd == pytest.approx([project.bpd[model]["noise"][0]] * len(files), rel=1e-9)


def test_load_image_rounds_floats_to_gray_levels(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.array([[0.0, 0.5, 1.0, 0.1]]))
    np.testing.assert_array_equal(cli.load_image(tmp_path / "f.npy"), [[0, 128, 255, 26]])


def _bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message fragment)."""
    (d / "text.png").write_text("not an image")
    (d / "garbage.npy").write_bytes(b"\x00\x01 not numpy")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "big.png")
    np.save(d / "wide.npy", np.zeros((8, 9), np.uint8))
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour, mode="RGB").save(d / "colour.png")
    transparent = np.zeros((8, 8, 4), np.uint8)
    Image.fromarray(transparent, mode="RGBA").save(d / "transparent.png")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(d / "sixteen.png")  # mode I;16
    np.save(d / "rgb.npy", np.zeros((8, 8, 3), np.uint8))
    np.save(d / "nan.npy", np.full((8, 8), np.nan, np.float32))
    np.save(d / "range.npy", np.full((8, 8), 1.5))
    np.save(d / "negative.npy", np.full((8, 8), -0.1))
    np.save(d / "int64.npy", np.zeros((8, 8), np.int64))
    np.save(d / "bool.npy", np.zeros((8, 8), bool))
    np.save(d / "batch.npy", np.zeros((2, 2, 8, 8), np.uint8))
    (d / "folder.png").mkdir()
    return {
        "missing": (d / "missing.png", "no such file"),
        "folder": (d / "folder.png", "not a file"),
        "text": (d / "text.png", "not an image"),
        "garbage": (d / "garbage.npy", "not a readable .npy array"),
        "big": (d / "big.png", "expected 8x8, got 32x32"),
        "wide": (d / "wide.npy", "expected 8x8, got 8x9"),
        "colour": (d / "colour.png", "colour image"),
        "transparent": (d / "transparent.png", "transparent pixels"),
        "sixteen": (d / "sixteen.png", "unsupported image mode"),
        "rgb": (d / "rgb.npy", "colour image of shape (8, 8, 3)"),
        "nan": (d / "nan.npy", "NaN"),
        "range": (d / "range.npy", "must lie in [0, 1]"),
        "negative": (d / "negative.npy", "must lie in [0, 1]"),
        "int64": (d / "int64.npy", "wrong dtype int64"),
        "bool": (d / "bool.npy", "wrong dtype bool"),
        "batch": (d / "batch.npy", "expected a gray image of shape (H, W)"),
    }


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return _bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "folder",
        "text",
        "garbage",
        "big",
        "wide",
        "colour",
        "transparent",
        "sixteen",
        "rgb",
        "nan",
        "range",
        "negative",
        "int64",
        "bool",
        "batch",
    ],
)
def test_bad_file_exits_2_naming_file_and_problem(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    project: Project,
    bad_files: dict[str, tuple[Path, str]],
    case: str,
) -> None:
    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored despite a bad file")

    monkeypatch.setattr(cli, "score_images", no_scoring)
    path, message = bad_files[case]
    code, out, err = _run(capsys, "score", _png(project, "smooth"), str(path), "--root", str(project.root))
    assert code == 2
    assert out == ""
    assert err.startswith(f"ardetect score: error: {path}: ")
    assert message in err
    assert "Traceback" not in err


def test_resolve_model_prefers_8bit_then_first_trained(project: Project, tmp_path: Path) -> None:
    params = cli.load_project_params(project.root)
    assert cli.resolve_model(params, project.root) == "tiny_8bit"
    assert cli.resolve_model(params, project.root, "tiny_bin") == "tiny_bin"
    root = tmp_path
    (root / "data/models/tiny_bin").mkdir(parents=True)
    (root / "data/models/tiny_bin/model.pt").write_bytes(b"")
    assert cli.resolve_model(params, root) == "tiny_bin"
    with pytest.raises(cli.NotBuiltError, match="dvc repro"):
        cli.resolve_model(params, root, "tiny_8bit")
    with pytest.raises(cli.NotBuiltError, match="no trained checkpoint"):
        cli.resolve_model(params, tmp_path / "nowhere")


def test_missing_checkpoint_or_scores_asks_for_dvc_repro(
    capsys: pytest.CaptureFixture[str], project: Project, tmp_path: Path
) -> None:
    f = _png(project, "smooth")
    _write_params(tmp_path)
    code, _, err = _run(capsys, "score", f, "--root", str(tmp_path))
    assert code == 1 and "no trained checkpoint" in err and "dvc repro" in err
    (tmp_path / "data/models/tiny_8bit").mkdir(parents=True)
    (tmp_path / "data/models/tiny_8bit/model.pt").write_bytes(
        (project.root / "data/models/tiny_8bit/model.pt").read_bytes()
    )
    code, _, err = _run(capsys, "score", f, "--root", str(tmp_path))
    assert code == 1 and "no score table" in err and "dvc repro" in err
    code, _, err = _run(capsys, "score", f, "--root", str(tmp_path / "elsewhere"))
    assert code == 2 and "params.yaml not found" in err


def test_verdicts_flag_scores_above_the_threshold() -> None:
    val = np.arange(1, 101, dtype=float)  # threshold at 5% FPR: 96
    ref = np.arange(10, dtype=float)
    rows = verdicts(["a", "b", "c"], np.array([96.0, 96.5, 5.0]), np.zeros(3), "m", ref, val, 0.05)
    assert [r.threshold for r in rows] == [96.0] * 3
    assert [r.verdict for r in rows] == ["clean", "adversarial", "clean"]
    assert [r.pvalue for r in rows] == [1 / 11, 1 / 11, 6 / 11]


# --- report ---------------------------------------------------------------------------------------


def test_report_lists_paths_and_auroc_table(capsys: pytest.CaptureFixture[str], project: Project) -> None:
    code, out, err = _run(capsys, "report", "--root", str(project.root))
    assert code == 0, err
    report_dir = (project.root / "data/report").resolve()
    assert f"report:  {report_dir / 'report.md'}" in out
    for fig in ("bpd_densities.png", "roc.png"):
        assert str(report_dir / fig) in out
    assert "test_accuracy 0.9078" in out
    lines = out.splitlines()
    header = lines[lines.index("AUROC (rows: models, columns: attack sets)") + 1]
    # report order (family, then ε numerically), not the file's alphabetical order
    assert header.split() == ["fgsm_e8", "pgd_e8", "pgd_e25", "adaptive_pgd_e8"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.startswith("tiny_")}
    assert rows == {
        "tiny_bin": ["0.720", "0.610", "0.810", "0.550"],
        "tiny_8bit": ["0.820", "0.710", "0.910", "0.650"],
    }
    assert list(rows) == ["tiny_bin", "tiny_8bit"]  # params.yaml's order
    assert "fgsm_e8 (n=3)" in out


def test_report_json(capsys: pytest.CaptureFixture[str], project: Project) -> None:
    code, out, _ = _run(capsys, "report", "--root", str(project.root), "--json")
    assert code == 0
    data = json.loads(out)
    assert Path(data["report"]).is_absolute() and data["report"].endswith("data/report/report.md")
    assert [Path(p).name for p in data["figures"]] == ["bpd_densities.png", "roc.png"]
    assert data["auroc"]["tiny_8bit"] == {
        "fgsm_e8": pytest.approx(0.82),
        "pgd_e8": pytest.approx(0.71),
        "pgd_e25": pytest.approx(0.91),
        "adaptive_pgd_e8": pytest.approx(0.65),
    }
    assert data["classifier"]["test_accuracy"] == 0.9078
    assert data["small_sets"] == {"fgsm_e8": 3}


def test_report_missing_asks_for_dvc_repro(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _run(capsys, "report", "--root", str(tmp_path))
    assert code == 1 and out == ""
    assert "report.md is missing" in err and "dvc repro" in err
