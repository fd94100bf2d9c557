import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ljax import convert, nm, restriction
from ljax.models import get_model


# ------------------------------------------------------------------ brute-force NumPy references
def _groups(shape, m):
    """Flat index lists of every group of m consecutive entries along axis -2."""
    idx = np.arange(int(np.prod(shape))).reshape((-1,) + tuple(shape[-2:]))
    for block in idx:
        for g in range(shape[-2] // m):
            for o in range(shape[-1]):
                yield [int(i) for i in block[g * m : (g + 1) * m, o]]


def ref_nm_mask(scores, n, m):
    s = np.asarray(scores, np.float32).reshape(-1)
    out = np.zeros(s.size, bool)
    for group in _groups(np.shape(scores), m):
        best = sorted(group, key=lambda i: (-float(s[i]), i))  # -0.0 == 0.0 in the key
        out[best[:n]] = True
    return out.reshape(np.shape(scores))


def ref_nm_restrict(mask, scores, n, m, rate):
    s, mask = np.asarray(scores, np.float32).reshape(-1), np.asarray(mask, bool).reshape(-1)
    top = ref_nm_mask(scores, n, m).reshape(-1)
    revive, prune = top & ~mask, mask & ~top
    c = int(revive.sum())
    r = min(c, max(0, math.ceil(np.float32(rate) * np.float32(c))))
    come_in = sorted(np.flatnonzero(revive), key=lambda i: (-float(s[i]), i))[:r]
    new = mask.copy()
    new[come_in] = True
    for group in _groups(np.shape(scores), m):
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
