import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ljax import calibration, nm as nm_lib, sparsity
from ljax.modelfn import model_fn
from ljax.sparsegpt import sparsegpt, sparsegpt_prune


def _rand(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _correlated(seed, rows, cols, outliers=()):
    """Inputs whose features are strongly correlated (a few latent factors plus noise), some
    of them scaled up (outlier features, as in LLM activations)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)) @ rng.normal(size=(4, cols))
    x += 0.3 * rng.normal(size=(rows, cols))
    x[:, list(outliers)] *= 20.0
    return x.astype(np.float32)


def reference(weights, hessian, *, sparsity=None, nm=None, blocksize=128, percdamp=0.01):
    """SparseGPT from the paper's equations, float64, no Cholesky factor and no lazy batching:
    inputs (torch's columns) one at a time, outputs one at a time. Pruning input q of an output
    is the OBS step with the inverse Hessian of the inputs not yet visited, F_q = {q, ..., n-1}:
    w_F -= w_q / [H_F^-1]_qq * [H_F^-1]_{q,:}; the saliency of an entry of input c is
    w_c^2 / [H_{F_c}^-1]_cc. Mask selection: unstructured, at each block start, over the block's
    entries of all outputs together; N:M, at each M-th input, per output."""
    w = np.array(weights, np.float64).T  # (out, in)
    h = np.array(hessian, np.float64)
    n = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * np.mean(np.diag(h)) * np.eye(n)
    inv = [np.linalg.inv(h[q:, q:]) for q in range(n)]
    keep = np.ones(w.shape, bool)
    for q in range(n):
        if nm is None and q % blocksize == 0:
            block = range(q, min(q + blocksize, n))
            score = np.stack([w[:, c] ** 2 / inv[c][0, 0] for c in block], axis=1)
            kept = int(round((1 - sparsity) * score.size))
            order = np.argsort(-score.reshape(-1), kind='stable')
            chosen = np.zeros(score.size, bool)
            chosen[order[:kept]] = True
            keep[:, block.start : block.stop] = chosen.reshape(score.shape)
        for r in range(w.shape[0]):
            if nm is not None and q % nm[1] == 0:
                score = [w[r, c] ** 2 / inv[c][0, 0] for c in range(q, q + nm[1])]
                order = np.argsort(-np.array(score), kind='stable')
                keep[r, q : q + nm[1]] = np.isin(np.arange(nm[1]), order[: nm[0]])
            if not keep[r, q]:
                w[r, q:] -= w[r, q] / inv[q][0, 0] * inv[q][0, :]
                w[r, q] = 0.0
    return w.T, keep.T


@pytest.mark.parametrize(
    'n_in, kw',
    [
        (24, dict(sparsity=0.5, blocksize=8)),
        (20, dict(sparsity=0.6, blocksize=8)),  # a last block of 4 inputs
        (24, dict(sparsity=0.5, blocksize=128)),  # one block
        (24, dict(nm=(2, 4), blocksize=8)),
        (24, dict(nm=(1, 4), blocksize=4, percdamp=0.1)),
    ],
)
def test_matches_the_papers_equations(n_in, kw):
    x = _correlated(0, 200, n_in, outliers=(3,))
    x[:, 5] = 0.0  # a dead input
    w = _rand(1, (n_in, 6))
    h = x.T @ x
    got_w, got_m = sparsegpt_prune(w, h, **kw)
    want_w, want_m = reference(w, h, **kw)
    assert got_w.dtype == jnp.float32 and got_m.dtype == jnp.bool_ and got_w.shape == w.shape
    np.testing.assert_array_equal(got_m, want_m)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-4 * np.abs(want_w).max())
    assert not np.any(np.asarray(got_m)[5])  # the dead input's weights are gone
    # the kept weights moved: the update is there (and the reference agrees on it)
    assert np.abs(np.asarray(got_w) - w * np.asarray(got_m)).max() > 0.05


def test_exact_sparsity():
    x = _correlated(2, 300, 72)
    w, h = _rand(3, (72, 16)), x.T @ x
    new, mask = map(np.asarray, sparsegpt_prune(w, h, nm=(2, 4), blocksize=16))
    np.testing.assert_array_equal(mask.reshape(18, 4, 16).sum(1), 2)  # every group, every output
    np.testing.assert_array_equal(new[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(nm_lib.nm_mask(jnp.asarray(mask), 2, 4)), mask)
    new, mask = map(np.asarray, sparsegpt_prune(w, h, sparsity=0.3, blocksize=16))
    for start in range(0, 72, 16):  # blocks of 16, 16, 16, 16, 8 inputs
        block = mask[start : start + 16]
        assert block.sum() == round(0.7 * block.size), start
    np.testing.assert_array_equal(new[~mask], 0.0)
    # adaptive: the fraction is exact per block, not per output
    assert len(set(mask.sum(0).tolist())) > 1


def _error(x, w, new):
    return float(np.sum((x @ w - x @ np.asarray(new, np.float32)) ** 2))


@pytest.mark.parametrize('kw', [dict(sparsity=0.5), dict(nm=(2, 4))])
def test_reconstruction_beats_magnitude_and_wanda(kw):
    x = _correlated(4, 512, 64, outliers=(7, 30))
    w = _rand(5, (64, 32))
    new, mask = sparsegpt_prune(w, x.T @ x, blocksize=32, **kw)
    weights = {'k': jnp.asarray(w)}
    norms = {'k': jnp.asarray(np.linalg.norm(x, axis=0))}
    if 'nm' in kw:
        magnitude = nm_lib.nm_magnitude_masks(weights, 2, 4)['k']
        wanda = sparsity.wanda_masks(weights, norms, nm=(2, 4))['k']
    else:
        magnitude = sparsity.magnitude_masks(weights, 0.5, 'uniform')['k']
        wanda = sparsity.wanda_masks(weights, norms, kept={'k': w.size // 2})['k']
    ours = _error(x, w, new)
    others = {
        'magnitude': _error(x, w, w * np.asarray(magnitude)),
        'wanda': _error(x, w, w * np.asarray(wanda)),
        'own mask, no update': _error(x, w, w * np.asarray(mask)),
    }
    for name, err in others.items():
        assert ours < 0.5 * err, (name, ours, err)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(nn.Dense(6, name='first')(x))
        return nn.Dense(3, name='second')(h)


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(5, 6, rngs=rngs)
        self.second = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.second(nnx.relu(self.first(x)))


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize('kind', ['linen', 'nnx'])
def test_gram_of_a_two_layer_mlp(kind):
    x = _rand(6, (7, 2, 5))  # two positions per sample: every (sample, position) is a row
    if kind == 'linen':
        model = Mlp()
        fn = model_fn(model, model.init(jax.random.key(0), x), x)
    else:
        fn = model_fn(NnxMlp(nnx.Rngs(0)))
    p = fn.variables['params']
    batches = [(x[:3], None), (x[3:], None)]
    got = calibration.input_grams(fn, fn.variables, batches, ['first/kernel', 'second/kernel'])
    h = np.maximum(x @ np.asarray(p['first']['kernel']) + np.asarray(p['first']['bias']), 0)
    x2, h2 = x.reshape(-1, 5).astype(np.float64), h.reshape(-1, 6).astype(np.float64)
    assert got['first/kernel'].dtype == jnp.float32 and got['first/kernel'].shape == (5, 5)
    _close(got['first/kernel'], x2.T @ x2)
    _close(got['second/kernel'], h2.T @ h2)


class Convs(nn.Module):
    conv: type = nn.Conv

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(self.conv(4, (3, 3), name='c1')(x))  # SAME, stride 1
        y = nn.relu(self.conv(8, (3, 2), strides=2, padding='VALID', name='c2')(h))
        return nn.Dense(2, name='head')(y.mean((1, 2)))


def _patches(x, kh, kw, stride, pad):
    """Rows: (sample, output position); columns: (kh, kw, in) row-major, as
    kernel.reshape(-1, out). Written with plain slicing."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), pad, pad, (0, 0)))
    n, hh, ww, c = x.shape
    out = [
        x[:, i : i + kh, j : j + kw, :].reshape(n, -1)
        for i in range(0, hh - kh + 1, stride)
        for j in range(0, ww - kw + 1, stride)
    ]
    return np.stack(out, 1).reshape(-1, kh * kw * c)


def test_conv_gram_is_that_of_its_patches():
    x = _rand(7, (3, 7, 7, 4))
    model = Convs()
    v = model.init(jax.random.key(0), x)
    fn = model_fn(model, v, x)
    got = calibration.input_grams(fn, fn.variables, [x[:2], x[2:]], ['c1/kernel', 'c2/kernel'])
    p = v['params']
    px = _patches(x, 3, 3, 1, (1, 1))
    k1 = np.asarray(p['c1']['kernel'])
    h = np.maximum(px @ k1.reshape(-1, 4) + np.asarray(p['c1']['bias']), 0).reshape(3, 7, 7, 4)
    # the patches are the conv's input: their product with the flat kernel is the convolution
    conv = nn.Conv(4, (3, 3)).apply({'params': p['c1']}, x)
    _close(np.maximum(np.asarray(conv), 0), h)
    ph = _patches(h, 3, 2, 2, (0, 0))
    assert got['c1/kernel'].shape == (36, 36) and got['c2/kernel'].shape == (24, 24)
    _close(got['c1/kernel'], px.T @ px)
    _close(got['c2/kernel'], ph.T @ ph)


def test_staged_convolution_gram_is_the_plain_ones():
    """ljax.models.layers.Conv (oneDNN / im2col on CPU, `lax.platform_dependent`) is measured on
    its default branch, the plain convolution."""
    from ljax.models import layers

    x = _rand(7, (3, 7, 7, 4))
    names = ['c1/kernel', 'c2/kernel']
    v = Convs().init(jax.random.key(0), x)
    grams = []
    for conv in (nn.Conv, layers.Conv):
        fn = model_fn(Convs(conv=conv), v, x)
        grams.append(calibration.input_grams(fn, fn.variables, [x], names))
    for n in names:
        _close(grams[1][n], grams[0][n])


class PatchesMatmul(nn.Module):
    """The same 3x3 SAME convolution as patches + matmul with the kernel transposed to
    (in, kh, kw, out) and reshaped: Gram rows still in the kernel's own (kh, kw, in) order."""

    @nn.compact
    def __call__(self, x, train=False):
        k = self.param('filters', nn.initializers.lecun_normal(), (3, 3, 4, 5))
        p = jax.lax.conv_general_dilated_patches(
            x, (3, 3), (1, 1), 'SAME', dimension_numbers=('NHWC', 'OIHW', 'NHWC')
        )
        return (p @ k.transpose(2, 0, 1, 3).reshape(-1, 5)).mean((1, 2))


def test_patches_matmul_gram_maps_back_to_kernel_rows():
    x = _rand(8, (2, 5, 5, 4))
    model = PatchesMatmul()
    fn = model_fn(model, model.init(jax.random.key(0), x), x)
    got = calibration.input_grams(fn, fn.variables, [x], ['filters'])['filters']
    px = _patches(x, 3, 3, 1, (1, 1))
    _close(got, px.T @ px)


class Stacked(nn.Module):
    """A (heads, in, out) kernel applied per head (a dot_general with batch dimensions)."""

    @nn.compact
    def __call__(self, x, train=False):
        k = self.param('heads', nn.initializers.lecun_normal(), (2, 4, 3))
        return jnp.einsum('hbi,hio->bho', x, k).reshape(x.shape[1], -1)


def test_batched_kernel_gram_is_block_diagonal():
    x = _rand(9, (2, 6, 4))
    model = Stacked()
    fn = model_fn(model, model.init(jax.random.key(0), x), x)
    got = np.asarray(calibration.input_grams(fn, fn.variables, [x], ['heads'])['heads'])
    want = np.zeros((8, 8))
    for head in range(2):
        xh = x[head].astype(np.float64)
        want[4 * head : 4 * head + 4, 4 * head : 4 * head + 4] = xh.T @ xh
    _close(got, want)


def test_gram_errors_name_the_kernel():
    from tests.test_calibration import ControlFlow, Grouped
    from tests.test_sparsity import Handwritten

    for model, shape, name, match in [
        (Grouped(), (1, 5, 5, 4), 'g/kernel', 'grouped'),
        (Handwritten(), (2, 4), 'w_out', 'axis -2 is not the contracted'),
        (ControlFlow(), (2, 4), 'stack', 'used inside scan'),
    ]:
        x = jnp.ones(shape)
        fn = model_fn(model, model.init(jax.random.key(0), x), x)
        with pytest.raises(ValueError, match=rf'^input_grams: kernel {name}.*{match}'):
            calibration.input_grams(fn, fn.variables, [x], [name])


class Branches(nn.Module):
    """Call order differs from tree order; two kernels read the same activation."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(nn.Dense(8, name='z_first')(x))
        a = nn.Dense(8, name='b_left')(h)
        b = nn.Dense(8, name='a_right')(h)
        return nn.Dense(4, name='head')(nn.relu(a) * jnp.tanh(b))


def test_sequential_pruning_measures_the_pruned_model():
    x = _correlated(10, 96, 8)
    model = Branches()
    v = model.init(jax.random.key(1), x)
    fn = model_fn(model, v, x)
    names = ['a_right/kernel', 'b_left/kernel', 'head/kernel', 'z_first/kernel']
    groups = calibration.product_groups(fn, fn.variables, x, names)
    assert groups == [['z_first/kernel'], ['b_left/kernel', 'a_right/kernel'], ['head/kernel']]
    batches = [(x[:40], None), (x[40:], None)]
    params, masks = sparsegpt(fn, fn.variables, batches, names, sparsity=0.5, blocksize=4)

    # by hand, layer after layer, each on the inputs of the model pruned so far
    p = {k: {n: np.asarray(a, np.float64) for n, a in d.items()} for k, d in v['params'].items()}

    def prune(w, inputs):
        return sparsegpt_prune(w, inputs.T @ inputs, sparsity=0.5, blocksize=4)

    w1, m1 = prune(p['z_first']['kernel'], x)
    h = np.maximum(x @ np.asarray(w1) + p['z_first']['bias'], 0)
    wl, ml = prune(p['b_left']['kernel'], h)
    wr, mr = prune(p['a_right']['kernel'], h)
    u = np.maximum(h @ np.asarray(wl) + p['b_left']['bias'], 0)
    u = u * np.tanh(h @ np.asarray(wr) + p['a_right']['bias'])
    w3, m3 = prune(p['head']['kernel'], u)
    want = {'z_first': (w1, m1), 'b_left': (wl, ml), 'a_right': (wr, mr), 'head': (w3, m3)}
    for layer, (w, m) in want.items():
        n = f'{layer}/kernel'
        np.testing.assert_array_equal(masks[n], m, err_msg=n)
        np.testing.assert_allclose(params[layer]['kernel'], w, rtol=1e-4, atol=1e-5, err_msg=n)
        np.testing.assert_array_equal(params[layer]['bias'], v['params'][layer]['bias'])
    # and not what the dense model's inputs would give: the test sees the difference
    h_dense = np.maximum(x @ p['z_first']['kernel'] + p['z_first']['bias'], 0)
    w_dense, _ = prune(p['b_left']['kernel'], h_dense)
    assert np.abs(np.asarray(w_dense) - np.asarray(wl)).max() > 1e-2


class NnxConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 8, (3, 3), rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv(x)).mean((1, 2)))


def test_nnx_convolution_two_four():
    x = _rand(11, (4, 6, 6, 4))
    module = NnxConvNet(nnx.Rngs(0))
    fn = model_fn(module)
    names = ['conv/kernel', 'head/kernel']
    params, masks = sparsegpt(fn, fn.variables, [x[:2], x[2:]], names, nm=(2, 4), blocksize=4)
    conv = np.asarray(masks['conv/kernel'])
    assert conv.shape == (3, 3, 4, 8)
    np.testing.assert_array_equal(conv.sum(2), 2)  # 2 of the 4 input channels per (kh, kw, out)
    np.testing.assert_array_equal(np.asarray(params['conv']['kernel'])[~conv], 0.0)
    # the conv was pruned first (its input is x): same as pruning its patch matrix by hand
    px = _patches(x, 3, 3, 1, (1, 1)).astype(np.float32)
    k = np.asarray(fn.variables['params']['conv']['kernel'])
    w, m = sparsegpt_prune(k.reshape(36, 8), px.T @ px, nm=(2, 4), blocksize=4)
    np.testing.assert_array_equal(conv, np.asarray(m).reshape(conv.shape))
    np.testing.assert_allclose(params['conv']['kernel'], np.asarray(w).reshape(k.shape), atol=1e-5)
    pruned = fn.rebuild({'params': params, 'batch_stats': {}})
    y = pruned.conv(x)  # the rebuilt module runs with the new weights
    assert np.sum(np.asarray(y) ** 2) > 0 and masks['head/kernel'].shape == (8, 3)


@pytest.mark.parametrize(
    'args, kw, match',
    [
        (((4, 3, 2), (3, 3)), dict(sparsity=0.5), 'weights must be a 2-D'),
        (((4, 3), (3, 3)), dict(sparsity=0.5), r'hessian must be \(in, in\)'),
        (((4, 3), (4, 4)), dict(sparsity=0.5, nm=(2, 4)), 'exactly one of'),
        (((4, 3), (4, 4)), dict(), 'exactly one of'),
        (((4, 3), (4, 4)), dict(sparsity=1.5), 'fraction in'),
        (((6, 3), (6, 6)), dict(nm=(2, 4)), 'do not divide into groups of 4'),
        (((8, 3), (8, 8)), dict(nm=(2, 4), blocksize=6), 'multiple of M'),
        (((4, 3), (4, 4)), dict(sparsity=0.5, blocksize=0), 'positive int'),
        (((4, 3), (4, 4)), dict(sparsity=0.5, percdamp=-1.0), 'percdamp'),
    ],
)
def test_bad_arguments(args, kw, match):
    w, h = (np.ones(s, np.float32) for s in args)
    with pytest.raises(ValueError, match=rf'^(sparsegpt|nm): .*{match}'):
        sparsegpt_prune(w, h, **kw)


def test_bad_values():
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match='^sparsegpt: .*finite'):
        sparsegpt_prune(w, np.full((4, 4), np.nan), sparsity=0.5)
    with pytest.raises(ValueError, match='^sparsegpt: .*not positive definite'):
        sparsegpt_prune(w, -np.eye(4), sparsity=0.5, percdamp=0.0)
    x = _rand(12, (3, 8))
    model = Branches()
    fn = model_fn(model, model.init(jax.random.key(0), x), x)
    with pytest.raises(ValueError, match=r"^sparsegpt: no parameter 'nope'"):
        sparsegpt(fn, fn.variables, [x], ['nope'], sparsity=0.5)
    with pytest.raises(ValueError, match='^sparsegpt: no calibration batches'):
        sparsegpt(fn, fn.variables, [], ['head/kernel'], sparsity=0.5)
