"""Handing freed memory back to the operating system between phases of work.

glibc's malloc serves blocks below its mmap threshold from its heap, and that threshold rises to 32 MB as
large blocks are freed; the heap's free pages then stay resident. After a training step or an evaluation
batch the process holds about a gigabyte it no longer uses, which the next phase's peak stacks on.
``malloc_trim`` returns those pages; it costs milliseconds, so it runs between steps and batches only.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is another one (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:  # the process's own symbols: ctypes.util.find_library would fork a subprocess as large as this one
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Return the heap's free pages to the operating system (glibc only; elsewhere nothing happens)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
