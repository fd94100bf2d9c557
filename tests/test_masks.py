import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from ljax import masks
from tests import reference

SHAPES = [(7,), (3, 5), (4, 4, 3), (2, 3, 3, 8), (257,)]


@st.composite
def scores_and_k(draw, tie_heavy=None):
    shape = draw(st.sampled_from(SHAPES))
    n = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    kind = draw(
        st.sampled_from(['normal', 'few', 'constant', 'zeros'])
        if tie_heavy is None
        else st.just(tie_heavy)
    )
    if kind == 'normal':
        s = rng.normal(size=shape)
    elif kind == 'few':  # duplicated values, both signs of zero
        s = rng.choice(np.array([-1.0, -0.0, 0.0, 0.5, 0.99, 1.0]), size=shape)
    elif kind == 'constant':
        s = np.full(shape, 0.7)
    else:  # weights of dead inputs: all equal, signed zeros mixed
        s = rng.choice(np.array([-0.0, 0.0]), size=shape)
    return s.astype(np.float32), draw(st.integers(0, n))


@settings(max_examples=60, deadline=None)
@given(scores_and_k())
def test_topk_is_exact_and_matches_reference(args):
    s, k = args
    got = np.asarray(masks.topk_mask(jnp.asarray(s), k))
    assert got.sum() == k
    np.testing.assert_array_equal(got, reference.topk(s, k))


@settings(max_examples=40, deadline=None)
@given(scores_and_k(), st.integers(0, 2**31))
def test_topk_with_valid_subset(args, seed):
    s, _ = args
    valid = np.random.default_rng(seed).random(s.shape) < 0.5
    k = int(valid.sum()) // 2
    got = np.asarray(masks.topk_mask(jnp.asarray(s), k, valid=jnp.asarray(valid)))
    assert got.sum() == k and not (got & ~valid).any()
    np.testing.assert_array_equal(got, reference.topk(s, k, valid))


@settings(max_examples=40, deadline=None)
@given(scores_and_k('normal'), st.integers(-3, 3), st.integers(0, 2**32 - 1))
def test_hint_never_changes_the_result(args, shift, far_hint):
    s, k = args
    plain, threshold = masks.topk_mask_with_threshold(jnp.asarray(s), k)
    # a hint near the true threshold (the fast path) and one anywhere (the fallback)
    near = np.uint32(int(threshold) + shift * 1000) if 0 < k else np.uint32(5)
    for hint in (near, np.uint32(far_hint)):
        hinted, t2 = masks.topk_mask_with_threshold(jnp.asarray(s), k, hint=hint)
        np.testing.assert_array_equal(np.asarray(hinted), np.asarray(plain))
        assert int(t2) == int(threshold)


def test_signed_zeros_rank_equal_and_ties_go_to_lower_index():
    s = jnp.array([-0.0, 0.0, -0.0, 1.0, 0.0])
    np.testing.assert_array_equal(masks.topk_mask(s, 3), [True, True, False, True, False])


def test_order_keys_preserve_float_order():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
    k = np.asarray(masks.order_keys(jnp.asarray(x)), np.int64)
    assert np.all(np.diff(k[[0, 1, 2, 4, 5, 6, 7]]) > 0) and k[3] == k[4]


def test_topk_accepts_traced_k():
    s = jnp.arange(10.0)
    f = jax.jit(lambda k: masks.topk_mask(s, k).sum())
    assert [int(f(k)) for k in (0, 3, 10)] == [0, 3, 10]


def test_ste_forward_is_the_mask_and_backward_is_identity():
    scores = jnp.array([0.3, -1.0, 2.0, 0.5])
    mask = jnp.array([True, False, True, False])
    np.testing.assert_array_equal(masks.ste(scores, mask), [1.0, 0.0, 1.0, 0.0])
    upstream = jnp.array([1.0, 2.0, 3.0, 4.0])
    g = jax.grad(lambda s: jnp.sum(masks.ste(s, mask) * upstream))(scores)
    np.testing.assert_array_equal(g, upstream)


def test_ste_gradient_is_dL_d_masked_weight_times_weight():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    scores = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    mask = masks.topk_mask(scores, 6)
    loss = lambda masked_w: jnp.sum(jnp.tanh(x @ masked_w) ** 2)
    g_scores = jax.grad(lambda s: loss(w * masks.ste(s, mask)))(scores)
    g_masked = jax.grad(loss)(w * mask)
    np.testing.assert_allclose(g_scores, g_masked * w, rtol=1e-6, atol=1e-7)


def test_topk_ste_forward_topk_backward_identity():
    scores = jnp.array([0.1, 0.9, 0.5, 0.7])
    np.testing.assert_array_equal(masks.topk_ste(scores, 2), [0.0, 1.0, 0.0, 1.0])
    g = jax.grad(lambda s: jnp.sum(masks.topk_ste(s, 2) * jnp.arange(4.0)))(scores)
    np.testing.assert_array_equal(g, jnp.arange(4.0))
