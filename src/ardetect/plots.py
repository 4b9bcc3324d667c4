"""`dvc plots` with no internet: Vega-Lite rendered locally by vl-convert.

`dvc plots show` writes an HTML page whose scripts load Vega from a CDN, so on an offline machine (and
in CI) the page stays blank. Two offline paths, both over DVC's own plot definitions (dvc.yaml's
`plots` and the templates in .dvc/plots):

* an HTML template holding vl-convert's JavaScript bundle (Vega, Vega-Lite, Vega-Embed inline), for
  `dvc plots show --html-template` / `dvc plots diff --html-template`: DVC fills in the plots, the page
  needs no network;
* static SVG and PNG files of every plot (`dvc plots show --json` specs rendered by vl-convert), for
  reports, notebooks and CI artifacts.
"""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEMPLATE = Path(".dvc/tmp/offline_plots_template.html")

_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots (offline)</title>
    <script type="text/javascript">
BUNDLE
    </script>
    <style>table { border-spacing: 15px; } body { font-family: sans-serif; }</style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


class PlotsError(RuntimeError):
    """`dvc plots` failed (no plots yet, or DVC itself failed): the message says what to run."""


def offline_template(path: Path = TEMPLATE) -> Path:
    """Write (once per vl-convert version) the HTML template for ``dvc plots show --html-template``.

    DVC replaces ``{plot_divs}``; each plot div calls the global ``vegaEmbed`` that the inline bundle
    defines (vl-convert's default bundle assigns it to ``window``)."""
    import vl_convert as vlc

    version = f"<!-- vl-convert {getattr(vlc, '__version__', '?')} vega {vlc.get_vega_version()} -->\n"
    if path.is_file() and path.read_text().startswith(version):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        version
        + _PAGE.replace(
            "BUNDLE",
            vlc.javascript_bundle(
                "window.vegaEmbed = vegaEmbed; window.vega = vega; window.vegaLite = vegaLite;"
            ),
        )
    )
    tmp.replace(path)
    return path


def _dvc(args: Sequence[str], dvc: str) -> str:
    done = subprocess.run([dvc, "plots", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise PlotsError(
            f"`dvc plots {' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}; "
            "run the pipeline first (`dvc repro`)"
        )
    return done.stdout


def plot_specs(targets: Sequence[str] = (), dvc: str = "dvc") -> dict[str, dict[str, Any]]:
    """Every plot DVC defines, as filled-in Vega-Lite specs {plot id: spec}; ``targets`` (files or
    folders) keep the plots under them. DVC is always asked for all plots and filtered here: given a file
    inside a plots folder, `dvc plots show FILE` ignores the folder's template and axes."""
    shown = json.loads(_dvc(["show", "--json"], dvc))
    for error in shown.get("errors", []):
        warnings.warn(f"dvc plots: {error.get('name')}: {error.get('msg')}", stacklevel=2)
    specs = {
        name: entry["content"]
        for name, entries in shown.get("data", {}).items()
        for entry in entries
        if entry["type"] == "vega" and _selected(name, targets)
    }
    if not specs:
        wanted = f" under {', '.join(targets)}" if targets else ""
        raise PlotsError(f"DVC has no plot data{wanted} yet: run the pipeline first (`dvc repro`)")
    return specs


def _selected(name: str, targets: Sequence[str]) -> bool:
    folders = [t.rstrip("/") for t in targets]
    return not targets or any(name == t or name.startswith(t + "/") for t in folders)


def _file_stem(plot_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", plot_id).strip("_")


def render_static(
    specs: dict[str, dict[str, Any]], out: Path, formats: Sequence[str] = ("svg", "png")
) -> list[Path]:
    """Render each spec to ``out/<plot id>.<format>`` with vl-convert (no browser, no network)."""
    import vl_convert as vlc

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for plot_id, spec in specs.items():
        for fmt in formats:
            path = out / f"{_file_stem(plot_id)}.{fmt}"
            if fmt == "svg":
                path.write_text(vlc.vegalite_to_svg(spec))
            elif fmt == "png":
                path.write_bytes(vlc.vegalite_to_png(spec, scale=2))
            else:
                raise ValueError(f"unknown plot format {fmt!r}; use svg or png")
            written.append(path)
    return written


def render_html(out: Path, targets: Sequence[str] = (), dvc: str = "dvc") -> Path:
    """``dvc plots show`` with the offline template: ``out/index.html`` works with no network."""
    template = offline_template()
    _dvc(["show", "--html-template", str(template), "-o", str(out), *targets], dvc)
    return out / "index.html"
