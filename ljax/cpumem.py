"""Step temporaries on CPU that stay paged in from one step to the next.

XLA:CPU allocates a program's temporaries (the forward's activations, the masked weights, the
gradients) afresh with `malloc` on every call, and glibc serves a block over its mmap threshold
(at most 32 MB) with a fresh `mmap`: the kernel then zeroes and maps every 4 KiB page again at
first touch. The search step on the ResNet-50 stand-in (32x32, batch 16) holds 141.8 MB of
temporaries, and took 35k minor page faults a step, against 1k for the plain flax step (29.8 MB,
under the threshold). Two settings, on CPU only, keep those pages:

- `keep_freed_memory()`: glibc's `mallopt` serves no block with mmap (`M_MMAP_MAX` 0) and neither
  trims nor unmaps the memory a step frees (`M_TRIM_THRESHOLD`, `M_TOP_PAD`), so the next step
  reuses it. The process keeps its peak memory mapped, as a caching allocator would. A threshold
  fixed at its largest (32 MB) is not enough: a single activation can be larger (VGG-19 at batch
  128: 32 MiB, and 512 MiB of faults a step; 6-9% of its step).
- `compiler_options()`: `Parallel` compiles its one-device programs with the temporaries split into
  heaps of at most 56 MB (XLA's `xla_multiheap_size_constraint_per_heap`). XLA runs a program on a
  thread other than the main one, whose glibc arena grows in heaps of 64 MB: a larger block is
  mapped afresh whatever the settings. A single buffer over 56 MB still is (and XLA warns that it
  exceeds the heap's size).

`LJAX_MALLOPT=0` turns both off; C libraries other than glibc (musl, macOS) are left alone.

Measured with `python benchmarks/speed.py --parts plain` (docs/RESULTS.md, Speed).
"""

from __future__ import annotations

import ctypes
import os

ENV_SWITCH = 'LJAX_MALLOPT'
HEAP_BYTES = 56 << 20

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_SETTINGS = (
    (_M_MMAP_THRESHOLD, 32 << 20), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20),
)

_applied: bool | None = None


def enabled() -> bool:
    """Whether the settings apply (`LJAX_MALLOPT` is not '0')."""
    return os.environ.get(ENV_SWITCH, '1') != '0'


def compiler_options() -> dict | None:
    """XLA options for a CPU program's temporaries (None when switched off)."""
    return {'xla_multiheap_size_constraint_per_heap': HEAP_BYTES} if enabled() else None


def keep_freed_memory() -> bool:
    """Applies the glibc settings above once per process; whether they are in force (False where
    `LJAX_MALLOPT=0` or the C library is not glibc)."""
    global _applied
    if _applied is None:
        try:
            libc = ctypes.CDLL(None)  # the C library this process already runs on
        except (OSError, TypeError):  # Windows: no such handle
            libc = None
        _applied = enabled() and hasattr(libc, 'gnu_get_libc_version')  # glibc's mallopt only
        if _applied:
            libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
    return _applied
