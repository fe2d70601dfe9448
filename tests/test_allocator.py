"""mtl.allocator: on glibc, large tensors come from memory the process keeps, not fresh mmaps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Prints the bytes glibc holds in mmapped blocks (mallinfo2().hblkhd) while a 64 MB tensor lives,
# before and after keep_freed_memory(); run in a fresh process, as the setting is process-wide.
PROBE = """
import ctypes, json, torch
from mtl import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_while_alive():
    t = torch.zeros(16 * 1024 * 1024)  # 64 MB
    held = libc.mallinfo2().hblkhd
    del t
    return held

before = mmapped_while_alive()
kept = allocator.keep_freed_memory()
after = [mmapped_while_alive() for _ in range(2)]
print(json.dumps({"before": before, "kept": kept, "after": after}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_stop_being_mmapped() -> None:
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
        )
    except subprocess.CalledProcessError as err:
        if "mallinfo2" in err.stderr:
            pytest.skip("not glibc >= 2.33")
        raise
    result = json.loads(out.stdout.strip().splitlines()[-1])
    size = 64 * 1024 * 1024
    assert result["before"] >= size  # glibc's default: a fresh mmap for a 64 MB block
    assert result["kept"] is True
    assert all(held < size for held in result["after"])  # from the heap, kept across frees


# Frees 400 MB of 4 MB tensors under keep_freed_memory(), then trims: the process's resident size
# falls back only after release_freed_memory().
TRIM_PROBE = """
import json, torch
from mtl import allocator

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

allocator.keep_freed_memory()
base = rss()
blocks = [torch.ones(1024 * 1024) for _ in range(100)]  # 100 x 4 MB, touched
del blocks
kept = rss() - base
released = allocator.release_freed_memory()
print(json.dumps({"kept": kept, "released": released, "after": rss() - base}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_release_hands_freed_heap_back_to_the_kernel() -> None:
    out = subprocess.run(
        [sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kept"] > 300 * 1024 * 1024  # kept in the process after the frees
    assert result["released"] is True
    assert result["after"] < 100 * 1024 * 1024
