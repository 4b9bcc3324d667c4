"""Outputs that appear all at once or not at all, so a failed stage never looks complete."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged_outputs(*finals: Path) -> Iterator[list[Path]]:
    """Yield temporary twins of ``finals``; move them into place only if the block succeeds.

    The caller writes each output (file or folder) to its twin. On success every twin replaces its
    final path; on any exception the twins are deleted and the finals are removed too, so nothing
    stale or half-written is left where DVC or a user would look.
    """
    twins = [p.with_name(f".{p.name}.partial") for p in finals]
    for path in (*twins, *finals):
        _remove(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield twins
    except BaseException:
        for twin in twins:
            _remove(twin)
        raise
    missing = [str(f) for f, t in zip(finals, twins) if not t.exists()]
    if missing:
        for twin in twins:
            _remove(twin)
        raise RuntimeError(f"stage finished without writing {', '.join(missing)}")
    for final, twin in zip(finals, twins):
        os.replace(twin, final)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
