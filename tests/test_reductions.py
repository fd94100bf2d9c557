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


@pytest.mark.skipif(jax.default_backend() != 'cpu' or not reductions.native_kernels(),
                    reason="ljax's C++ kernels run on XLA:CPU, where they are built")
def test_native_all_finite_finds_one_bad_value_in_any_array_and_span():
    # several arrays, each cut into spans of 64K elements on the thread pool, with ragged tails
    rng = np.random.default_rng(0)
    sizes = [(1 << 18) + 33, 1 << 16, 5, (1 << 20) + 7]
    arrays = [rng.uniform(-3e38, 3e38, size=n).astype(np.float32) for n in sizes]
    arrays[2][:] = [np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-45, -0.0, 0.0]
    check = jax.jit(lambda *a: reductions.native_all_finite(a))
    assert bool(check(*arrays))
    for bad in (np.nan, np.inf, -np.inf):
        for i, n in enumerate(sizes):
            for where in (0, n - 1, int(rng.integers(n))):
                y = [a.copy() for a in arrays]
                y[i][where] = bad
                assert not bool(check(*y)), (bad, i, where)


def test_tree_all_finite_checks_every_leaf_of_any_dtype_and_size():
    rng = np.random.default_rng(1)
    tree = {'big': rng.normal(size=(1 << 18) + 3).astype(np.float32),
            'small': rng.normal(size=(7, 3)).astype(np.float32),
            'half': rng.normal(size=(1 << 18) + 3).astype(jnp.bfloat16)}
    check = jax.jit(reductions.tree_all_finite)
    assert bool(check(tree))
    for name in tree:
        y = dict(tree)
        y[name] = y[name].copy()
        y[name].reshape(-1)[-1] = np.nan
        assert not bool(check(y)), name
