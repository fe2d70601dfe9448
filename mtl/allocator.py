"""Keep freed large blocks in the process on glibc, so a CPU training step does not page-fault.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (at most
32 MB, dynamically) with a fresh ``mmap`` and returns it to the kernel on ``free``, so every
training step re-faults the pages of its largest tensors: MiniLM's word-embedding gradient
(30,522 x 384 fp32, 47 MB, allocated anew each step with ``zero_grad(set_to_none=True)``) costs
23 ms of CPU to allocate and zero that way against 3.6 ms from memory the process keeps, about 6%
of a bf16 step of the Quickstart's trials (benchmarks/RESULTS_precision.md). Raising the mmap
and trim thresholds (``mallopt``, as ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do
from the environment) makes ``free`` keep such blocks for the next step. The cost is memory held
at the process's peak instead of returned between steps; CUDA tensors are unaffected (PyTorch's
caching allocator already keeps them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there when freed (glibc caps the mmap
# threshold at HEAP_MAX_SIZE / 2 = 32 MB on 64-bit unless it is set explicitly, as here).
KEEP_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`KEEP_BYTES` (once per process).

    Returns:
        True when set; False where the C library is not glibc (macOS, musl, Windows), which
        leaves the allocator as it was.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has mallopt as a no-op stub)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    )


def release_freed_memory() -> bool:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim(0)``).

    A search reuses each worker process for trial after trial (``reuse_actors``); with
    :func:`keep_freed_memory` the blocks a finished trial freed would otherwise stay in that
    process, and its resident size grows from trial to trial (seen at 4-9 GB per worker after a
    dozen MiniLM trials on a 24 GB machine, until Ray's memory monitor killed one). Called when a
    trial ends, after its objects are collected.

    Returns:
        True when memory was returned; False when there was none to return or the C library is
        not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(malloc_trim(0))
