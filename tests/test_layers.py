"""ljax.models.layers: im2col convolution equals lax.conv_general_dilated (values and gradients),
dispatch per lowering platform and shape (oneDNN, im2col or XLA on CPU; XLA elsewhere), and the
shipped models' parameters are unchanged. oneDNN's own equality tests: tests/test_onednn.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ljax.models import ResNet50, ResNetCifar, VGG19Cifar, layers, onednn

DN = ('NHWC', 'HWIO', 'NHWC')
EXPLICIT = ((1, 2), (0, 1))


def _inputs(shape, kernel, dtype, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape, jnp.float32)
    w = jax.random.normal(kw, kernel, jnp.float32) / np.sqrt(np.prod(kernel[:-1]))
    return x.astype(dtype), w.astype(dtype)


def _value_and_grads(conv, x, w):
    y, vjp = jax.vjp(conv, x, w)
    g = jax.random.normal(jax.random.key(7), y.shape, jnp.float32).astype(y.dtype)
    return (y, *vjp(g))


def _assert_same_conv(fast, ref, x, w, dtype):
    tol = {'rtol': 1e-5, 'atol': 1e-5} if dtype == jnp.float32 else {'rtol': 3e-2, 'atol': 6e-2}
    got = jax.jit(lambda x, w: _value_and_grads(fast, x, w))(x, w)
    want = jax.jit(lambda x, w: _value_and_grads(ref, x, w))(x, w)
    for a, b, what in zip(got, want, ('output', 'd/dx', 'd/dw')):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=what, **tol
        )


@pytest.mark.slow  # 37 convolution shapes, each compiled
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('padding', ['SAME', 'VALID', EXPLICIT])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('k', [1, 3, 7])
def test_im2col_equals_lax(k, stride, padding, dtype):
    x, w = _inputs((2, 11, 10, 3), (k, k, 3, 4), dtype)
    kwargs = dict(window_strides=(stride, stride), padding=padding, dimension_numbers=DN)
    _assert_same_conv(
        lambda x, w: layers.im2col_conv(x, w, **kwargs),
        lambda x, w: lax.conv_general_dilated(x, w, **kwargs),
        x,
        w,
        dtype,
    )


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(window_strides=(1, 2), padding='SAME', rhs_dilation=(2, 2)),
        dict(window_strides=(2, 1), padding=((2, 0), (-1, 1))),  # negative padding crops
        dict(window_strides=(1, 1), padding='SAME', dimension_numbers=('NCHW', 'OIHW', 'NCHW')),
        dict(window_strides=(1, 1), padding='SAME', dimension_numbers=('NHWC', 'OIHW', 'NCHW')),
    ],
)
def test_im2col_dilation_padding_and_layouts(kwargs):
    dn = kwargs.get('dimension_numbers', DN)
    lhs = {'N': 2, 'H': 9, 'W': 8, 'C': 3}
    rhs = {'H': 3, 'W': 3, 'I': 3, 'O': 4}
    x, w = _inputs(tuple(lhs[c] for c in dn[0]), tuple(rhs[c] for c in dn[1]), jnp.float32)
    kwargs = {'dimension_numbers': DN, **kwargs}
    _assert_same_conv(
        lambda x, w: layers.im2col_conv(x, w, **kwargs),
        lambda x, w: lax.conv_general_dilated(x, w, **kwargs),
        x,
        w,
        jnp.float32,
    )


def test_one_dimensional_convolution():
    x, w = _inputs((2, 13, 3), (5, 3, 4), jnp.float32)
    kwargs = dict(window_strides=(2,), padding='SAME', dimension_numbers=('NWC', 'WIO', 'NWC'))
    _assert_same_conv(
        lambda x, w: layers.conv_general_dilated(x, w, **kwargs, method='im2col'),
        lambda x, w: lax.conv_general_dilated(x, w, **kwargs),
        x,
        w,
        jnp.float32,
    )


def _primitives(fn, *args):
    return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).eqns}


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(feature_group_count=2),
        dict(lhs_dilation=(2, 2)),  # a transposed convolution
    ],
)
def test_unsupported_convolutions_fall_back_to_lax(kwargs):
    x, w = _inputs((2, 6, 6, 4), (3, 3, 4 // kwargs.get('feature_group_count', 1), 6), jnp.float32)

    def fast(x, w):
        return layers.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, method='im2col', **kwargs
        )

    assert 'conv_general_dilated' in _primitives(fast, x, w)
    assert 'dot_general' not in _primitives(fast, x, w)
    ref = lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, **kwargs
    )
    np.testing.assert_array_equal(np.asarray(fast(x, w)), np.asarray(ref))


def _lowered_text(fn, platform, *args):
    # ljax's oneDNN FFI targets have no export compatibility guarantee; these tests only read
    # the lowered text.
    checks = [
        jax.export.DisabledSafetyCheck.custom_call(name)
        for name, _ in onednn._TARGETS.values()
    ]
    exported = jax.export.export(jax.jit(fn), platforms=(platform,), disabled_checks=checks)
    return exported(*args).mlir_module()


@pytest.mark.parametrize(
    'x_shape, w_shape, on_cpu',
    [
        ((2, 8, 8, 16), (1, 1, 16, 8), 'im2col'),  # 1x1 kernel
        ((2, 2, 2, 16), (3, 3, 16, 8), 'im2col'),  # VGG-19's last block: a 2x2 output map
        ((2, 8, 8, 16), (3, 3, 16, 8), 'onednn'),  # a large map: oneDNN's kernels
    ],
)
@pytest.mark.parametrize('with_grad', [False, True])
def test_auto_dispatch_by_platform_and_shape(x_shape, w_shape, on_cpu, with_grad):
    x, w = _inputs(x_shape, w_shape, jnp.float32)

    def conv(x, w):
        return layers.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DN)

    def grads(x, w):
        return jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), (0, 1))(x, w)

    assert layers.cpu_method(x, w, (1, 1), 'SAME', dimension_numbers=DN) == on_cpu
    fn = grads if with_grad else conv
    for platform in ('cpu', 'cuda', 'tpu'):
        text = _lowered_text(fn, platform, x, w)
        method = on_cpu if platform == 'cpu' else 'xla'
        assert ('stablehlo.convolution' in text) == (method == 'xla'), platform
        assert ('stablehlo.dot_general' in text) == (method == 'im2col'), platform
        # forward, and with the gradient also the input and the weight gradient
        n_ffi = text.count('custom_call @ljax_onednn_conv')
        assert n_ffi == ((3 if with_grad else 1) if method == 'onednn' else 0), platform


def test_auto_without_onednn_keeps_xla_on_large_maps(monkeypatch):
    monkeypatch.setattr(layers.onednn, 'available', lambda: False)
    x, w = _inputs((2, 8, 8, 16), (3, 3, 16, 8), jnp.float32)
    assert layers.cpu_method(x, w, (1, 1), 'SAME', dimension_numbers=DN) == 'xla'
    text = _lowered_text(
        lambda x, w: layers.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DN),
        'cpu', x, w,
    )  # fmt: skip
    assert 'stablehlo.convolution' in text and 'ljax_onednn' not in text


def test_auto_runs_and_matches_on_this_backend():
    x, w = _inputs((2, 2, 2, 16), (3, 3, 16, 8), jnp.float32)
    auto = lambda x, w: layers.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DN)
    got = jax.jit(auto)(x, w)
    want = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DN)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shape_rule():
    rule = layers.im2col_is_faster
    assert rule((8, 56, 56, 64), (1, 1, 64, 256), (1, 1), 'VALID', None, DN)
    assert rule((8, 56, 56, 256), (1, 1, 256, 512), (2, 2), 'VALID', None, DN)
    assert rule((64, 2, 2, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), None, DN)
    assert not rule((64, 4, 4, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), None, DN)
    assert not rule((64, 32, 32, 32), (3, 3, 32, 32), (1, 1), ((1, 1), (1, 1)), None, DN)
    # where oneDNN runs them, 1x1 kernels on maps of 100 pixels or more go there
    assert not rule((8, 56, 56, 64), (1, 1, 64, 256), (1, 1), 'VALID', None, DN, onednn=True)
    assert not rule((8, 20, 20, 256), (1, 1, 256, 512), (2, 2), 'VALID', None, DN, onednn=True)
    assert rule((8, 18, 18, 256), (1, 1, 256, 512), (2, 2), 'VALID', None, DN, onednn=True)  # 9x9
    assert rule((8, 7, 7, 512), (1, 1, 512, 2048), (1, 1), 'VALID', None, DN, onednn=True)
    assert rule((64, 2, 2, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), None, DN, onednn=True)


def test_unknown_method_raises():
    x, w = _inputs((1, 4, 4, 2), (1, 1, 2, 2), jnp.float32)
    with pytest.raises(ValueError, match='method'):
        layers.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DN, method='fast')


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_conv_module_is_nn_conv_with_a_faster_primitive(dtype):
    kwargs = dict(features=8, kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)), dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (2, 3, 3, 4), jnp.float32)  # 2x2 output: im2col
    ours, flax_conv = layers.Conv(**kwargs), nn.Conv(**kwargs)
    v1, v2 = ours.init(jax.random.key(0), x), flax_conv.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, v1, v2)  # same names, shapes and values
    cpu_text = _lowered_text(lambda x: ours.apply(v1, x), 'cpu', x)
    assert 'stablehlo.dot_general' in cpu_text and 'stablehlo.convolution' not in cpu_text
    assert 'stablehlo.convolution' in _lowered_text(lambda x: ours.apply(v1, x), 'cuda', x)
    y1, y2 = jax.jit(ours.apply)(v1, x), jax.jit(flax_conv.apply)(v2, x)
    assert y1.dtype == y2.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(
        np.asarray(y1, np.float32), np.asarray(y2, np.float32), atol=tol, rtol=tol
    )


def _with_flax_conv(monkeypatch):
    """Points the shipped models back at flax's own nn.Conv (what they used before layers.Conv)."""
    from ljax.models import resnet50, resnet_cifar, vgg

    for module in (resnet50, resnet_cifar, vgg):
        monkeypatch.setattr(module, 'Conv', nn.Conv)


@pytest.mark.slow  # three shipped models compiled with and without im2col
@pytest.mark.parametrize(
    'model, shape',
    [
        (VGG19Cifar(num_classes=10), (2, 32, 32, 3)),
        (ResNetCifar(widths=(32, 64, 128), num_classes=10), (2, 32, 32, 3)),
        # 64x64: a 2x2 last stage, so train-mode BatchNorm does not divide by a near-zero variance.
        (ResNet50(num_classes=10), (4, 64, 64, 3)),
    ],
)
def test_shipped_models_params_unchanged_and_logits_match(model, shape, monkeypatch):
    x = jax.random.normal(jax.random.key(3), shape)
    init = lambda x: model.init_with_output(jax.random.key(0), x, train=False)
    fast_logits, fast_vars = jax.jit(init)(x)
    fast_train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0])(
        fast_vars, x
    )
    _with_flax_conv(monkeypatch)
    ref_logits, ref_vars = jax.jit(init)(x)
    ref_train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0])(
        ref_vars, x
    )
    assert jax.tree.structure(fast_vars) == jax.tree.structure(ref_vars)
    jax.tree.map(np.testing.assert_array_equal, fast_vars, ref_vars)
    np.testing.assert_allclose(fast_logits, ref_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast_train, ref_train, rtol=1e-4, atol=1e-4)
