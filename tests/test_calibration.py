import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from ljax import calibration
from ljax.modelfn import model_fn
from ljax.models import get_model
from tests.test_sparsity import ControlFlow, Handwritten, PatchesConv


def _rand(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _norm(a, axes):
    return np.sqrt(np.sum(np.square(np.asarray(a, np.float64)), axis=axes))


def test_linen_mlp_matches_hidden_activations():
    model = get_model('mlp', 3, hidden=(6, 5))
    x = _rand(0, (7, 2, 2, 1))
    v = model.init(jax.random.key(0), x, train=False)
    # non-trivial running statistics, so the hidden inputs depend on them (eval mode)
    stats = jax.tree.map(lambda a: jnp.abs(_rand(1, a.shape)) + 0.5, v['batch_stats'])
    v = {'params': v['params'], 'batch_stats': stats}
    fn = model_fn(model, v, x)
    batches = [(x[:4], np.zeros(4)), (x[4:], np.zeros(3))]  # two batches, two shapes
    names = ['dense1/kernel', 'dense2/kernel', 'classifier/kernel']
    got = calibration.input_norms(fn, fn.variables, batches, names)
    _, inter = model.apply(v, x, train=False, capture_intermediates=True)
    h1 = nn.relu(inter['intermediates']['bn1']['__call__'][0])
    h2 = nn.relu(inter['intermediates']['bn2']['__call__'][0])
    want = [_norm(x.reshape(7, -1), 0), _norm(h1, 0), _norm(h2, 0)]
    for n, w in zip(names, want):
        assert got[n].dtype == jnp.float32 and got[n].shape == w.shape
        np.testing.assert_allclose(got[n], w, rtol=1e-5)


class SmallConv(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(nn.Conv(4, (3, 3), name='c1')(x))
        y = nn.relu(nn.Conv(8, (3, 3), strides=2, padding='VALID', name='c2')(h))
        return nn.Dense(2, name='head')(y.mean((1, 2)))


def test_conv_norms_are_per_input_channel():
    model, x = SmallConv(), _rand(2, (3, 9, 9, 3))
    v = model.init(jax.random.key(0), x)
    fn = model_fn(model, v, x)
    names = ['c1/kernel', 'c2/kernel', 'head/kernel']
    got = calibration.input_norms(fn, fn.variables, [x[:2], x[2:]], names)
    p = v['params']
    dn = ('NHWC', 'HWIO', 'NHWC')
    h = lax.conv_general_dilated(x, p['c1']['kernel'], (1, 1), 'SAME', dimension_numbers=dn)
    h = nn.relu(h + p['c1']['bias'])
    y = lax.conv_general_dilated(h, p['c2']['kernel'], (2, 2), 'VALID', dimension_numbers=dn)
    y = nn.relu(y + p['c2']['bias'])
    np.testing.assert_allclose(got['c1/kernel'], _norm(x, (0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(got['c2/kernel'], _norm(h, (0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(got['head/kernel'], _norm(y.mean((1, 2)), 0), rtol=1e-5)


def test_convolutions_staged_per_platform_are_measured_like_plain_ones():
    """ljax.models.layers.Conv stages oneDNN (3x3 here) or im2col (1x1, tiny maps) for CPU and
    XLA's convolution elsewhere (`lax.platform_dependent`): the norms equal those of the same
    model built with nn.Conv."""
    from ljax.models import layers

    class Staged(nn.Module):
        conv: type = layers.Conv

        @nn.compact
        def __call__(self, x, train=False):
            h = nn.relu(self.conv(4, (3, 3), name='c1')(x))
            h = nn.relu(self.conv(6, (1, 1), name='c2')(h))
            y = nn.relu(self.conv(8, (3, 3), strides=4, padding='VALID', name='c3')(h))  # 2x2
            return nn.Dense(2, name='head')(y.mean((1, 2)))

    x = _rand(4, (3, 9, 9, 3))
    names = ['c1/kernel', 'c2/kernel', 'c3/kernel', 'head/kernel']
    norms = {}
    for conv in (layers.Conv, nn.Conv):
        model = Staged(conv=conv)
        v = model.init(jax.random.key(0), x)
        fn = model_fn(model, v, x)
        norms[conv] = calibration.input_norms(fn, fn.variables, [x[:2], x[2:]], names)
    jaxpr = str(jax.make_jaxpr(lambda v, x: Staged().apply(v, x))(v, x))
    assert jaxpr.count('branches_platforms') == 3  # every kernel went through a staged switch
    for n in names:
        np.testing.assert_allclose(norms[layers.Conv][n], norms[nn.Conv][n], rtol=1e-6, err_msg=n)


def test_patches_convolution_maps_back_to_input_channels():
    """The kernel is transposed to (in, kh, kw, out) and reshaped to (27, 8) before the matmul
    with lax patches (features ordered (in, kh, kw)): each input channel gets the mean over its
    9 offsets of the patch-feature sums of squares."""
    model, x = PatchesConv(), _rand(3, (2, 6, 6, 3))
    v = model.init(jax.random.key(0), x)
    fn = model_fn(model, v, x)
    got = calibration.input_norms(fn, fn.variables, [x], ['filters'])['filters']
    patches = lax.conv_general_dilated_patches(
        x, (3, 3), (1, 1), 'SAME', dimension_numbers=('NHWC', 'OIHW', 'NHWC')
    )
    per_feature = np.sum(np.square(np.asarray(patches, np.float64)), axis=(0, 1, 2))
    want = np.sqrt(per_feature.reshape(3, 9).mean(1))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the centre offset sees every pixel: its norm is the per-channel norm of x
    centre = np.sqrt(per_feature.reshape(3, 9)[:, 4])
    np.testing.assert_allclose(centre, _norm(x, (0, 1, 2)), rtol=1e-5)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(4, 6, rngs=rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv(x)).mean((1, 2))
        return self.head(nnx.relu(self.hidden(h)))


def test_nnx_model():
    module, x = NnxNet(nnx.Rngs(0)), _rand(4, (5, 6, 6, 3))
    fn = model_fn(module)
    names = ['conv/kernel', 'hidden/kernel', 'head/kernel']
    got = calibration.input_norms(fn, fn.variables, [{'image': x, 'label': None}], names)
    h = nnx.relu(module.conv(x)).mean((1, 2))
    want = [_norm(x, (0, 1, 2)), _norm(h, 0), _norm(nnx.relu(module.hidden(h)), 0)]
    for n, w in zip(names, want):
        np.testing.assert_allclose(got[n], w, rtol=1e-5)


class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), feature_group_count=2, name='g')(x)
        return nn.Dense(2, name='head')(x.mean((1, 2)))


class Unused(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return x * self.param('scale', nn.initializers.ones, (4, 4)).sum(0)


@pytest.mark.parametrize(
    'model, shape, name, match',
    [
        (Grouped(), (1, 5, 5, 4), 'g/kernel', 'grouped'),
        (Handwritten(), (2, 4), 'w_out', 'axis -2 is not the contracted'),
        (ControlFlow(), (2, 4), 'stack', 'used inside scan'),
        (Unused(), (2, 4), 'scale', 'not the weight operand'),
        (Unused(), (2, 4), 'nope', 'no parameter'),
    ],
)
def test_unsupported_uses_are_named(model, shape, name, match):
    x = jnp.ones(shape)
    v = model.init(jax.random.key(0), x)
    fn = model_fn(model, v, x)
    with pytest.raises(ValueError, match=rf'^input_norms: .*{match}'):
        calibration.input_norms(fn, fn.variables, [x], [name])


def test_handwritten_input_kernel_is_fine():
    model, x = Handwritten(), _rand(5, (3, 4))
    v = model.init(jax.random.key(0), x)
    fn = model_fn(model, v, x)
    np.testing.assert_allclose(
        calibration.input_norms(fn, fn.variables, [x], ['w_in'])['w_in'], _norm(x, 0), rtol=1e-5
    )


class PaddedKernels(nn.Module):
    """Kernels padded or concatenated with constants along the input axis before the matmul:
    the extra inputs belong to no kernel entry."""

    @nn.compact
    def __call__(self, x, train=False):
        init = nn.initializers.lecun_normal()
        a, b = self.param('a', init, (4, 3)), self.param('b', init, (4, 3))
        h = x @ jnp.pad(a, ((1, 1), (0, 0))) + x @ jnp.concatenate([jnp.ones((2, 3)), b])
        return h @ self.param('head', init, (3, 2))


def test_padded_and_concatenated_kernels():
    model, x = PaddedKernels(), _rand(6, (5, 6))
    v = model.init(jax.random.key(0), x)
    fn = model_fn(model, v, x)
    got = calibration.input_norms(fn, fn.variables, [x], ['a', 'b'])
    np.testing.assert_allclose(got['a'], _norm(x[:, 1:5], 0), rtol=1e-5)
    np.testing.assert_allclose(got['b'], _norm(x[:, 2:], 0), rtol=1e-5)


@jax.custom_vjp
def _matmul(x, w):
    return x @ w


_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))


class Wrapped(nn.Module):
    """Kernels reached through remat, a custom_vjp and a jitted function."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(nn.remat(nn.Dense)(5, name='r')(x))
        h = jnp.tanh(_matmul(h, self.param('c', nn.initializers.lecun_normal(), (5, 4))))
        return jax.jit(jnp.matmul)(h, self.param('j', nn.initializers.lecun_normal(), (4, 2)))


def test_kernels_inside_remat_custom_vjp_and_jit():
    model, x = Wrapped(), _rand(7, (6, 3))
    v = model.init(jax.random.key(0), x)
    fn = model_fn(model, v, x)
    got = calibration.input_norms(fn, fn.variables, [x], ['r/kernel', 'c', 'j'])
    p = v['params']
    h = nn.relu(x @ p['r']['kernel'] + p['r']['bias'])
    want = {'r/kernel': _norm(x, 0), 'c': _norm(h, 0), 'j': _norm(jnp.tanh(h @ p['c']), 0)}
    for n, w in want.items():
        np.testing.assert_allclose(got[n], w, rtol=1e-5)
