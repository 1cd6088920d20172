"""common.memory.tune_host_malloc: glibc keeps freed host blocks mapped for reuse (what XLA's per-step
temporaries need), checked through glibc's own accounting in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = r"""
import ctypes, sys
from common import memory
libc = ctypes.CDLL(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = memory.tune_host_malloc() if sys.argv[1] == "tune" else None
again = memory.tune_host_malloc() and memory.host_malloc_tuned() if sys.argv[1] == "tune" else None
before = libc.mallinfo2().hblkhd
block = libc.malloc(256 << 20)  # a step's temporaries, say
mmapped = libc.mallinfo2().hblkhd - before  # bytes of blocks served by mmap
libc.free(block)
print(applied, again, mmapped, libc.mallinfo2().fordblks)  # ... and free bytes glibc keeps
"""


def _probe(mode: str, **env: str) -> tuple[str, str, int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
    return out[0], out[1], int(out[2]), int(out[3])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_tuned_malloc_serves_and_keeps_large_blocks_from_the_heap():
    size = 256 << 20
    # glibc's default: a large block is mmapped, and unmapped again on free (the next step faults it back in).
    _, _, mmapped, kept = _probe("default")
    assert mmapped >= size and kept < size
    applied, again, mmapped, kept = _probe("tune")
    assert (applied, again) == ("True", "True")
    assert mmapped == 0 and kept >= size  # served from the heap, and still there after free
    # Opting out leaves glibc as it is.
    applied, _, mmapped, kept = _probe("tune", CLIP_DALLE_JAX_HOST_MALLOC="system")
    assert applied == "False" and mmapped >= size and kept < size
