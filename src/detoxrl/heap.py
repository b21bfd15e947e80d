"""Keeping the resident set small: freed memory handed back between phases of work, and two limits on growth.

glibc's malloc serves blocks below its mmap threshold from its heap, and that threshold rises to 32 MB as
large blocks are freed; the heap's free pages then stay resident. After a training step or an evaluation
batch the process holds about a gigabyte it no longer uses, which the next phase's peak stacks on.
``malloc_trim`` returns those pages; it costs milliseconds, so it runs between steps and batches only.

Two more settings keep a long run's resident set from growing (:func:`limit_heap_growth`):

* Within a phase the heap fragments: a decoding step's vocabulary-sized temporaries (128 x 49,152 floats,
  25 MB) land between blocks that outlive them, and the next step's no longer fit the holes; an evaluation
  batch's peak swung by a gigabyte with the order of a few allocations. Blocks of 16 MB and more are mapped
  and unmapped whole instead, never fragmenting the heap.
* oneDNN, which multiplies bf16 matrices on CPU, keeps up to 1,024 kernels compiled for the shapes it saw;
  every prompt length is a new shape, and their cache held ~0.5 GB after 16 training steps. 64 keep the
  decoding steps' shapes, which repeat.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys


@functools.cache
def _glibc(name: str, argtypes: tuple, restype):
    """glibc's function ``name`` (malloc_trim, mallopt), or None where the C library is another one (macOS,
    Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:  # the process's own symbols: ctypes.util.find_library would fork a subprocess as large as this one
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), restype
    return function


LARGE_BLOCK_BYTES = 16 * 2**20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
ONEDNN_KERNELS = 64


@functools.cache
def limit_heap_growth() -> None:
    """Map blocks of 16 MB and more (glibc) and keep 64 of oneDNN's compiled kernels, once per process and
    before oneDNN's first kernel; what the user set (``MALLOC_MMAP_THRESHOLD_``,
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) stays."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_KERNELS))  # read at oneDNN's first use
    mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if mallopt is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)


def release_freed_memory() -> None:
    """Return the heap's free pages to the operating system (glibc only; elsewhere nothing happens)."""
    trim = _glibc("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    if trim is not None:
        trim(0)
