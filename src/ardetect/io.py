"""Outputs that appear all at once or not at all, so a failed stage never looks complete."""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def partial_twin(final: Path) -> Path:
    """Where ``staged_outputs`` writes ``final`` until the stage succeeds."""
    return final.with_name(f".{final.name}.partial")


def orphans(*finals: Path) -> list[Path]:
    """Temporary files a killed writer of ``finals`` can leave behind: the ``staged_outputs`` twin of
    each, and ``models.atomic_torch_save``'s ``.<name>.<random>.tmp`` next to each (a SIGKILL runs no
    cleanup, so only the next start of the stage can remove them)."""
    found = [twin for twin in map(partial_twin, finals) if os.path.lexists(twin)]
    for final in finals:
        if final.parent.is_dir():
            found += sorted(final.parent.glob(f".{glob.escape(final.name)}.*.tmp"))
    return found


def sweep_orphans(*finals: Path) -> list[Path]:
    """Remove :func:`orphans` of ``finals`` and return them. Only safe while no other process writes
    ``finals`` (``tracking.stage_run`` checks that no live run of the same stage exists)."""
    found = orphans(*finals)
    for path in found:
        _remove(path)
    return found


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
    twins = [partial_twin(p) for p in finals]
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
