import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ljax import reductions


@pytest.mark.parametrize('n', [0, 1, 31, 63, 64, 65, 96, 1000, 4099, (1 << 18) + 33, 1 << 19])
def test_count_total_and_all_finite_match_numpy_at_every_size(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n).astype(np.float32)
    pred = x > 0.3
    assert int(jax.jit(reductions.count)(jnp.asarray(pred))) == int(pred.sum())
    if n:
        assert float(reductions.total(jnp.asarray(x), jnp.max)) == float(x.max())
        np.testing.assert_allclose(float(reductions.total(jnp.asarray(x))), float(x.sum()), rtol=1e-5, atol=1e-5)
    assert bool(reductions.all_finite(jnp.asarray(x)))
    for bad in (np.nan, np.inf, -np.inf):
        if n:
            y = x.copy()
            y[rng.integers(n)] = bad  # one bad entry anywhere, including the ragged tail
            assert not bool(jax.jit(reductions.all_finite)(jnp.asarray(y)))


def test_count_of_a_multidimensional_mask():
    pred = np.zeros((3, 5, 7, 11), bool)
    pred[1, 2, 3, 4] = pred[2, 4, 6, 10] = True
    assert int(reductions.count(jnp.asarray(pred))) == 2
