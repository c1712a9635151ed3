"""Keep freed memory in the process while training and benchmarking on the CPU.

glibc hands every big freed block (activations, gradients) back to the kernel and maps it again
at the next step, so a CPU training step spends much of its time in page faults. Measured here
(2 cores, torch 2.14.1, MobileNetV2 width 0.5, CIFAR stem): a batch-128 training step 883 ms ->
478 ms (NCHW) and 770 ms -> 338 ms (channels_last), 420,000 -> 0 minor faults per step; a quick
profile run 38.6 s -> 34.1 s of training with the same accuracy to the digit. The numbers are the
same either way (the allocator decides where memory lives, not what is computed); the cost is that
the process keeps its peak memory until it exits.

Called by the code that trains (``mnv2lib.runs.runner.run_experiment``) and by the speed benchmark;
a library import alone changes nothing. ``MNV2_ALLOCATOR=system`` leaves the allocator alone.
Written by hand (two ``mallopt`` calls through ctypes): jemalloc or tcmalloc would do the same but
only when preloaded into the interpreter before it starts, which a notebook kernel or a Ray
worker cannot count on.
"""
from __future__ import annotations

import ctypes
import os

ENV = "MNV2_ALLOCATOR"
CHOICES = ("steady", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
_state: str | None = None


def requested() -> str:
    """The allocator mode ``$MNV2_ALLOCATOR`` asks for (default ``steady``); a clear error for others."""
    value = os.environ.get(ENV, "steady").strip().lower() or "steady"
    if value not in CHOICES:
        raise ValueError(f"{ENV}: got {os.environ[ENV]!r}; allowed: {', '.join(CHOICES)}")
    return value


def keep_freed_memory() -> str:
    """Switch glibc to keeping freed memory (no mmap for big blocks, no trimming), once per process.

    Returns the mode now in force: ``"steady"``, or ``"system"`` when asked for by ``$MNV2_ALLOCATOR``
    or when the C library is not glibc (macOS, Windows, musl: nothing is changed)."""
    global _state
    if _state is not None:
        return _state
    mode = requested()
    if mode == "steady":
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError):
            ok = False
        mode = "steady" if ok else "system"
    _state = mode
    return mode


def mode() -> str:
    """``"steady"`` once :func:`keep_freed_memory` switched this process, else ``"system"``."""
    return _state or "system"
