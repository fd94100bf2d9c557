import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ljax import restriction
from tests import reference


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
    got = np.asarray(restriction.restrict_mask(jnp.asarray(mask), jnp.asarray(scores), k, rate))
    np.testing.assert_array_equal(got, reference.restrict(mask, scores, k, rate))
    assert got.sum() == k
    c = int((reference.topk(scores, k) & ~mask).sum())
    assert (got & ~mask).sum() <= math.ceil(np.float32(rate) * np.float32(c))


@settings(max_examples=30, deadline=None)
@given(layer())
def test_rate_one_is_plain_topk_and_rate_zero_freezes(args):
    mask, scores, k, _ = args
    np.testing.assert_array_equal(
        restriction.restrict_mask(mask, scores, k, 1.0), reference.topk(scores, k)
    )
    np.testing.assert_array_equal(restriction.restrict_mask(mask, scores, k, 0.0), mask)


def test_half_rate_swaps_the_best_and_the_worst_candidates():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.5, 0.2], np.float32)
    mask = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)  # top-4 is indices 0..3: c = 4
    got = np.asarray(restriction.restrict_mask(mask, scores, 4, 0.5))
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
