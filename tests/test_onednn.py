"""ljax.models.onednn: oneDNN's convolution through XLA's FFI equals lax.conv_general_dilated
(values, input and weight gradients), covers only what it should, and builds from a clean cache."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ljax.models import layers, onednn

DN = ('NHWC', 'HWIO', 'NHWC')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
    not (sys.platform == 'linux' and os.uname().machine == 'x86_64'),
    reason='the onednn wheels of ljax[cpu] exist for Linux x86-64 only',
)
def test_available_here():
    # CI and the README install 'ljax[cpu]': a broken build must fail here, not silently fall
    # back to XLA's slower kernels.
    assert onednn.available(), onednn.reason()


def _inputs(x_shape, w_shape, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32) / np.sqrt(np.prod(w_shape[:-1]))
    return x, w, kg


def _value_and_grads(conv, x, w, kg):
    y, vjp = jax.vjp(conv, x, w)
    return (y, *vjp(jax.random.normal(kg, y.shape, jnp.float32)))


def _close(a, b):
    # float32 sums of many terms: absolute errors scale with the largest value
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


def _pairs(padding, x_shape, w_shape, strides, dilation):
    window = [(k - 1) * d + 1 for k, d in zip(w_shape[:2], dilation)]
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(x_shape[1:3], window, strides, padding))
    return padding


CASES = [
    # (x shape, w shape, strides, padding, dilation)
    ((2, 8, 8, 3), (3, 3, 3, 5), (1, 1), 'SAME', (1, 1)),
    ((3, 9, 7, 4), (3, 3, 4, 6), (2, 2), 'SAME', (1, 1)),
    ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # 7/2: a row left over
    ((2, 9, 9, 4), (3, 3, 4, 6), (2, 1), 'VALID', (1, 1)),
    ((2, 10, 11, 3), (5, 3, 3, 4), (1, 2), ((2, 0), (0, 3)), (1, 1)),  # asymmetric
    ((2, 12, 12, 3), (3, 3, 3, 4), (1, 1), 'SAME', (2, 2)),  # dilated kernel
    ((1, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), (1, 1)),  # a ResNet-50 stem
    ((2, 6, 6, 16), (1, 1, 16, 8), (2, 2), 'VALID', (1, 1)),  # 1x1, strided
    ((2, 2, 2, 8), (3, 3, 8, 8), (1, 1), 'SAME', (1, 1)),  # tiny map
]


@pytest.mark.parametrize('x_shape, w_shape, strides, padding, dilation', CASES)
def test_equals_lax(x_shape, w_shape, strides, padding, dilation):
    x, w, kg = _inputs(x_shape, w_shape)
    pads = _pairs(padding, x_shape, w_shape, strides, dilation)

    def ref(x, w):
        return lax.conv_general_dilated(
            x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=DN
        )

    def fast(x, w):
        return onednn.conv(x, w, strides, pads, dilation)

    got = jax.jit(lambda x, w: _value_and_grads(fast, x, w, kg))(x, w)
    want = jax.jit(lambda x, w: _value_and_grads(ref, x, w, kg))(x, w)
    for a, b, what in zip(got, want, ('output', 'd/dx', 'd/dw')):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=what)
    # and through layers.conv_general_dilated, as nn.Conv calls it
    forced = jax.jit(
        lambda x, w: layers.conv_general_dilated(
            x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=DN, method='onednn'
        )
    )
    assert 'ljax_onednn_conv_forward' in str(jax.jit(forced).lower(x, w).as_text())
    np.testing.assert_allclose(np.asarray(forced(x, w)), np.asarray(want[0]), rtol=1e-5, atol=1e-5)


def test_vmap_grad_and_pmap():
    x, w, kg = _inputs((3, 2, 8, 8, 4), (3, 3, 4, 5))
    pads = ((1, 1), (1, 1))

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w)))

    fast = lambda x, w: onednn.conv(x, w, (1, 1), pads)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=DN)
    # vmap over a leading axis (the FFI call runs once per element), with its gradient
    g_fast = jax.jit(jax.vmap(jax.grad(lambda x, w: loss(fast, x, w), 1), (0, None)))(x, w)
    g_ref = jax.jit(jax.vmap(jax.grad(lambda x, w: loss(ref, x, w), 1), (0, None)))(x, w)
    _close(g_fast, g_ref)
    # pmap over the virtual CPU devices (conftest makes 4), each device its own call, at the
    # same time: with oneDNN's shared scratchpad this corrupted the results (errors of 50 here)
    n = jax.local_device_count()
    xs = jnp.broadcast_to(x[0], (n, *x.shape[1:])) * jnp.arange(1, n + 1)[:, None, None, None, None]
    got = jax.pmap(jax.grad(lambda x, w: loss(fast, x, w), 1), in_axes=(0, None))(xs, w)
    want = jax.pmap(jax.grad(lambda x, w: loss(ref, x, w), 1), in_axes=(0, None))(xs, w)
    _close(got, want)


@pytest.mark.parametrize(
    'x_dtype, kwargs',
    [
        (jnp.bfloat16, {}),
        (jnp.float32, dict(feature_group_count=2)),
        (jnp.float32, dict(lhs_dilation=(2, 2))),
        (jnp.float32, dict(padding=((-1, 0), (0, 0)))),
        (jnp.float32, dict(dimension_numbers=('NCHW', 'OIHW', 'NCHW'))),
    ],
)
def test_what_it_does_not_cover_runs_lax(x_dtype, kwargs):
    kwargs = {'padding': ((1, 1), (1, 1)), 'dimension_numbers': DN, **kwargs}
    groups = kwargs.get('feature_group_count', 1)
    if kwargs['dimension_numbers'] == DN:
        x, w, _ = _inputs((2, 6, 6, 4), (3, 3, 4 // groups, 6))
    else:
        x, w, _ = _inputs((2, 4, 6, 6), (6, 4, 3, 3))
    x, w = x.astype(x_dtype), w.astype(x_dtype)
    for method in ('auto', 'onednn'):
        fn = jax.jit(
            lambda x, w: layers.conv_general_dilated(x, w, (1, 1), method=method, **kwargs)
        )
        assert 'ljax_onednn' not in fn.lower(x, w).as_text(), (method, kwargs)
        want = lax.conv_general_dilated(x, w, (1, 1), **kwargs)
        np.testing.assert_array_equal(np.asarray(fn(x, w)), np.asarray(want))


def _python(code, **env):
    return subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
        timeout=600,
    )


def test_builds_into_an_empty_cache_and_falls_back_with_a_reason(tmp_path):
    probe = """
        import jax, jax.numpy as jnp, numpy as np
        from jax import lax
        from ljax.models import onednn, layers
        print('available', onednn.available(), onednn.reason())
        x = jnp.ones((1, 5, 5, 2)); w = jnp.ones((3, 3, 2, 3))
        y = jax.jit(lambda x, w: layers.conv_general_dilated(
            x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, w)
        want = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        print('equal', bool(np.allclose(y, want)))
    """
    cache = tmp_path / 'cache'
    built = _python(probe, LJAX_CACHE=str(cache))
    assert built.returncode == 0, built.stderr[-2000:]
    assert 'available True' in built.stdout and 'equal True' in built.stdout
    assert [p.suffix for p in cache.iterdir()] == ['.so']  # one library, no temporary left
    off = _python(probe, LJAX_CACHE=str(tmp_path / 'off'), LJAX_ONEDNN='0')
    assert 'available False turned off by LJAX_ONEDNN=0' in off.stdout, off.stderr[-2000:]
    assert 'equal True' in off.stdout
    assert not (tmp_path / 'off').exists()
    assert "XLA:CPU's own kernels" not in off.stderr  # the user's choice: no warning
    no_cxx = _python(probe, LJAX_CACHE=str(tmp_path / 'nocxx'), CXX='/nonexistent/g++')
    assert 'available False no C++ compiler' in no_cxx.stdout, no_cxx.stderr[-2000:]
    assert 'equal True' in no_cxx.stdout
    assert no_cxx.stderr.count("ljax: convolutions run on XLA:CPU's own kernels") == 1
