"""Settings of the host process that speed up CPU work without changing any result."""

from __future__ import annotations

import ctypes


def keep_freed_memory(mmap_mb: int = 4, trim_mb: int = 64) -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation, for the rest of the process:
    blocks under `mmap_mb` MiB come from its heap (not fresh pages from the OS), and it returns the
    heap's free top to the OS only past `trim_mb` MiB. A batch-64 decoding step allocates and frees
    temporaries of 0.1-0.4 MB (logits, their copies, the draw's CDF, SDPA's buffers); under glibc's
    own adaptive thresholds some came back as fresh pages, 17-47 page faults per step, with these
    none: process pairs, batch-64 compiled step 4.56 / 3.76 / 3.54 / 3.91 -> 3.71 / 3.80 / 3.73 / 3.73
    ms (experiments/generation/results.md). The cost: up to `trim_mb` of freed memory stays with the
    process. `unimodal sample --compile` (on CPU) and `bench sample` call it; a library caller decides for itself.
    Returns whether glibc took both settings: False where the C library is not glibc (nothing
    changed); under a preloaded malloc such as jemalloc glibc takes them and they change nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    done = [mallopt(m_mmap_threshold, mmap_mb << 20), mallopt(m_trim_threshold, trim_mb << 20)]
    return all(done)
