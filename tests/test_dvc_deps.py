"""dvc.yaml's code deps are exactly the project code each stage runs.

A stage runs its script and every project module the script imports, transitively: at module level
and inside functions (lazy imports run too). Only ``if TYPE_CHECKING:`` blocks never run. Importing
``ardetect.a.b`` also runs ``ardetect/__init__.py`` and ``ardetect/a/__init__.py``; ``from
ardetect.a import b`` runs the submodule ``ardetect/a/b.py`` when ``b`` is one. A script run as
``python pipeline/x.py`` can also import modules next to it (``sys.path[0]`` is its folder).

A module missing from a stage's deps leaves stale results when it changes; a dep outside the closure
reruns the stage for nothing. Closures come from the source by ``ast`` (nothing is imported), so the
check follows the code as it changes: when it fails, put the listed modules in dvc.yaml.
"""

from __future__ import annotations

import ast
import shlex
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "ardetect"


# ---------------------------------------------------------------------------------------------------
# import closure


def _module_file(name: str, roots: Iterable[Path]) -> Path | None:
    """The file that runs for module ``name`` (its ``__init__.py`` for a package), or None."""
    parts = name.split(".")
    for root in roots:
        base = root.joinpath(*parts)
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _executed_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(path: Path, module: str | None) -> set[str]:
    """Absolute names of the modules that running ``path`` may import, anywhere in the file.

    ``module`` is the file's own dotted name (for relative imports), None for a script. For
    ``from a import b`` both ``a`` and ``a.b`` are returned (``a.b`` counts only if it is a module).
    """
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in _executed_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if module is None:
                    continue  # a relative import in a script fails anyway
                parts = module.split(".") if is_package else module.split(".")[:-1]
                keep = len(parts) - (node.level - 1)
                base = ".".join(parts[:keep] + ([base] if base else []))
            if base:
                names.add(base)
            names.update(f"{base}.{a.name}" if base else a.name for a in node.names if a.name != "*")
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def import_closure(script: Path, src: Path, package: str) -> set[Path]:
    """Files that ``python <script>`` runs: the script and every module of ``package`` (under
    ``src``) or next to the script that it imports, transitively."""
    local = script.parent  # sys.path[0] of `python <script>`
    closure = {script}
    todo: list[tuple[Path, str | None]] = [(script, None)]
    seen: set[str] = set()
    while todo:
        path, module = todo.pop()
        for name in imported_names(path, module):
            parts = name.split(".")
            if parts[0] == package:
                roots = [src]
            elif _module_file(parts[0], [local]) is not None:
                roots = [local]
            else:
                continue  # stdlib or third party
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
                prefix = ".".join(parts[:i])
                if prefix in seen:
                    continue
                file = _module_file(prefix, roots)
                if file is None:
                    break  # `from a import name`: name is not a module
                seen.add(prefix)
                closure.add(file)
                todo.append((file, prefix))
    return closure


# ---------------------------------------------------------------------------------------------------
# dvc.yaml


def _covered(file: Path, dep: Path) -> bool:
    return file == dep or dep in file.parents


def compare_deps(
    deps: Iterable[str], closure: set[Path], root: Path, code_dirs: Iterable[Path]
) -> tuple[list[str], list[str]]:
    """(missing, extra): closure files no dep covers, and code deps (under ``code_dirs``) that are not
    exactly closure files: a dep outside the closure, or a folder holding modules outside it."""
    dep_paths = [(root / d).resolve() for d in deps]
    code_dirs = [c.resolve() for c in code_dirs]
    missing = sorted(
        f.relative_to(root).as_posix() for f in closure if not any(_covered(f, d) for d in dep_paths)
    )
    extra: list[str] = []
    for dep in dep_paths:
        if not any(_covered(dep, c) for c in code_dirs):
            continue  # data, not code
        if dep.is_dir():
            outside = sorted(p for p in dep.rglob("*.py") if p not in closure)
            extra += [p.relative_to(root).as_posix() for p in outside]
        elif dep not in closure:
            extra.append(dep.relative_to(root).as_posix())
    return missing, sorted(set(extra))


def suggested_deps(closure: set[Path], root: Path) -> list[str]:
    """The closure for dvc.yaml: a package folder when all of its modules are in it, else files."""
    out: set[str] = set()
    for f in closure:
        entry = f
        for parent in f.parents:
            if parent == root or not (parent / "__init__.py").is_file():
                break
            if not all(p in closure for p in parent.rglob("*.py")):
                break
            entry = parent
        out.add(entry.relative_to(root).as_posix())
    return sorted(out)


def _script(cmd: Any) -> str:
    for line in [cmd] if isinstance(cmd, str) else cmd:
        for word in shlex.split(line):
            if word.endswith(".py"):
                return word
    raise AssertionError(f"no python script in cmd {cmd!r}")


def _dep_paths(deps: list[Any]) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in deps]


def dvc_stages(dvc_yaml: Path) -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (script, deps); a ``foreach``/``matrix`` stage by its ``do`` template."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage["do"] if "foreach" in stage else stage
        out[name] = (_script(body["cmd"]), _dep_paths(body.get("deps", [])))
    return out


def test_dvc_deps_are_each_stage_import_closure() -> None:
    problems = []
    for name, (script, deps) in dvc_stages(ROOT / "dvc.yaml").items():
        closure = import_closure(ROOT / script, SRC, PACKAGE)
        missing, extra = compare_deps(deps, closure, ROOT, [SRC / PACKAGE, (ROOT / script).parent])
        if missing or extra:
            lines = [f"  {name} ({script}):"]
            if missing:
                lines.append(f"    missing (imported, not in deps): {', '.join(missing)}")
            if extra:
                lines.append(f"    extra (in deps, never imported): {', '.join(extra)}")
            lines.append(f"    code deps should be: {', '.join(suggested_deps(closure, ROOT))}")
            problems.append("\n".join(lines))
    assert not problems, (
        "dvc.yaml deps must be exactly the code each stage runs (its script's imports, transitively):\n"
        + "\n".join(problems)
    )


# ---------------------------------------------------------------------------------------------------
# the check itself, on a synthetic package


def test_expensive_stages_stay_narrow() -> None:
    """An edit to the detection half (attacks, adaptive attacks, scoring, detection, report) or to the
    whole-file params composition must not retrain the density models or the classifier."""
    detection_half = {"attacks.py", "adaptive.py", "attacksets.py", "scoring.py", "detection.py", "report.py"}
    for stage in ("train", "classifier"):
        script, _ = dvc_stages(ROOT / "dvc.yaml")[stage]
        names = {p.name for p in import_closure(ROOT / script, SRC, PACKAGE)}
        assert not names & (detection_half | {"params.py"}), (
            f"{stage} imports {sorted(names & detection_half)}"
        )


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    _write(
        tmp_path,
        {
            "pipeline/stage.py": """
                from pkg import core  # `core` is a submodule
                from pkg.util import helper  # `helper` is a function
                import helpers  # next to the script
            """,
            "pipeline/helpers.py": "",
            "src/pkg/__init__.py": "",
            "src/pkg/core.py": """
                from typing import TYPE_CHECKING

                import numpy

                if TYPE_CHECKING:
                    from pkg import typing_only
                else:
                    from pkg import runtime_else

                def later():
                    from pkg.sub.deep import thing  # lazy: runs when called
                    return thing
            """,
            "src/pkg/util.py": "from .relative import x\n\ndef helper(): ...\n",
            "src/pkg/relative.py": "x = 1\n",
            "src/pkg/runtime_else.py": "",
            "src/pkg/typing_only.py": "",
            "src/pkg/unused.py": "",
            "src/pkg/sub/__init__.py": "",
            "src/pkg/sub/deep.py": "thing = 1\n",
        },
    )
    return tmp_path


def test_closure_follows_lazy_submodule_relative_and_local_imports(synthetic: Path) -> None:
    closure = import_closure(synthetic / "pipeline/stage.py", synthetic / "src", "pkg")
    assert sorted(p.relative_to(synthetic).as_posix() for p in closure) == [
        "pipeline/helpers.py",
        "pipeline/stage.py",
        "src/pkg/__init__.py",
        "src/pkg/core.py",
        "src/pkg/relative.py",
        "src/pkg/runtime_else.py",
        "src/pkg/sub/__init__.py",
        "src/pkg/sub/deep.py",
        "src/pkg/util.py",
    ]


def test_compare_catches_missing_and_extra_deps(synthetic: Path) -> None:
    closure = import_closure(synthetic / "pipeline/stage.py", synthetic / "src", "pkg")
    code = [synthetic / "src/pkg", synthetic / "pipeline"]
    # what a hand-written deps list typically looks like: the lazily imported package is forgotten
    deps = [
        "pipeline/stage.py",
        "pipeline/helpers.py",
        "src/pkg/__init__.py",
        "src/pkg/core.py",
        "src/pkg/util.py",
        "src/pkg/relative.py",
        "src/pkg/runtime_else.py",
        "src/pkg/unused.py",
        "data/raw",
    ]
    missing, extra = compare_deps(deps, closure, synthetic, code)
    assert missing == ["src/pkg/sub/__init__.py", "src/pkg/sub/deep.py"]
    assert extra == ["src/pkg/unused.py"]

    deps = [*deps[:-2], "src/pkg/sub", "data/raw"]
    assert compare_deps(deps, closure, synthetic, code) == ([], [])
    # a folder dep holding a module outside the closure is too broad
    assert compare_deps([*deps, "src/pkg"], closure, synthetic, code) == (
        [],
        ["src/pkg/typing_only.py", "src/pkg/unused.py"],
    )
    assert suggested_deps(closure, synthetic) == [
        "pipeline/helpers.py",
        "pipeline/stage.py",
        "src/pkg/__init__.py",
        "src/pkg/core.py",
        "src/pkg/relative.py",
        "src/pkg/runtime_else.py",
        "src/pkg/sub",
        "src/pkg/util.py",
    ]


def test_dvc_parses_yaml_with_libyaml() -> None:
    """DVC reads params.yaml once per stage and dvc.lock twice on every `dvc repro`, through
    ruamel.yaml's safe loader: its C parser (ruamel.yaml.clib, a declared dependency since ruamel.yaml
    0.19 stopped installing it) keeps a no-op repro near 2 s; the pure-Python parser took 2.6-3.4 s."""
    from ruamel.yaml import YAML
    from ruamel.yaml.parser import Parser

    loader = YAML(typ="safe")
    assert loader.Parser is not Parser, "pure-Python YAML parser: `pip install ruamel.yaml.clib`"
    assert loader.load("a: [1, {b: c}]") == {"a": [1, {"b": "c"}]}
