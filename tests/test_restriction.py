import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ljax import masks, restriction
from tests import reference


def restrict_one(mask, scores, k, rate):
    """`restriction.restrict_masks` on one layer: its new mask."""
    new, _ = restriction.restrict_masks({'w': jnp.asarray(mask)}, {'w': jnp.asarray(scores)},
                                        {'w': k}, rate)
    return np.asarray(new['w'])


@st.composite
def layer(draw):
    n = draw(st.sampled_from([6, 12, 30, 64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    k = draw(st.integers(0, n))
    if draw(st.booleans()):  # tie-heavy: few distinct values
        scores = rng.choice(np.array([0.0, 0.5, 0.99, 1.0], np.float32), size=n)
    else:
        scores = rng.normal(size=n).astype(np.float32)
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:k]] = True
    rate = draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.999, 1.0]))
    return mask, scores, k, rate


@settings(max_examples=80, deadline=None)
@given(layer())
def test_restrict_matches_brute_force_and_keeps_the_count(args):
    mask, scores, k, rate = args
    got = restrict_one(mask, scores, k, rate)
    np.testing.assert_array_equal(got, reference.restrict(mask, scores, k, rate))
    assert got.sum() == k
    c = int((reference.topk(scores, k) & ~mask).sum())
    assert (got & ~mask).sum() <= math.ceil(np.float32(rate) * np.float32(c))


@settings(max_examples=30, deadline=None)
@given(layer())
def test_rate_one_is_plain_topk_and_rate_zero_freezes(args):
    mask, scores, k, _ = args
    np.testing.assert_array_equal(
        restrict_one(mask, scores, k, 1.0), reference.topk(scores, k)
    )
    np.testing.assert_array_equal(restrict_one(mask, scores, k, 0.0), mask)


def test_half_rate_swaps_the_best_and_the_worst_candidates():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.5, 0.2], np.float32)
    mask = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)  # top-4 is indices 0..3: c = 4
    got = restrict_one(mask, scores, 4, 0.5)
    # r = 2: 0 and 1 come in; 5 (0.0) and 7 (0.2) leave
    np.testing.assert_array_equal(got, [1, 1, 0, 0, 1, 0, 1, 0])


def test_schedules():
    steps = 100
    assert float(restriction.rate_schedule('none', steps)(50)) == 1.0
    assert float(restriction.rate_schedule(0.25, steps)(7)) == 0.25
    assert float(restriction.rate_schedule('constant:0.5', steps)(7)) == 0.5
    np.testing.assert_allclose(restriction.rate_schedule('poly4', steps)(50), 0.5**4, rtol=1e-6)
    np.testing.assert_allclose(restriction.rate_schedule('cosine', steps)(50), 0.5, rtol=1e-6)
    np.testing.assert_allclose(restriction.rate_schedule('linear', steps)(25), 0.75, rtol=1e-6)
    assert float(restriction.rate_schedule('poly4', steps)(0)) == 1.0
    with pytest.raises(ValueError, match='restriction'):
        restriction.rate_schedule('nope', steps)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        restriction.rate_schedule(1.5, steps)


# ------------------------------------------------------------------ all layers at once
LAYERS = {'conv/kernel': (3, 3, 4, 5), 'odd/kernel': (257,), 'big/kernel': (1088, 64), 'one': (1,)}


@st.composite
def layer_dicts(draw):
    """Masks of exactly k (the top-k of the previous scores) and scores after a small step."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    mask, scores, kept, before = {}, {}, {}, {}
    for name, shape in LAYERS.items():
        n = int(np.prod(shape))
        k = draw(st.sampled_from([0, n, int(rng.integers(0, n + 1))]))
        if draw(st.booleans()):  # tie-heavy, signed zeros
            prev = rng.choice(np.array([-0.0, 0.0, 0.5, 1.0], np.float32), size=shape)
            new = rng.choice(np.array([-0.0, 0.0, 0.5, 1.0], np.float32), size=shape)
        else:
            prev = rng.normal(size=shape).astype(np.float32)
            new = prev + np.float32(draw(st.sampled_from([1e-3, 0.1]))) * rng.normal(
                size=shape
            ).astype(np.float32)
        mask[name], scores[name], kept[name], before[name] = reference.topk(prev, k), new, k, prev
    return mask, scores, kept, before, rng


@settings(max_examples=16, deadline=None)
@given(
    layer_dicts(),
    st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    st.sampled_from(['none', 'stale', 'right', 'garbage']),
    st.sampled_from(masks.SELECTIONS),
    st.booleans(),
)
@pytest.mark.slow  # many compilations; the brute-force reference over every hint kind
def test_restrict_masks_match_reference_and_per_layer(args, rate, hint_kind, selection, count_flips):
    mask, scores, kept, before, rng = args
    threshold = lambda s, n: masks.topk_mask_with_threshold(jnp.asarray(s), kept[n])[1]
    hints = {
        'none': None,
        'stale': {n: threshold(before[n], n) for n in scores},
        'right': {n: threshold(scores[n], n) for n in scores},
        'garbage': {n: jnp.uint32(rng.integers(0, 2**32)) for n in scores},
    }[hint_kind]
    out = restriction.restrict_masks(
        {n: jnp.asarray(m) for n, m in mask.items()},
        {n: jnp.asarray(s) for n, s in scores.items()},
        kept,
        jnp.float32(rate),
        hints,
        selection=selection,
        count_flips=count_flips,
    )
    got, thresholds = out[:2]
    assert len(out) == 2 + count_flips
    if count_flips:
        assert int(out[2]) == sum(int(np.sum(np.asarray(got[n]) != mask[n])) for n in scores)
    for n in scores:
        np.testing.assert_array_equal(
            got[n], reference.restrict(mask[n], scores[n], kept[n], rate).reshape(mask[n].shape)
        )
        _, t = masks.topk_mask_with_threshold(jnp.asarray(scores[n]), kept[n])
        assert int(thresholds[n]) == int(t)


def test_restrict_masks_gathered_path_under_jit_with_traced_rate():
    rng = np.random.default_rng(6)
    prev = rng.normal(size=(1088, 64)).astype(np.float32)
    new = prev + 1e-2 * rng.normal(size=prev.shape).astype(np.float32)
    k = 600
    mask = reference.topk(prev, k)
    hint = masks.topk_mask_with_threshold(jnp.asarray(prev), k)[1]
    assert bool(masks.plan(jnp.asarray(new), k, hint, jnp.asarray(mask), force=True).valid)
    f = jax.jit(
        lambda m, s, r: restriction.restrict_masks(m, s, {'w': k}, r, {'w': hint}, count_flips=True)
    )
    for rate in (0.0, 0.5, 0.999, 1.0):
        got, _, flips = f({'w': jnp.asarray(mask)}, {'w': jnp.asarray(new)}, jnp.float32(rate))
        want = reference.restrict(mask, new, k, rate)
        np.testing.assert_array_equal(got['w'], want)
        assert int(flips) == np.sum(want != mask)  # counted on the gathered blocks alone
    moved = reference.restrict(mask, new, k, 0.5)
    assert 0 < (moved != mask).sum() < (reference.topk(new, k) != mask).sum()  # a real half step


def test_restrict_masks_far_moved_threshold_takes_the_wide_gather():
    # 1088 blocks; the hint 45 keys off the threshold overflows the first gather (32 blocks), the
    # old mask's changed blocks overflow it too: the layer's second try gathers up to 136 blocks
    rng = np.random.default_rng(7)
    prev = rng.normal(size=(1088, 64)).astype(np.float32)
    new = prev + 1e-3 * rng.normal(size=prev.shape).astype(np.float32)
    k = 3000
    mask = reference.topk(prev, k)
    hint = masks.order_keys(jnp.asarray(np.sort(new.reshape(-1))[::-1][k + 45 - 1]))
    plan = masks.plan(jnp.asarray(new), k, hint, jnp.asarray(mask), force=True)
    inside, cap, _, _ = masks.wide_blocks(plan)
    assert not bool(plan.valid) and int(inside.sum()) <= cap
    for rate in (0.0, 0.5, 1.0):
        got, t, flips = restriction.restrict_masks(
            {'w': jnp.asarray(mask)}, {'w': jnp.asarray(new)}, {'w': k}, jnp.float32(rate),
            {'w': hint}, count_flips=True,
        )
        want = reference.restrict(mask, new, k, rate)
        np.testing.assert_array_equal(got['w'], want)
        assert int(flips) == np.sum(want != mask)
        assert int(t['w']) == int(masks.topk_mask_with_threshold(jnp.asarray(new), k)[1])


def test_is_plain_topk_names_exactly_the_rate_one_schedules():
    for name in ('none', 1.0, 1, 'constant:1', 'constant:1.0'):
        assert restriction.is_plain_topk(name), name
    for name in ('cosine', 'poly4', 'linear', 0.5, 'constant:0.5', True, lambda step: 1.0):
        assert not restriction.is_plain_topk(name), name


def test_restrict_masks_rejects_an_unknown_selection():
    with pytest.raises(ValueError, match="selection must be one of .*'sorted'"):
        restriction.restrict_masks({'w': jnp.ones(4, bool)}, {'w': jnp.ones(4)}, {'w': 4}, 1.0,
                                   selection='sorted')
