from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ardetect.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repository_params_are_valid() -> None:
    """The committed params.yaml validates (load_params raises on any problem) and trains only models it
    defines; its values are the user's choice, not something to pin here."""
    params = load_params(ROOT / "params.yaml")
    assert set(params.train.models) <= set(params.models)


@pytest.mark.parametrize("profile", ["params.yaml", "profiles/gpu.yaml"])
def test_profiles_validate_and_fill_every_dvc_interpolation(profile: str) -> None:
    """``dvc repro`` with the profile as params.yaml: it validates, and every ``${a.b}`` that dvc.yaml
    interpolates (other than the foreach ``${item}``) names a key the profile sets."""
    import re

    load_params(ROOT / profile)
    raw = yaml.safe_load((ROOT / profile).read_text())
    refs = set(re.findall(r"\$\{([\w.]+)\}", (ROOT / "dvc.yaml").read_text())) - {"item"}
    assert refs, "dvc.yaml interpolates params"
    for ref in sorted(refs):
        node = raw
        for part in ref.split("."):
            assert isinstance(node, dict) and part in node, (
                f"{profile} lacks {ref}, which dvc.yaml interpolates"
            )
            node = node[part]


def test_adaptive_model_must_be_a_trained_8bit_model() -> None:
    raw = default_raw()
    raw["adaptive"]["model"] = "made"
    with pytest.raises(
        ParamsError, match=r"adaptive.model = 'made': the adaptive attack needs an 8-bit model"
    ):
        parse_params(raw)
    raw["adaptive"]["model"] = "nope"
    with pytest.raises(ParamsError, match=r"adaptive.model = 'nope': not a trained model"):
        parse_params(raw)
    raw["adaptive"].update(model="pixelcnn_8bit", num_images=201)
    with pytest.raises(ParamsError, match=r"adaptive.num_images = 201: at most attack.num_images = 200"):
        parse_params(raw)


def test_model_train_overrides_sit_on_defaults() -> None:
    raw = default_raw()
    raw["models"]["nade"]["train"] = {"epochs": 7}
    params = parse_params(raw)
    assert params.train_params("nade").epochs == 7
    assert params.train_params("nade").batch_size == params.train.defaults.batch_size
    assert params.train_params("fvsbn").epochs == params.train.defaults.epochs


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["data"].update(dataset="cifar"), "data.dataset = 'cifar': Input should be 'mnist'"),
        (
            lambda r: r["train"]["defaults"].update(lr=-0.1),
            "train.defaults.lr = -0.1: Input should be greater than 0",
        ),
        (
            lambda r: r["train"]["defaults"].update(epocs=3),
            "train.defaults.epocs: unknown key (did you mean 'epochs'?)",
        ),
        (lambda r: r["train"]["defaults"].update(batch_size="big"), "train.defaults.batch_size = 'big'"),
        (
            lambda r: r["binarize"].update(threshold=1.5),
            "binarize.threshold = 1.5: Input should be less than 1",
        ),
        (lambda r: r.update(datta={}), "datta: unknown key (did you mean 'data'?)"),
        (
            lambda r: r["models"]["made"]["hparams"].update(hiden=[3]),
            "models.made.hparams.hiden: unknown key (did you mean 'hidden'?)",
        ),
        (lambda r: r["models"]["made"]["hparams"].update(hidden=[-3]), "models.made.hparams.hidden.0 = -3"),
        (
            lambda r: r["models"]["nade"].update(arch="nadee"),
            "models.nade.arch = 'nadee': unknown architecture (allowed: fvsbn, gated_pixelcnn, made, nade,",
        ),
        (lambda r: r["models"]["nade"].pop("arch"), "models.nade.arch: missing"),
        (  # the hparams are checked against the entry's own architecture's config
            lambda r: r["models"]["nade"]["hparams"].update(channels=8),
            "models.nade.hparams.channels: unknown key (allowed: hidden",
        ),
        (lambda r: r["models"]["nade"].update(levels=256), "models.nade.levels = 256: nade supports [2]"),
        (lambda r: r["models"]["nade"].update(train={"patience": 0}), "models.nade.train.patience = 0"),
        (
            lambda r: r["train"].update(models=["fvsbn", "pixelcnnn"]),
            "train.models[1] = 'pixelcnnn': no such entry",
        ),
    ],
)
def test_bad_params_name_the_key_value_and_rule(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    raw = default_raw()
    edit(raw)
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert message in str(info.value)


def test_model_entry_holds_its_architectures_config() -> None:
    """One hop per layer: params.yaml's models.made.hparams.hidden is MADEConfig.hidden, the model's."""
    from ardetect.models import model_class
    from ardetect.models.made import MADEConfig

    params = parse_params(default_raw())
    made = params.models["made"]
    assert isinstance(made.hparams, MADEConfig) and made.hparams.hidden == tuple(
        default_raw()["models"]["made"]["hparams"]["hidden"]
    )
    model = made.build((1, 28, 28))
    assert model.config is made.hparams and model.levels == made.levels
    for name, entry in params.models.items():
        assert isinstance(entry.hparams, model_class(entry.arch).Config), name  # type: ignore[attr-defined]


def test_all_problems_reported_at_once() -> None:
    raw = default_raw()
    raw["train"]["defaults"]["lr"] = 0
    raw["data"]["seed"] = -1
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert "train.defaults.lr" in str(info.value) and "data.seed" in str(info.value)


def test_missing_and_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("data: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


#: keys that name entries of ``models:`` (per-model settings, which are the profile's by design): a
#: library default cannot know which models a profile defines.
NAMES_MODEL_ENTRIES = {"train.models", "ood.background"}


def _drift(raw: dict, parsed: object, default: object, prefix: str) -> list[str]:
    """``path: yaml=... default=...`` for every key of ``raw`` whose validated value differs from the
    dataclass default, recursing into nested sections (``train.defaults``)."""
    lines = []
    for key, value in raw.items():
        path = f"{prefix}.{key}"
        got, want = getattr(parsed, key), getattr(default, key)
        if isinstance(value, dict) and path not in NAMES_MODEL_ENTRIES:
            lines += _drift(value, got, want, path)
        elif path not in NAMES_MODEL_ENTRIES and got != want:
            lines.append(f"{path}: params.yaml={got!r} dataclass default={want!r}")
    return lines


def test_dataclass_defaults_equal_params_yaml() -> None:
    """One source of defaults: every key params.yaml states (outside the per-model ``models:`` entries)
    equals its section dataclass's default, so code that builds a section without the file runs what
    users run. Values are compared after validation (``8/255`` is a float there)."""
    raw, params = default_raw(), load_params(ROOT / "params.yaml")
    drift, checked = [], 0
    for name, section in raw.items():
        if name == "models":
            continue
        parsed = getattr(params, name)
        drift += _drift(section, parsed, type(parsed)(), name)
        checked += len(section)
    assert checked > 100, "every section was walked"
    assert not drift, "change these dataclass defaults to params.yaml's values:\n" + "\n".join(drift)
