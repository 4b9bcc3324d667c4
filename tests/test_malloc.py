"""The allocator settings ardetect applies on import (glibc's mallopt)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ardetect import _malloc

PROBE = "import ardetect._malloc as m; print(m.tune_malloc())"


def _probe(env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_mallopt_takes_every_setting_unless_the_user_set_malloc_env() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _probe(clean) == "True", "glibc must accept all three settings"
    assert _probe({**clean, "MALLOC_ARENA_MAX": "2"}) == "False", "a user's MALLOC_* settings win"


def test_settings_fit_mallopts_int_argument() -> None:
    """mallopt takes a C int: a larger value would wrap around (4 GiB becomes 0, i.e. trim always)."""
    for value in (_malloc.MMAP_THRESHOLD, _malloc.TRIM_THRESHOLD, _malloc.TOP_PAD):
        assert 0 < value < 2**31
    assert _malloc.MMAP_THRESHOLD <= 32 * 1024**2, "glibc refuses an mmap threshold above 32 MiB"
