"""Keep freed memory in the process instead of handing it back to the OS (glibc malloc).

Why: torch allocates CPU tensors with malloc. glibc serves a request above its mmap threshold
(128 KiB at start, raised dynamically up to 32 MiB) with a fresh mmap and unmaps it on free, and
trims the heap's free top above 128 KiB. A training step allocates and frees tens of (n, K)
tensors of 10-60 MB (the sampled log Z's (n, 2048), the slot MLP's (n, M, hidden)), so every one
of them came back as fresh pages: a page fault per 4 KiB and the kernel zeroing them, several times
the arithmetic's own cost. With both thresholds at 1 GiB the heap keeps and reuses that memory:
one training step of `gru` on the 1M-event synthetic log fell from 117 to 66 ms (2-core AMD
EPYC, docs/MODELS.md "Memory traffic of a training step"). The price is a resident size that
stays near its peak after a large step (docs/RUNBOOK.md).

Settings.malloc_hold_mb sets the limit (0: glibc's defaults). Elsewhere than glibc (musl, macOS)
this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("livemb.allocator")

# mallopt parameters (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def hold_freed_memory(limit_mb: int) -> bool:
    """Raise glibc's mmap and trim thresholds to `limit_mb` MiB for this process.

    True when both were set; False where the C library is not glibc, limit_mb is 0, or glibc
    refused a value (logged)."""
    if limit_mb <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as e:  # a glibc without the usual soname: keep the defaults
        log.debug("malloc tuning skipped: %s", e)
        return False
    value = ctypes.c_int(min(limit_mb << 20, 2**31 - 1))  # mallopt takes an int
    ok = all([libc.mallopt(param, value) == 1 for param in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)])  # a list: both are set
    if not ok:
        log.warning("glibc refused malloc thresholds of %d MiB; keeping its defaults", limit_mb)
    return ok
