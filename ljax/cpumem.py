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
  thread other than the main one (JAX's asynchronous CPU dispatch), whose glibc arena grows in
  heaps of 64 MB: a larger block is mapped afresh whatever the settings. Where one value is
  larger than 56 MB, the heaps take its size (sized on the program's first call), and those over
  64 MB are mapped afresh.

`LJAX_MALLOPT=0` turns both off; C libraries other than glibc (musl, macOS) are left alone.

Measured with `python benchmarks/speed.py --parts plain` (docs/RESULTS.md, Speed).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

ENV_SWITCH = 'LJAX_MALLOPT'
HEAP_BYTES = 56 << 20

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))

_applied: bool | None = None


def enabled() -> bool:
    """Whether the settings apply (`LJAX_MALLOPT` is not '0')."""
    return os.environ.get(ENV_SWITCH, '1') != '0'


def compiler_options(jaxpr=None) -> dict | None:
    """XLA options for a CPU program's temporaries (None when switched off): heaps of HEAP_BYTES,
    or of the largest value in `jaxpr` (a `jax.extend.core` (Closed)Jaxpr) where that is larger.

    A buffer over the limit gets a heap of its own all the same, but XLA warns on stderr for each
    at every compile (396 lines for VGG-19's search at batch 256, 1,829 for ResNet-50 at 224x224
    batch 32). Heaps that large are mapped afresh each step (2-4% of that VGG-19 step, measured).
    """
    if not enabled():
        return None
    largest = 0 if jaxpr is None else largest_value_bytes(jaxpr)
    return {'xla_multiheap_size_constraint_per_heap': max(HEAP_BYTES, largest)}


def largest_value_bytes(jaxpr) -> int:
    """The bytes of the largest value a jaxpr (and each jaxpr in its equations: branches, loop
    bodies, nested programs) computes."""
    largest, todo = 0, [jaxpr]
    while todo:
        j = todo.pop()
        j = getattr(j, 'jaxpr', j)  # a ClosedJaxpr's own (jax < 0.12)
        for eqn in j.eqns:
            for v in eqn.outvars:
                shape, dtype = getattr(v.aval, 'shape', None), getattr(v.aval, 'dtype', None)
                if shape is not None and dtype is not None:
                    size = int(np.prod(shape, dtype=np.int64)) * getattr(dtype, 'itemsize', 0)
                    largest = max(largest, size)
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(getattr(item, 'jaxpr', item), 'eqns'):
                        todo.append(item)
    return largest


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
