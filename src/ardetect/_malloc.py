"""glibc malloc settings that keep PyTorch's large CPU tensors in the heap.

With glibc's defaults, every intermediate tensor above the (dynamic) mmap threshold is fresh memory
from the kernel, page-faulted in and returned at ``free``: on a 2-core CPU that alone halves NADE and
PixelCNN throughput (NADE training 658 → 2,054 img/s, 8-bit PixelCNN scoring 568 → 1,247 img/s,
measured with identical code). PyTorch's CPU performance guide recommends jemalloc or tcmalloc; the same
lever is four ``mallopt`` calls, made when ``ardetect`` is imported, so every stage, the CLI and the
tests get it. A user's own ``MALLOC_*`` environment settings win: then nothing is changed.

glibc caps the mmap threshold at 32 MiB, and a 256-level model's logits are larger (64 images x 784
pixels x 256 levels in float32: 51 MiB; 411 MiB for the score stage's 512): ``M_MMAP_MAX = 0`` serves
those from the heap too. 8-bit PixelCNN on 2 cores (AMD EPYC, torch 2.14): training 721 -> 766 img/s,
scoring 512 images 1,577 -> 1,959 img/s; tcmalloc preloaded gives 787 and 1,962, so little is left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
MMAP_THRESHOLD = 32 * 1024**2  # glibc's ceiling on 64-bit: tensors up to 32 MiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of freed heap for reuse (mallopt takes a C int)
TOP_PAD = 1024**3  # grow the heap in 1 GiB steps
MMAP_MAX = 0  # no allocation is mmapped: above the threshold too (a thread's arena falls back to the heap)


def tune_malloc() -> bool:
    """Apply the settings; True when glibc took all four (False elsewhere, or when overridden)."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_MMAP_MAX, MMAP_MAX),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)
