"""core/allocator.py: freed memory stays in the process (glibc), checked by its resident size."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from livemb.core.allocator import hold_freed_memory
from livemb.core.settings import Settings

# In a child process (the setting is process-wide): RSS after touching a 64 MB buffer and after
# freeing it. numpy's data buffers come from malloc.
CHILD = """
import sys
import numpy as np
from livemb.core.allocator import hold_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

held = hold_freed_memory(int(sys.argv[1]))
a = np.ones(64 << 20, dtype=np.uint8)
with_buffer = rss_mb()
del a
print(held, with_buffer - rss_mb())
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def _freed_mb(limit_mb: int) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(limit_mb)], capture_output=True, text=True, check=True)
    held, freed = out.stdout.split()
    return held == "True", float(freed)


@glibc_only
def test_held_memory_is_not_returned_to_the_os():
    held, returned = _freed_mb(1024)
    assert held
    assert returned < 8, f"{returned:.0f} MB went back to the OS with the thresholds raised"


@glibc_only
def test_without_it_glibc_returns_a_large_buffer():
    held, returned = _freed_mb(0)  # 0: glibc's defaults (the buffer is mmap'd and unmapped on free)
    assert not held
    assert returned > 56, f"only {returned:.0f} of 64 MB went back to the OS under glibc's defaults"


def test_off_and_default():
    assert hold_freed_memory(0) is False
    assert Settings().malloc_hold_mb == 1024
