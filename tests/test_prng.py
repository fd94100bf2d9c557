"""`ljax.prng`: JAX's split of a seed's key, made on the host."""

import jax
import numpy as np
import pytest

from ljax import prng


@pytest.mark.parametrize('seed', [0, 1, 7, 42, 2**31 - 1, 2**31, -3])
def test_split_seed_is_jax_random_split(seed):
    for num in (2, 3):
        want = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), num)))
        got = prng.split_seed(seed, num)
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(got, want)


def test_threefry_known_answers():
    """Random123's known-answer vectors for Threefry-2x32 with 20 rounds."""
    pairs = [
        ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ]
    for key, (x0, x1), want in pairs:
        got = prng.threefry2x32(key, np.uint32([x0]), np.uint32([x1]))
        assert (int(got[0][0]), int(got[1][0])) == want
