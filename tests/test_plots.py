"""Offline `dvc plots`: the project's ROC template draws monotone curves, and rendering needs no network."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ardetect import plots
from ardetect.detection import roc_points

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def _repo(tmp_path: Path, curves: pd.DataFrame) -> Path:
    """A git + DVC repo with the project's roc template and one ROC plot folder."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".dvc/plots").mkdir(exist_ok=True)
    shutil.copy(ROOT / ".dvc/plots/roc.json", tmp_path / ".dvc/plots/roc.json")
    (tmp_path / "data/plots/roc").mkdir(parents=True)
    curves.to_csv(tmp_path / "data/plots/roc/toy.csv", index=False)
    (tmp_path / "dvc.yaml").write_text(
        "plots:\n  - data/plots/roc:\n      template: roc\n      x: fpr\n      y: tpr\n"
    )
    return tmp_path


def _scores(n: int = 40) -> pd.DataFrame:
    """A score table with one model and two attack sets of 40 pairs each (ROC curves of > 10 points,
    so a lexicographic sort of the point index would scramble them)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        rows.append(dict(image_id=i, source="test", attack=None, epsilon=np.nan, bpd=rng.normal(1.0)))
        for attack, eps, shift in (("pgd", 8 / 255, 1.0), ("cw", np.nan, 0.2)):
            rows.append(dict(image_id=i, source="adversarial", attack=attack, epsilon=eps,
                             bpd=rng.normal(1.0 + shift), success=True))  # fmt: skip
    df = pd.DataFrame(rows).assign(model="toy", bpd_se=0.0, label=0, prediction=0)
    df["success"] = pd.array(df["success"], dtype="boolean")
    return df


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    points = roc_points(_scores())["toy"]
    assert points.groupby("curve").size().min() > 10
    return _repo(tmp_path_factory.mktemp("plots"), points)


def test_roc_template_draws_each_curve_in_point_order(
    toy_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(toy_repo)
    specs = plots.plot_specs(dvc=DVC)
    assert list(specs) == ["data/plots/roc/toy.csv"]
    vl_convert = pytest.importorskip("vl_convert")
    scene = vl_convert.vegalite_to_scenegraph(specs["data/plots/roc/toy.csv"])
    lines = []

    def walk(node: dict) -> None:
        if node.get("marktype") == "line":
            lines.append([(item["x"], item["y"]) for item in node.get("items", [])])
        for child in node.get("items", []):
            if isinstance(child, dict):
                walk(child)

    walk(scene["scenegraph"])
    drawn = [line for line in lines if len(line) > 10]
    assert len(drawn) == 2  # one line per attack set
    for line in drawn:  # a ROC curve never moves left or down (screen y grows downwards)
        xs, ys = np.array(line).T
        assert np.all(np.diff(xs) >= -1e-9) and np.all(np.diff(ys) <= 1e-9)


def test_a_file_target_keeps_its_folders_template(toy_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(toy_repo)
    spec = plots.plot_specs(["data/plots/roc/toy.csv"], dvc=DVC)["data/plots/roc/toy.csv"]
    assert spec["encoding"]["x"]["title"] == "false-positive rate"
    with pytest.raises(plots.PlotsError, match="dvc repro"):
        plots.plot_specs(["data/plots/nothing"], dvc=DVC)


def test_offline_outputs_need_no_network(toy_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vl_convert")
    monkeypatch.chdir(toy_repo)
    out = toy_repo / "rendered"
    files = plots.render_static(plots.plot_specs(dvc=DVC), out)
    assert sorted(f.suffix for f in files) == [".png", ".svg"]
    assert "false-positive rate" in (out / "data_plots_roc_toy.csv.svg").read_text()
    assert files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = plots.render_html(out, dvc=DVC).read_text()
    assert "vegaEmbed(" in page and "cdn.jsdelivr" not in page and "<script src=" not in page


def test_cli_plots(toy_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("vl_convert")
    from ardetect import cli

    monkeypatch.chdir(tmp_path)  # the command changes into --root itself
    out = tmp_path / "rendered"
    assert cli.main(["plots", "--root", str(toy_repo), "--out", str(out), "data/plots/roc"]) == 0
    assert {p.name for p in out.iterdir()} >= {"index.html", "data_plots_roc_toy.csv.svg"}
    (tmp_path / "empty").mkdir()
    empty = _repo(tmp_path / "empty", pd.DataFrame(columns=["fpr", "tpr", "curve", "point"]))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plots", "--root", str(empty), "--out", str(tmp_path / "x"), "data/plots/nope"]) == 1
    assert "dvc repro" in capsys.readouterr().err
