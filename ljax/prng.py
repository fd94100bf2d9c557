"""A search's random keys, made on the host: JAX's `random.split(random.key(seed))`, bit for bit,
without compiling JAX's Threefry (57 ms of XLA compilation on a 2-core CPU: a short search's
set-up waited on it).

`split_seed(seed)` is the key data of `jax.random.split(jax.random.key(seed))` (the default,
partitionable Threefry split: key i hashes the 64-bit counter i) for seeds in [0, 2**31); other
seeds go through JAX. The hash is Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011), as `jax._src.random.threefry2x32` computes it.
"""

from __future__ import annotations

import jax
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def threefry2x32(key, x0, x1) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32 (20 rounds) of the counters (x0, x1) (uint32 arrays) under `key` (two uint32)."""
    k = [np.uint32(key[0]), np.uint32(key[1])]
    ks = (k[0], k[1], k[0] ^ k[1] ^ _PARITY)
    x0 = np.asarray(x0, np.uint32) + ks[0]
    x1 = np.asarray(x1, np.uint32) + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def split_seed(seed: int, num: int = 2) -> np.ndarray:
    """[num, 2] uint32: the key data of `jax.random.split(jax.random.key(seed), num)`."""
    seed = int(seed)
    if not 0 <= seed < 2**31:
        return np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), num)))
    bits = threefry2x32((0, seed), np.zeros(num, np.uint32), np.arange(num, dtype=np.uint32))
    return np.stack(bits, axis=1)
