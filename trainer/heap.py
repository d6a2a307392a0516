"""The process heap of a CPU training run: reuse what the last step freed (glibc; docs/benchmarks.md §1).

By default glibc serves large tensors with fresh mmaps and gives freed heap back to the OS, so every
training step faults in (and the kernel zeroes) its activations again: ~6 % of a digits step's CPU
time as system time, plus memory bandwidth two concurrent trials share. The thresholds are global
to the process, so they also hold for the arena glibc gives a Ray trial's non-main thread
(bench/heap_reuse.py compares the variants: page faults stay low without a single arena).
`heap_env` therefore does not ask for one arena (MALLOC_ARENA_MAX=1), which in a Ray worker would
make the training thread share its arena lock with Ray's own threads (docs/benchmarks.md §2).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20  # glibc's maximum: blocks up to 32 MiB come from the heap, not fresh mmaps
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap instead of returning it to the OS
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameter numbers
_configured: bool | None = None


def keep_freed_memory() -> bool:
    """Set this process's heap thresholds now (glibc mallopt); True when set, False elsewhere (macOS, musl)."""
    global _configured
    if _configured is None:
        _configured = False
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
        if mallopt is not None:
            ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            _configured = ok and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        log.debug("glibc heap kept between steps: %s", _configured)
    return _configured


def heap_env() -> dict[str, str]:
    """Environment for processes about to start that will train (Ray workers): the same thresholds
    as `keep_freed_memory`, in force from the process's first allocation."""
    return {
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    }
