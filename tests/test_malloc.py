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
    assert _probe(clean) == "True", "glibc must accept all four settings"
    assert _probe({**clean, "MALLOC_ARENA_MAX": "2"}) == "False", "a user's MALLOC_* settings win"


def test_settings_fit_mallopts_int_argument() -> None:
    """mallopt takes a C int: a larger value would wrap around (4 GiB becomes 0, i.e. trim always)."""
    for value in (_malloc.MMAP_THRESHOLD, _malloc.TRIM_THRESHOLD, _malloc.TOP_PAD):
        assert 0 < value < 2**31
    assert _malloc.MMAP_THRESHOLD <= 32 * 1024**2, "glibc refuses an mmap threshold above 32 MiB"


# glibc's own account of a 64 MiB tensor (above its largest mmap threshold): bytes in mmapped blocks.
HBLKHD = """
import ctypes, torch, ardetect
class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(f, ctypes.c_size_t) for f in names.split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
t = torch.ones(16 * 1024**2)  # float32: 64 MiB
print(libc.mallinfo2().hblkhd)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tensors_above_the_mmap_ceiling_come_from_the_heap() -> None:
    """A 256-level model's logits (51 MiB per 64 images) must be reused heap, not a fresh mmap per step."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def mmapped(env: dict[str, str]) -> int:
        run = subprocess.run([sys.executable, "-c", HBLKHD], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.strip())

    assert mmapped(clean) < 64 * 1024**2, "the 64 MiB tensor was mmapped: M_MMAP_MAX is not 0"
    assert mmapped({**clean, "MALLOC_ARENA_MAX": "8"}) >= 64 * 1024**2, "control: glibc's defaults mmap it"
