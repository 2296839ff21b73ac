"""Host settings for sampling processes: `keep_freed_memory` and glibc's malloc."""

import ctypes
import subprocess
import sys

import pytest

_MALLOC_PROBE = """
import ctypes, sys
from unimodal.generation.fast.host import keep_freed_memory
class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2().hblkhd
block = libc.malloc(3 << 20)
print(kept, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_serves_a_few_megabytes_from_the_heap_not_fresh_pages():
    """By default glibc maps a 3 MB block as fresh pages from the OS (page faults when first written);
    after `keep_freed_memory` it comes from the heap. Fresh processes: this one's thresholds have moved."""
    try:
        has_mallinfo2 = hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        has_mallinfo2 = False
    if not has_mallinfo2:
        pytest.skip("not glibc >= 2.33")

    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, mode], capture_output=True, text=True, check=True)
        kept, mapped = out.stdout.split()
        return kept, int(mapped)

    kept, mapped = probe("default")
    assert kept == "None" and mapped >= 3 << 20
    assert probe("keep") == ("True", 0)
