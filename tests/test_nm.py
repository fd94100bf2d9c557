import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax import lax

from ljax import convert, nm, restriction, search_jackpot, sparsity
from ljax.modelfn import model_fn
from ljax.models import get_model, layers
from ljax.search import Search, SearchOptions


# ------------------------------------------------------------------ brute-force NumPy references
def _groups(shape, m, axes=None):
    """Flat index lists of every group of m consecutive entries along the input axes `axes`
    (flattened row-major; None: axis -2), for each index of the other axes."""
    axes = (len(shape) - 2,) if axes is None else tuple(axes)
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    ends = list(range(len(shape) - len(axes), len(shape)))
    rows = np.moveaxis(idx, axes, ends).reshape(-1, int(np.prod([shape[a] for a in axes])))
    for row in rows:
        for g in range(row.size // m):
            yield [int(i) for i in row[g * m : (g + 1) * m]]


def ref_nm_mask(scores, n, m, axes=None):
    s = np.asarray(scores, np.float32).reshape(-1)
    out = np.zeros(s.size, bool)
    for group in _groups(np.shape(scores), m, axes):
        best = sorted(group, key=lambda i: (-float(s[i]), i))  # -0.0 == 0.0 in the key
        out[best[:n]] = True
    return out.reshape(np.shape(scores))


def ref_nm_restrict(mask, scores, n, m, rate, axes=None):
    s, mask = np.asarray(scores, np.float32).reshape(-1), np.asarray(mask, bool).reshape(-1)
    top = ref_nm_mask(scores, n, m, axes).reshape(-1)
    revive, prune = top & ~mask, mask & ~top
    c = int(revive.sum())
    r = min(c, max(0, math.ceil(np.float32(rate) * np.float32(c))))
    come_in = sorted(np.flatnonzero(revive), key=lambda i: (-float(s[i]), i))[:r]
    new = mask.copy()
    new[come_in] = True
    for group in _groups(np.shape(scores), m, axes):
        arriving = sum(i in come_in for i in group)
        worst_first = sorted([i for i in group if prune[i]], key=lambda i: (float(s[i]), -i))
        new[worst_first[:arriving]] = False
    return new.reshape(np.shape(scores))


# ------------------------------------------------------------------ strategies
SHAPES = [(4, 3), (8, 2), (2, 2, 8, 3), (12, 1), (3, 16, 2)]


def _scores(rng, shape, kind):
    if kind == 'normal':
        return rng.normal(size=shape).astype(np.float32)
    if kind == 'few':  # duplicated values and both zeros
        return rng.choice(np.array([-1.0, -0.0, 0.0, 0.5, 1.0], np.float32), size=shape)
    if kind == 'constant':
        return np.full(shape, 0.7, np.float32)
    return rng.choice(np.array([-0.0, 0.0], np.float32), size=shape)


@st.composite
def layer(draw):
    shape = draw(st.sampled_from(SHAPES))
    m = draw(st.sampled_from([v for v in (2, 4, 8) if shape[-2] % v == 0]))
    n = draw(st.integers(1, m - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    kind = st.sampled_from(['normal', 'few', 'constant', 'zeros'])
    s = _scores(rng, shape, draw(kind))
    # a valid current N:M mask: the top of other scores
    mask = ref_nm_mask(_scores(rng, shape, draw(kind)), n, m)
    rate = draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.999, 1.0]))
    return s, mask, n, m, rate


def _per_group(mask, m):
    g = np.asarray(mask).reshape(mask.shape[:-2] + (mask.shape[-2] // m, m, mask.shape[-1]))
    return g.sum(-2)


# ------------------------------------------------------------------ tests
@settings(max_examples=40, deadline=None)
@given(layer())
def test_nm_mask_exact_n_per_group_and_matches_reference(args):
    s, _, n, m, _ = args
    got = np.asarray(nm.nm_mask(jnp.asarray(s), n, m))
    assert (_per_group(got, m) == n).all()
    np.testing.assert_array_equal(got, ref_nm_mask(s, n, m))


@settings(max_examples=40, deadline=None)
@given(layer())
def test_nm_restrict_matches_reference_and_keeps_n_per_group(args):
    s, mask, n, m, rate = args
    got = np.asarray(nm.nm_restrict(jnp.asarray(mask), jnp.asarray(s), n, m, rate))
    np.testing.assert_array_equal(got, ref_nm_restrict(mask, s, n, m, rate))
    assert (_per_group(got, m) == n).all()
    c = int((ref_nm_mask(s, n, m) & ~mask).sum())
    assert (got & ~mask).sum() == min(c, math.ceil(np.float32(rate) * np.float32(c)))


@settings(max_examples=20, deadline=None)
@given(layer())
def test_rate_one_is_nm_mask_rate_zero_freezes_traced_rate(args):
    s, mask, n, m, _ = args
    f = jax.jit(lambda r: nm.nm_restrict(jnp.asarray(mask), jnp.asarray(s), n, m, r))
    np.testing.assert_array_equal(f(1.0), ref_nm_mask(s, n, m))
    np.testing.assert_array_equal(f(0.0), mask)
    np.testing.assert_array_equal(f(0.4), ref_nm_restrict(mask, s, n, m, 0.4))


def test_ties_signed_zeros_and_nan():
    col = lambda v: jnp.asarray(np.array(v, np.float32)[:, None])
    np.testing.assert_array_equal(nm.nm_mask(col([-0.0, 0.0, 0.0, -0.0]), 2, 4)[:, 0], [1, 1, 0, 0])
    np.testing.assert_array_equal(nm.nm_mask(col([0.0, 1.0, -0.0, 1.0]), 2, 4)[:, 0], [0, 1, 0, 1])
    nan_first = col([np.nan, -1.0, 2.0, 0.5])
    np.testing.assert_array_equal(nm.nm_mask(nan_first, 2, 4)[:, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(nm.nm_mask(col([np.nan] * 4), 1, 4)[:, 0], [1, 0, 0, 0])


def test_swaps_pair_within_groups_by_revive_score():
    # two groups of 4 (one output column), N = 2; current mask keeps positions 2, 3 in each
    s = np.array([5.0, 1.0, 0.0, 0.5, 3.0, 4.0, 0.2, 0.1], np.float32)[:, None]
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)[:, None]
    # revive: 0 (5.0), 1 (1.0), 4 (3.0), 5 (4.0); c = 4, rate 0.5 -> r = 2: 0 and 5 come in
    # group 0 loses its worst (2: 0.0), group 1 its worst (7: 0.1)
    got = nm.nm_restrict(jnp.asarray(mask), jnp.asarray(s), 2, 4, 0.5)[:, 0]
    np.testing.assert_array_equal(got, [1, 0, 0, 1, 0, 1, 1, 0])
    # r = 3 adds 4 (3.0): group 1 then also loses 6
    got = nm.nm_restrict(jnp.asarray(mask), jnp.asarray(s), 2, 4, 0.6)[:, 0]
    np.testing.assert_array_equal(got, [1, 0, 0, 1, 1, 1, 0, 0])


def test_num_swaps_rounds_like_the_unstructured_restriction():
    c = jnp.arange(0, 50, dtype=jnp.int32)
    for rate in (0.0, 0.01, 0.1, 1 / 3, 0.5, 0.7, 0.999, 1.0):
        np.testing.assert_array_equal(
            nm.num_swaps(rate, c), restriction.num_swaps(rate, c)
        )


def test_magnitude_masks_and_restrict_all():
    rng = np.random.default_rng(3)
    w = {'a': rng.normal(size=(8, 3)).astype(np.float32),
         'b': rng.normal(size=(3, 3, 4, 5)).astype(np.float32)}  # fmt: skip
    got = nm.nm_magnitude_masks(w, 2, 4)
    for k, v in w.items():
        np.testing.assert_array_equal(got[k], ref_nm_mask(np.abs(v), 2, 4))
    scores = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in w.items()}
    out = nm.nm_restrict_all(got, scores, 2, 4, 0.5)
    for k in w:
        np.testing.assert_array_equal(out[k], ref_nm_restrict(got[k], scores[k], 2, 4, 0.5))


def test_check_nm():
    nm.check_nm((2, 4), {'a': (8, 3), 'b': (3, 3, 16, 4)})
    for bad in ((4, 4), (0, 4), (2.0, 4), (True, 4), (2,), 2, (3, 2)):
        with pytest.raises(ValueError, match=r'^nm: expected a pair of ints'):
            nm.check_nm(bad, {'a': (8, 3)})
    with pytest.raises(ValueError, match=r'conv/kernel .* 3 inputs .*prunable='):
        nm.check_nm((2, 4), {'a': (8, 3), 'conv/kernel': (3, 3, 3, 16)})
    with pytest.raises(ValueError, match=r'bias .*no input axis.*prunable='):
        nm.check_nm((2, 4), {'bias': (8,)})


def test_exported_2_4_pattern_in_torch_layout():
    """As torch weights ((out, in) linear, (out, in, kh, kw) conv), the form that
    `torch.sparse.to_sparse_semi_structured` and cuDNN's sparse convs group along `in`: exactly
    2 nonzeros in every 4 consecutive inputs."""
    model, x = get_model('resnet32_cifar', 10), jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) + 2.0, shapes)
    flat = {k: v for k, v in convert._flatten(variables['params']).items() if k[-1] == 'kernel'}
    chosen = {k: v for k, v in flat.items() if v.shape[-2] % 4 == 0}
    assert len(chosen) == len(flat) - 1  # all but the stem conv (3 inputs)
    nm.check_nm((2, 4), {'/'.join(k): v.shape for k, v in chosen.items()})
    m = nm.nm_magnitude_masks({'/'.join(k): v for k, v in chosen.items()}, 2, 4)
    mask = convert._unflatten({k: np.asarray(m['/'.join(k)]) for k in chosen})
    for as_conv in (True, False):
        state = convert.to_torch(variables, 'resnet32_cifar', mask, classifier_as_conv=as_conv)
        checked = 0
        for key, w in state.items():
            if not key.endswith('weight') or w.ndim < 2 or w.shape[1] % 4:
                continue
            out, inp = w.shape[:2]
            groups = (w != 0).reshape((out, inp // 4, 4) + w.shape[2:]).sum(2)
            assert (groups == 2).all(), key
            checked += 1
        assert checked == len(chosen)
    assert state['fc.weight'].shape == (10, 64)


def test_search_steps_as_the_search_would_call_them():
    """Init from the N:M magnitude mask through `mask_scores`, then jitted steps: STE gradient,
    SGD on the scores, `nm_restrict_all` with a traced rate. Every step keeps 2:4 and the mask
    moves."""
    from ljax import masks, sparsity

    rng = np.random.default_rng(5)
    w = {'l/kernel': jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    mask = nm.nm_magnitude_masks(w, 2, 4)
    scores = sparsity.mask_scores(mask, 0.01)
    np.testing.assert_array_equal(nm.nm_mask(scores['l/kernel'], 2, 4), mask['l/kernel'])

    @jax.jit
    def step(scores, mask, rate):
        def loss(s):
            kernel = w['l/kernel'] * masks.ste(s['l/kernel'], mask['l/kernel'])
            return jnp.mean((x @ kernel - y) ** 2)

        g = jax.grad(loss)(scores)
        scores = jax.tree.map(lambda s, d: s - 0.5 * d, scores, g)
        return scores, nm.nm_restrict_all(mask, scores, 2, 4, rate)

    start, flips = mask['l/kernel'], 0
    for rate in (1.0, 0.5, 0.5, 0.2):
        scores, new = step(scores, mask, rate)
        assert (_per_group(np.asarray(new['l/kernel']), 4) == 2).all()
        flips += int(np.sum(np.asarray(new['l/kernel']) != np.asarray(mask['l/kernel'])))
        mask = new
    assert flips > 0 and (np.asarray(mask['l/kernel']) != np.asarray(start)).any()


# ------------------------------------------------------------------ groups along any input axes
def _per_group_along(mask, axes, m):
    """Kept count of every group of m consecutive entries along `axes` (the NumPy reference)."""
    flat = np.asarray(mask).reshape(-1)
    return np.array([flat[g].sum() for g in _groups(np.shape(mask), m, axes)])


AXES = [((8, 3, 4), (0,)), ((2, 4, 8), (0, 1)), ((3, 2, 4, 5), (1, 2)), ((4, 3, 2, 2), (0, 2)),
        ((2, 4), (0, 1)), ((3, 8), (1,))]  # fmt: skip


@st.composite
def layer_along(draw):
    shape, axes = draw(st.sampled_from(AXES))
    k = math.prod(shape[a] for a in axes)
    m = draw(st.sampled_from([v for v in (2, 4, 8) if k % v == 0]))
    n = draw(st.integers(1, m - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    kind = st.sampled_from(['normal', 'few', 'constant', 'zeros'])
    s = _scores(rng, shape, draw(kind))
    mask = ref_nm_mask(_scores(rng, shape, draw(kind)), n, m, axes)
    rate = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))
    return s, mask, n, m, rate, axes


@settings(max_examples=20, deadline=None)
@given(layer_along())
def test_nm_mask_and_restrict_along_any_input_axes(args):
    s, mask, n, m, rate, axes = args
    got = np.asarray(nm.nm_mask(jnp.asarray(s), n, m, axes))
    np.testing.assert_array_equal(got, ref_nm_mask(s, n, m, axes))
    assert (_per_group_along(got, axes, m) == n).all()
    new = np.asarray(nm.nm_restrict(jnp.asarray(mask), jnp.asarray(s), n, m, rate, axes))
    np.testing.assert_array_equal(new, ref_nm_restrict(mask, s, n, m, rate, axes))
    assert (_per_group_along(new, axes, m) == n).all()


def test_axis_minus_2_is_the_default():
    rng = np.random.default_rng(1)
    s = {'a': rng.normal(size=(8, 3)), 'b': rng.normal(size=(3, 3, 4, 5))}
    s = {k: jnp.asarray(v, jnp.float32) for k, v in s.items()}
    given = {'a': (0,), 'b': (2,)}
    default, explicit = nm.nm_magnitude_masks(s, 2, 4), nm.nm_magnitude_masks(s, 2, 4, given)
    mask = nm.nm_restrict_all(default, s, 2, 4, 0.5, None)
    for k in s:
        np.testing.assert_array_equal(default[k], explicit[k])
        one = nm.nm_restrict(default[k], s[k], 2, 4, 0.5, given[k])
        np.testing.assert_array_equal(mask[k], one)


def test_check_nm_names_the_real_input_size():
    nm.check_nm((2, 4), {'q': (8, 3, 4), 'o': (3, 4, 8)}, {'q': (0,), 'o': (0, 1)})
    with pytest.raises(ValueError) as e:
        nm.check_nm((2, 4), {'q': (8, 3, 4), 'o': (3, 2, 8)}, {'q': (0,), 'o': (0, 1)})
    assert str(e.value) == (
        'nm: kernel o of shape (3, 2, 8) has 6 inputs (axes (0, 1) flattened), which do not '
        'divide into groups of 4; leave it out with prunable='
    )
    with pytest.raises(ValueError) as e:
        nm.check_nm((2, 4), {'k': (6, 2, 4)}, {'k': (0,)})
    assert str(e.value).startswith('nm: kernel k of shape (6, 2, 4) has 6 inputs (axis 0), ')
    for bad in ((), (1, 0), (0, 0), (3,), (-1,), (0.0,)):
        with pytest.raises(ValueError, match=r'^nm: kernel k of shape \(8, 3\): expected its'):
            nm.check_nm((2, 4), {'k': (8, 3)}, {'k': bad})


# ------------------------------------------------------------------ input axes from the model
class Uses(nn.Module):
    """One parameter `w` of `shape`, the output `use(x, w)`."""

    shape: tuple
    use: object

    @nn.compact
    def __call__(self, x, train=False):
        return self.use(x, self.param('w', nn.initializers.normal(1.0), self.shape))


def _axes_of(shape, use, x_shape):
    x = jnp.zeros(x_shape)
    model = Uses(shape, use)
    return sparsity.input_axes(model_fn(model, model.init(jax.random.key(0), x), x), x, ['w'])['w']


NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)


def _im2col(x, w):
    return layers.im2col_conv(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)


def test_input_axes_through_views_loops_and_convolutions():
    assert _axes_of((3, 8), lambda x, w: x @ w.T, (2, 8)) == (1,)  # an (out, in) matrix
    assert _axes_of((2, 4, 3), lambda x, w: x @ w.reshape(8, 3), (2, 8)) == (0, 1)
    swapped = lambda x, w: x @ w.transpose(0, 2, 1).reshape(8, 3)
    assert _axes_of((4, 3, 2), swapped, (2, 8)) == (0, 2)
    assert _axes_of((2, 4, 3), lambda x, w: jnp.einsum('bhd,hdo->bo', x, w), (2, 2, 4)) == (0, 1)
    layered = lambda x, w: lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]
    assert _axes_of((3, 8, 8), layered, (2, 8)) == (1,)  # stacked layers, scanned over axis 0
    nhwc = (1, 5, 5, 4)
    assert _axes_of((3, 3, 4, 6), _conv, nhwc) == (2,)  # input channels, not the window
    # a convolution staged per platform: its default branch (the convolution itself) decides
    staged = lambda x, w: lax.platform_dependent(x, w, cpu=_im2col, default=_conv)
    assert _axes_of((3, 3, 4, 6), staged, nhwc) == (2,)
    # written as patches + matmul, the matmul contracts the window too
    assert _axes_of((3, 3, 4, 6), _im2col, nhwc) == (0, 1, 2)


@pytest.mark.parametrize(
    'shape, use, why',
    [
        ((8, 8), lambda x, w: (x @ w) @ w.T, r'different axes: \[\(0,\), \(1,\)\]'),
        ((8, 3), lambda x, w: x @ jnp.take(w, jnp.arange(7, -1, -1), axis=0), 'through gather'),
        ((8, 3), lambda x, w: jnp.einsum('bi,jio->bjo', x[:, :4], w.reshape(2, 4, 3)),
         'contracts part of its axis 0'),
        ((8, 3), lambda x, w: x[:, :3] * w[0], 'operand of no matmul'),
    ],
)  # fmt: skip
def test_input_axes_refusals_name_the_kernel_and_prunable(shape, use, why):
    start, end = '^nm: cannot tell the input axes of kernel w: ', '; leave it out with prunable=$'
    with pytest.raises(ValueError, match=rf'{start}.*{why}.*{end}'):
        _axes_of(shape, use, (2, 8))


class NNXAttention(nnx.Module):
    """A sequence classifier: flax's own multi-head attention (in_features 8), mean over the
    sequence, a linear head."""

    def __init__(self, heads, qkv, seed=0):
        rngs = nnx.Rngs(seed)
        self.att = nnx.MultiHeadAttention(
            num_heads=heads, in_features=8, qkv_features=qkv, decode=False, rngs=rngs
        )
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.att(x).mean(1))


class LinenAttention(nn.Module):
    heads: int
    qkv: int

    @nn.compact
    def __call__(self, x, train=False):
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.qkv)(x)
        return nn.Dense(3)(y.mean(1))


def _sequences(n_batches=2, batch=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_batches, batch, 3, 8)).astype(np.float32)
    y = rng.integers(0, 3, (n_batches, batch)).astype(np.int32)
    return list(zip(x, y))


def _leaf(tree, name):
    for key in name.split('/'):
        tree = tree[key]
    return np.asarray(tree[...] if isinstance(tree, nnx.Variable) else tree)


@pytest.mark.parametrize('kind', ['nnx', 'linen'])
def test_attention_searches_group_along_the_real_input_axes(kind):
    """2 heads of head_dim 2: query/key/value kernels (8, 2, 2) group along in (axis 0, 8
    inputs), the out projection (2, 2, 8) along the flattened (heads, head_dim) (4 inputs, each
    group spanning both heads); along axis -2 there would be only 2."""
    x = jnp.asarray(_sequences()[0][0])
    if kind == 'nnx':
        model, variables, prefix = NNXAttention(heads=2, qkv=4), None, 'att'
        fn, args = model_fn(model), (model, _sequences())
    else:
        model, prefix = LinenAttention(heads=2, qkv=4), 'MultiHeadDotProductAttention_0'
        variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), x))
        fn, args = model_fn(model, variables, x), (model, variables, _sequences())
    kernels, _ = sparsity.find_kernels(fn, x)
    head = 'head/kernel' if kind == 'nnx' else 'Dense_0/kernel'
    want = {f'{prefix}/{k}/kernel': (0,) for k in ('query', 'key', 'value')}
    want |= {f'{prefix}/out/kernel': (0, 1), head: (0,)}
    assert sparsity.input_axes(fn, x, kernels) == want
    # the one-shot mask: exactly the NumPy reference along those axes
    search = Search.create(model, variables, x, sparsity=None, total_steps=2,
                           options=SearchOptions(nm=(2, 4)))  # fmt: skip
    assert search.input_axes == {n: want[n] for n in search.names} and head not in search.names
    for n in search.names:
        w = _leaf(fn.variables['params'], n)
        np.testing.assert_array_equal(search.magnitude[n], ref_nm_mask(np.abs(w), 2, 4, want[n]))
    jp = search_jackpot(*args, nm=(2, 4), epochs=1, progress=False, lr=1.0)
    assert jp.sparsity == 0.5 and len(search.names) == 4
    for n in search.names:
        mask = _leaf(jp.mask, n)
        assert mask.dtype == bool and (_per_group_along(mask, want[n], 4) == 2).all(), n


def test_attention_kernel_with_indivisible_inputs_is_refused_with_its_real_size():
    """3 heads of head_dim 2: the out projection (3, 2, 8) has 6 inputs (not 3, its axis -2);
    the query/key/value kernels (8, 3, 2) have 8 and search fine without it."""
    model = NNXAttention(heads=3, qkv=6)
    with pytest.raises(ValueError) as e:
        search_jackpot(model, _sequences(1), nm=(2, 4), epochs=1, progress=False)
    assert str(e.value) == (
        'nm: kernel att/out/kernel of shape (3, 2, 8) has 6 inputs (axes (0, 1) flattened), '
        'which do not divide into groups of 4; leave it out with prunable='
    )
    qkv = lambda path, leaf: path[-1] == 'kernel' and path[1] in ('query', 'key', 'value')
    jp = search_jackpot(model, _sequences(1), nm=(2, 4), epochs=1, progress=False, prunable=qkv)
    for k in ('query', 'key', 'value'):
        mask = jp.mask['att'][k]['kernel']
        assert mask.shape == (8, 3, 2) and (_per_group_along(mask, (0,), 4) == 2).all()
    assert jp.mask['att']['out']['kernel'] is None
