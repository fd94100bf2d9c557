import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax import lax

from ljax import masks, nm, sparsity
from ljax.modelfn import model_fn
from ljax.models import get_model
from tests import reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import benchlib  # noqa: E402  (called_layers: the linen call order the old detection used)


def detect(model, x, variables=None):
    """(prunable names, classifier) found by the search's default, for a linen or NNX model."""
    if variables is None and isinstance(model, nn.Module):
        variables = model.init(jax.random.key(0), x, train=False)
    fn = model_fn(model, variables, x)
    names = sparsity.prunable_names(fn.variables['params'], sparsity.default_prunable(fn, x))
    return names, sparsity.classifier(*sparsity.find_kernels(fn, x))


class TwelveDense(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        for _ in range(11):
            x = nn.relu(nn.Dense(4)(x))
        return nn.Dense(3)(x)  # Dense_11: the classifier, but 'Dense_9' flattens last


class HeadFirst(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), name='conv_init')(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2, name='head')(x.mean((1, 2)))


def test_classifier_is_the_last_product_not_the_last_in_tree_order():
    model, x = TwelveDense(), jnp.ones((1, 4))
    v = model.init(jax.random.key(0), x)
    last_path = jax.tree_util.tree_flatten_with_path(v['params'])[0][-1][0]
    assert jax.tree_util.keystr(last_path) == "['Dense_9']['kernel']"  # jax sorts dict keys
    names, classifier = detect(model, x)
    assert classifier == 'Dense_11/kernel'
    assert sorted(names) == sorted(f'Dense_{i}/kernel' for i in range(11))
    # the linen form (model, variables, x) is the same
    legacy = sparsity.prunable_names(v['params'], sparsity.default_prunable(model, v, x))
    assert legacy == names

    assert detect(HeadFirst(), jnp.ones((1, 8, 8, 3))) == (['conv_init/kernel'], 'head/kernel')


class NnxNet(nnx.Module):
    def __init__(self, rngs, bn_axis=None):
        self.head = nnx.Linear(6, 3, rngs=rngs)  # created first, called last
        self.layers = nnx.List([nnx.Conv(3, 6, (3, 3), rngs=rngs), nnx.Linear(6, 6, rngs=rngs)])
        self.bn = nnx.BatchNorm(6, axis_name=bn_axis, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.layers[0](x))).mean((1, 2))
        return self.head(nnx.relu(self.layers[1](x)))


def test_nnx_model():
    for axis in (None, 'batch'):  # synchronised BN traces outside pmap (eval mode)
        names, classifier = detect(NnxNet(nnx.Rngs(0), axis), jnp.ones((1, 8, 8, 3)))
        assert names == ['layers/0/kernel', 'layers/1/kernel'] and classifier == 'head/kernel'


class Stem(nnx.Module):
    def __init__(self, din, rngs):
        self.head = nnx.Linear(8, 3, rngs=rngs)
        self.stem = nnx.Linear(din, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x, train=False):
        return self.head(nnx.relu(self.bn(self.stem(x), use_running_average=not train)))


def test_bridge_wrapped_nnx_model_keeps_its_classifier_dense():
    """Issue 13: no linen Dense/Conv is called inside `to_linen`, and the old fallback (last
    kernel in tree order, 'stem') pruned the classifier and left the stem dense."""
    model, x = nnx.bridge.to_linen(Stem, 5), jnp.ones((2, 5))
    v = model.init(jax.random.key(0), x)
    assert benchlib.called_layers(model, v, x) == []  # what the old detection saw
    assert detect(model, x, v) == (['stem/kernel'], 'head/kernel')


class Handwritten(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        init = nn.initializers.lecun_normal()
        b = self.param('b', nn.initializers.zeros, (8,))
        h = nn.relu(jnp.dot(x, self.param('w_in', init, (4, 8))) + b)
        return jnp.einsum('oi,bi->bo', self.param('w_out', init, (3, 8)), h)  # (out, in) layout


class PatchesConv(nn.Module):
    """A convolution as patches + matmul, the kernel reshaped to (kh*kw*in, out)."""

    @nn.compact
    def __call__(self, x, train=False):
        k = self.param('filters', nn.initializers.lecun_normal(), (3, 3, 3, 8))
        p = lax.conv_general_dilated_patches(
            x, (3, 3), (1, 1), 'SAME', dimension_numbers=('NHWC', 'OIHW', 'NHWC')
        )
        y = nn.relu(p @ k.transpose(2, 0, 1, 3).reshape(-1, 8)).mean((1, 2))
        return nn.Dense(2, name='a_head')(y)


@jax.custom_vjp
def _identity(a):
    return a


_identity.defvjp(lambda a: (a, None), lambda _, g: (g,))


class ControlFlow(nn.Module):
    """Stacked kernels under lax.scan, then remat, cond and a custom_vjp around the head."""

    @nn.compact
    def __call__(self, x, train=False):
        init = nn.initializers.lecun_normal()
        stack, out = self.param('stack', init, (3, 4, 4)), self.param('out', init, (4, 2))
        x, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, stack)
        x = jax.checkpoint(nn.relu)(x)
        x = lax.cond(x.sum() > 0, lambda h: h @ out, lambda h: 2 * (h @ out), x)
        return _identity(x)


def test_hand_written_kernels_patch_convolutions_and_control_flow():
    assert detect(Handwritten(), jnp.ones((2, 4))) == (['w_in'], 'w_out')
    assert detect(PatchesConv(), jnp.ones((1, 6, 6, 3))) == (['filters'], 'a_head/kernel')
    assert detect(ControlFlow(), jnp.ones((2, 4))) == (['stack'], 'out')


class TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(4)(x))
        return nn.Dense(2, name='a')(x) + nn.Dense(2, name='b')(x)


class NoProduct(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return x * self.param('scale', nn.initializers.ones, (4,))


def test_undecidable_classifier_asks_for_prunable():
    with pytest.raises(ValueError, match=r"^prunable: .*'a/kernel', 'b/kernel'.*pass prunable="):
        detect(TwoHeads(), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r'^prunable: .*no matmul or convolution.*pass prunable='):
        detect(NoProduct(), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r'^model: expected a flax.linen or flax.nnx Module'):
        sparsity.default_prunable(lambda x: x, {'params': {}}, jnp.ones((1, 4)))


@pytest.mark.parametrize(
    'name, shape, kwargs',
    [
        ('mlp', (1, 28, 28, 1), {'hidden': (8, 8)}),
        ('mlp', (1, 28, 28, 1), {'hidden': (8, 8), 'bn_axis_name': 'batch'}),  # outside pmap
        ('vgg19_cifar', (1, 32, 32, 3), {}),
        ('resnet32_cifar', (1, 32, 32, 3), {}),
        ('resnet50', (1, 32, 32, 3), {}),
    ],
)
def test_shipped_models_as_before(name, shape, kwargs):
    """Same prunable set and classifier as the intercept-based detection it replaces: every
    linen Dense/Conv kernel but the last one called."""
    model, x = get_model(name, 10, **kwargs), jnp.zeros(shape)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    v = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    calls = benchlib.called_layers(model, v, x)
    kernels = [n for n in sparsity.flatten(v['params']) if n.endswith('kernel')]
    before = [n for n in kernels if n != f'{calls[-1]}/kernel']
    names, classifier = detect(model, x, v)
    assert classifier == f'{calls[-1]}/kernel' and names == before


@st.composite
def layers(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    shapes = draw(
        st.lists(st.sampled_from([(3, 4), (2, 2, 3, 5), (17,), (6, 6)]), min_size=1, max_size=4)
    )
    tie = draw(st.booleans())
    w = {}
    for i, s in enumerate(shapes):
        w[f'l{i}/kernel'] = (
            rng.choice([-1.0, -0.5, 0.5, 1.0], size=s) if tie else rng.normal(size=s)
        ).astype(np.float32)
    return w, draw(st.floats(0.0, 0.99))


@settings(max_examples=40, deadline=None)
@given(layers())
def test_global_magnitude_keeps_exactly_round_1_minus_s_n(args):
    w, s = args
    m = sparsity.magnitude_masks(w, s, 'global_magnitude')
    flat = np.concatenate([np.abs(v).reshape(-1) for v in w.values()])
    want = reference.topk(flat, round((1 - s) * flat.size))
    np.testing.assert_array_equal(np.concatenate([np.asarray(m[n]).reshape(-1) for n in w]), want)


@settings(max_examples=40, deadline=None)
@given(layers())
def test_uniform_allocation(args):
    w, s = args
    m = sparsity.magnitude_masks(w, s, 'uniform')
    total = sum(v.size for v in w.values())
    assert sum(int(np.sum(m[n])) for n in w) == round((1 - s) * total)
    for n, v in w.items():
        assert abs(int(np.sum(m[n])) - (1 - s) * v.size) < 1.0
        np.testing.assert_array_equal(
            np.asarray(m[n]).reshape(-1), reference.topk(np.abs(v), int(np.sum(m[n]))).reshape(-1)
        )


@settings(max_examples=30, deadline=None)
@given(layers(), st.floats(0.001, 0.5))
def test_magnitude_scores_reproduce_the_magnitude_mask_exactly(args, margin):
    w, s = args
    m = sparsity.magnitude_masks(w, s)
    scores = sparsity.init_scores(w, m, 'magnitude', jax.random.key(0), margin)
    for n in w:
        assert set(np.unique(np.asarray(scores[n]))) <= {np.float32(1.0), np.float32(1.0 - margin)}
        np.testing.assert_array_equal(masks.topk_mask(scores[n], int(np.sum(m[n]))), m[n])


def test_random_scores_are_kaiming_uniform():
    w = {'a/kernel': np.zeros((3, 3, 16, 8), np.float32)}
    scores = sparsity.init_scores(w, None, 'random', jax.random.key(1))['a/kernel']
    bound = 1 / np.sqrt(3 * 3 * 16)
    assert np.abs(scores).max() <= bound and np.abs(scores).max() > 0.9 * bound
    assert len(np.unique(np.asarray(scores))) > 1000


def test_unknown_allocation_and_init():
    w = {'a/kernel': np.ones((2, 2), np.float32)}
    with pytest.raises(ValueError, match='allocation'):
        sparsity.magnitude_masks(w, 0.5, 'erk?')
    with pytest.raises(ValueError, match='score_init'):
        sparsity.init_scores(w, w, 'zeros', jax.random.key(0))


# ------------------------------------------------------------------ ERK allocation
def ref_erk_densities(shapes, s):
    """Brute force: d_l = min(1, eps p_l) with eps found by bisection on sum d_l n_l = K."""
    n = {k: int(np.prod(v)) for k, v in shapes.items()}
    p = {k: sum(v) / n[k] for k, v in shapes.items()}
    budget = round((1 - s) * sum(n.values()))
    kept = lambda eps: sum(min(1.0, eps * p[k]) * n[k] for k in n)
    lo, hi = 0.0, 1.0
    while kept(hi) < budget and hi < 1e12:
        hi *= 2
    for _ in range(200):
        lo, hi = ((lo + hi) / 2, hi) if kept((lo + hi) / 2) < budget else (lo, (lo + hi) / 2)
    return {k: min(1.0, hi * p[k]) for k in n}


def test_erk_exact_counts_by_hand():
    shapes = {'a': (4, 4), 'b': (2, 8), 'c': (10,)}  # p = 0.5, 0.625, 1; N = 42
    # s = 0.5: K = 21, eps = 21 / 28: exact 6, 7.5, 7.5 -> the tie goes to the earlier layer
    assert sparsity.erk_kept(shapes, 0.5) == {'a': 6, 'b': 8, 'c': 7}
    # s = 0.2: K = 34; c would get 1.21 > 1: dense, then eps = 24 / 18: exact 10.67, 13.33
    assert sparsity.erk_kept(shapes, 0.2) == {'a': 11, 'b': 13, 'c': 10}
    assert sparsity.erk_densities(shapes, 0.2)['c'] == 1.0
    assert sparsity.erk_kept(shapes, 0.0) == {'a': 16, 'b': 16, 'c': 10}
    assert sparsity.erk_kept(shapes, 0.999) == {'a': 0, 'b': 0, 'c': 0}


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.sampled_from([(3, 3, 3, 16), (3, 3, 16, 16), (3, 3, 16, 32), (64, 10), (5, 7), (9,)]),
        min_size=1,
        max_size=5,
    ),
    st.floats(0.0, 0.999),
)
def test_erk_against_the_density_formula(shape_list, s):
    shapes = {f'l{i}': v for i, v in enumerate(shape_list)}
    sizes = {k: int(np.prod(v)) for k, v in shapes.items()}
    want = ref_erk_densities(shapes, s)
    got = sparsity.erk_densities(shapes, s)
    for k in shapes:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12)
    kept = sparsity.erk_kept(shapes, s)
    assert sum(kept.values()) == round((1 - s) * sum(sizes.values()))
    for k in shapes:  # floor or ceil of the exact share (float slack of 1e-6)
        exact = want[k] * sizes[k]
        assert np.floor(exact - 1e-6) <= kept[k] <= np.ceil(exact + 1e-6) and kept[k] <= sizes[k]


@settings(max_examples=20, deadline=None)
@given(layers())
def test_erk_masks_are_top_magnitude_within_each_layer(args):
    w, s = args
    m = sparsity.magnitude_masks(w, s, 'erk')
    kept = sparsity.erk_kept({n: v.shape for n, v in w.items()}, s)
    for n, v in w.items():
        np.testing.assert_array_equal(np.asarray(m[n]), reference.topk(np.abs(v), kept[n]))


# ------------------------------------------------------------------ Wanda
@st.composite
def kernels_and_norms(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    kinds = st.sampled_from([(4, 3), (8, 5), (2, 2, 4, 3), (12, 1)])
    shapes = draw(st.lists(kinds, min_size=1, max_size=3))
    tie = draw(st.booleans())
    w, norms, kept = {}, {}, {}
    for i, s in enumerate(shapes):
        draw_w = rng.choice([-1.0, -0.0, 0.0, 1.0], size=s) if tie else rng.normal(size=s)
        w[f'l{i}'] = draw_w.astype(np.float32)
        norm = rng.choice([0.0, 1.0, 2.0], size=s[-2]) if tie else rng.random(s[-2])
        norms[f'l{i}'] = norm.astype(np.float32)
        kept[f'l{i}'] = draw(st.integers(0, int(np.prod(s))))
    return w, norms, kept


def test_wanda_scores_broadcast_the_input_norm_along_axis_minus_2():
    w = np.arange(-12.0, 12.0, dtype=np.float32).reshape(1, 2, 3, 4)  # (kh, kw, in, out)
    norms = np.array([0.5, 2.0, 3.0], np.float32)
    got = np.asarray(sparsity.wanda_scores({'c': w}, {'c': norms})['c'])
    for a, b, i, o in np.ndindex(w.shape):
        assert got[a, b, i, o] == abs(w[a, b, i, o]) * norms[i]
    with pytest.raises(ValueError, match=r'^wanda: kernel c .*\(3,\)'):
        sparsity.wanda_scores({'c': w}, {'c': norms[:2]})


@settings(max_examples=30, deadline=None)
@given(kernels_and_norms())
def test_wanda_masks_per_column_counts_are_exact(args):
    w, norms, kept = args
    got = sparsity.wanda_masks(w, norms, kept=kept)
    for n, v in w.items():
        out = v.shape[-1]
        cols = np.asarray(got[n]).reshape(-1, out)
        want_counts = sparsity.column_kept(kept[n], out)
        np.testing.assert_array_equal(cols.sum(0), want_counts)
        assert cols.sum() == kept[n] and want_counts.max() - want_counts.min() <= 1
        score = (np.abs(v) * norms[n][:, None]).reshape(-1, out)
        for j in range(out):  # each column: its top-k_j by score, ties to the lower index
            np.testing.assert_array_equal(cols[:, j], reference.topk(score[:, j], want_counts[j]))
        # the scores of the search's init reproduce the mask under the layer-wise top-k
        init = sparsity.init_scores(w, got, 'wanda', jax.random.key(0), 0.01)
        np.testing.assert_array_equal(masks.topk_mask(init[n], kept[n]), got[n])


@settings(max_examples=20, deadline=None)
@given(kernels_and_norms())
def test_wanda_nm_form_keeps_n_per_group_of_each_column(args):
    w, norms, _ = args
    w = {n: v for n, v in w.items() if v.shape[-2] % 4 == 0}
    got = sparsity.wanda_masks(w, norms, nm=(2, 4))
    for n, v in w.items():
        g = np.asarray(got[n]).reshape(v.shape[:-2] + (v.shape[-2] // 4, 4, v.shape[-1]))
        assert (g.sum(-2) == 2).all()
        score = np.abs(v) * norms[n][:, None]
        np.testing.assert_array_equal(got[n], nm.nm_mask(jnp.asarray(score), 2, 4))
        init = sparsity.mask_scores(got, 0.3)
        np.testing.assert_array_equal(nm.nm_mask(init[n], 2, 4), got[n])


def test_wanda_masks_arguments():
    w, norms = {'a': np.ones((8, 2), np.float32)}, {'a': np.ones(8, np.float32)}
    with pytest.raises(ValueError, match='exactly one of kept= .* and nm='):
        sparsity.wanda_masks(w, norms)
    with pytest.raises(ValueError, match='exactly one of'):
        sparsity.wanda_masks(w, norms, kept={'a': 3}, nm=(2, 4))
    with pytest.raises(ValueError, match=r'^nm: kernel a .*prunable='):
        sparsity.wanda_masks(w, norms, nm=(1, 3))
    with pytest.raises(ValueError, match=r"^wanda: kept\['a'\] = 17 outside \[0, 16\]"):
        sparsity.wanda_masks(w, norms, kept={'a': 17})
    assert list(sparsity.column_kept(7, 3)) == [3, 2, 2]
    assert list(sparsity.column_kept(6, 3)) == [2, 2, 2]
