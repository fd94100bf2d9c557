import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ljax import masks, selection
from tests import reference, staging

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


@settings(max_examples=60, deadline=None)
@given(scores_and_k(), st.sampled_from([np.float32, np.float64]))
def test_host_topk_is_the_device_topk(args, dtype):
    """The NumPy top-k (magnitude masks at set-up) keeps exactly the positions the compiled one
    keeps, ties and signed zeros included; float64 scores are ranked as given, not rounded."""
    s, k = args
    got = masks.host_topk_mask(s.astype(dtype), k)
    assert got.shape == s.shape and got.dtype == bool and got.sum() == k
    np.testing.assert_array_equal(got, np.asarray(masks.topk_mask(jnp.asarray(s), k)))
    close = np.array([1.0, 1.0 + 1e-12, 1.0])  # equal in float32, ordered in float64
    np.testing.assert_array_equal(masks.host_topk_mask(close, 1), [False, True, False])


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
    x = np.concatenate([x, np.random.default_rng(0).normal(size=1000).astype(np.float32)])
    np.testing.assert_array_equal(selection.host_order_keys(x), masks.order_keys(jnp.asarray(x)))


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


def topk_ste(scores, k):
    """The search's STE on a top-k mask: forward the mask, backward identity to the scores."""
    return masks.ste(scores, jax.lax.stop_gradient(masks.topk_mask(scores, k)))


def test_topk_ste_forward_topk_backward_identity():
    scores = jnp.array([0.1, 0.9, 0.5, 0.7])
    np.testing.assert_array_equal(topk_ste(scores, 2), [0.0, 1.0, 0.0, 1.0])
    g = jax.grad(lambda s: jnp.sum(topk_ste(s, 2) * jnp.arange(4.0)))(scores)
    np.testing.assert_array_equal(g, jnp.arange(4.0))


# ------------------------------------------------------------------ all layers at once
# Shapes fixed so that jit compiles once; 'big' has more blocks than the candidate capacity, so
# a good hint exercises the gathered fast path and a bad one the exact fallback.
LAYERS = {'conv/kernel': (3, 3, 4, 5), 'odd/kernel': (257,), 'big/kernel': (1088, 64), 'one': (1,)}


def layer_scores(rng, shape, kind):
    if kind == 'normal':
        return rng.normal(size=shape).astype(np.float32)
    values = [-1.0, -0.0, 0.0, 0.5, 1.0] if kind == 'few' else [-0.0, 0.0]
    return rng.choice(np.array(values, np.float32), size=shape)


@st.composite
def layer_dicts(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    scores, kept = {}, {}
    for name, shape in LAYERS.items():
        scores[name] = layer_scores(rng, shape, draw(st.sampled_from(['normal', 'few', 'zeros'])))
        n = int(np.prod(shape))
        kept[name] = draw(st.sampled_from([0, n, int(rng.integers(0, n + 1))]))
    return scores, kept, rng


def hints_for(kind, scores, kept, rng):
    """'right': thresholds of these scores; 'stale': of scores before a small step; 'garbage'."""
    if kind == 'none':
        return None
    if kind == 'garbage':
        return {n: jnp.uint32(rng.integers(0, 2**32)) for n in scores}
    if kind == 'stale':
        scores = {n: s - 1e-3 * rng.normal(size=s.shape).astype(np.float32) for n, s in scores.items()}
    return {n: masks.topk_mask_with_threshold(jnp.asarray(s), kept[n])[1] for n, s in scores.items()}


def old_masks(kind, scores, kept, rng):
    """Masks a step replaces: None (flips not counted), the top-k of scores before a small step,
    or random bits (any mask may be given)."""
    if kind == 'none':
        return None
    if kind == 'random':
        return {n: jnp.asarray(rng.random(s.shape) < 0.5) for n, s in scores.items()}
    before = {n: s - 1e-3 * rng.normal(size=s.shape).astype(np.float32) for n, s in scores.items()}
    return {n: jnp.asarray(reference.topk(s, kept[n])) for n, s in before.items()}


@settings(max_examples=16, deadline=None)
@given(
    layer_dicts(),
    st.sampled_from(['none', 'right', 'stale', 'garbage']),
    st.sampled_from(masks.SELECTIONS),
    st.sampled_from(['none', 'stale', 'random']),
)
def test_topk_masks_match_reference_and_per_layer(args, hint_kind, selection, old_kind):
    scores, kept, rng = args
    hints = hints_for(hint_kind, scores, kept, rng)
    old = old_masks(old_kind, scores, kept, rng)
    out = masks.topk_masks(
        {n: jnp.asarray(s) for n, s in scores.items()}, kept, hints, selection=selection, old=old
    )
    got, thresholds = out[:2]
    if old is None:
        assert len(out) == 2
    else:  # the flips, counted from the hint pass and the gathered blocks where it can
        want = sum(int(np.sum(reference.topk(s, kept[n]) != np.asarray(old[n]))) for n, s in scores.items())
        assert int(out[2]) == want
    assert set(got) == set(scores)
    for n, s in scores.items():
        m = np.asarray(got[n])
        assert m.shape == s.shape and m.sum() == kept[n]
        np.testing.assert_array_equal(m, reference.topk(s, kept[n]))
        _, t = masks.topk_mask_with_threshold(jnp.asarray(s), kept[n])
        assert thresholds[n].dtype == jnp.uint32 and int(thresholds[n]) == int(t)


@pytest.mark.parametrize('selection', masks.SELECTIONS)
def test_topk_masks_takes_traced_k_and_hints_under_jit(selection):
    rng = np.random.default_rng(3)
    scores = {n: jnp.asarray(layer_scores(rng, s, 'few')) for n, s in LAYERS.items()}
    f = jax.jit(functools.partial(masks.topk_masks, selection=selection))
    for frac in (0.0, 0.3, 1.0):
        kept = {n: jnp.int32(round(frac * int(np.prod(s)))) for n, s in LAYERS.items()}
        hints = {n: jnp.uint32(0x80000000) for n in LAYERS}
        got, _ = f(scores, kept, hints)
        for n in LAYERS:
            np.testing.assert_array_equal(got[n], reference.topk(np.asarray(scores[n]), int(kept[n])))


def test_near_hint_takes_the_gathered_path_and_a_far_one_falls_back():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(1088, 64)).astype(np.float32)
    k = 600
    _, t = masks.topk_mask_with_threshold(jnp.asarray(s), k)
    moved = jnp.asarray(s + 1e-4 * rng.normal(size=s.shape).astype(np.float32))
    near = masks.plan(moved, k, t)
    assert bool(near.valid) and near.idx.size < 1088  # a subset of the blocks holds the threshold
    assert not bool(masks.plan(moved, k, jnp.uint32(0x90000000)).valid)
    old = reference.topk(s + 0.1 * rng.normal(size=s.shape).astype(np.float32), k)  # steps ago
    for hint in (t, jnp.uint32(0x90000000)):
        got, t2, flips = masks.topk_masks({'w': moved}, {'w': k}, {'w': hint}, old={'w': old})
        want = reference.topk(np.asarray(moved), k)
        np.testing.assert_array_equal(got['w'], want)
        assert int(t2['w']) == int(masks.topk_mask_with_threshold(moved, k)[1])
        assert int(flips) == np.sum(want != old) > 0


def test_extrapolate_continues_the_drift_and_clamps_to_uint32():
    top = 0xFFFFFFFF
    for last, previous, want in [
        (10, 7, 13), (7, 10, 4), (5, 5, 5), (top - 1, 5, top), (3, top, 0), (top, 0, top), (0, top, 0),
    ]:
        got = masks.extrapolate(jnp.uint32(last), jnp.uint32(previous))
        assert got.dtype == jnp.uint32 and int(got) == want, (last, previous, int(got))


def test_extrapolated_hint_lands_where_a_stale_one_overflows():
    """Scores drifting steadily (as under momentum): the last threshold misses the first gather,
    last + (last - previous) hits it; the masks are exact either way."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(1088, 64)).astype(np.float32)
    k = 6000
    steps = [jnp.asarray(base + 0.01 * t) for t in range(3)]
    t0, t1 = (masks.topk_mask_with_threshold(s, k)[1] for s in steps[:2])
    hint = masks.extrapolate(t1, t0)
    assert not bool(masks.plan(steps[2], k, t1).valid)
    assert bool(masks.plan(steps[2], k, hint).valid)
    for h in (t1, hint):
        got, _ = masks.topk_masks({'w': steps[2]}, {'w': k}, {'w': h})
        np.testing.assert_array_equal(got['w'], reference.topk(np.asarray(steps[2]), k))


def test_first_gather_holds_the_threshold_when_scores_differ_in_their_last_bits():
    """Early in a search the scores sit near 1.0 and differ by a few ulps: the nearest keys of
    over a hundred blocks then lie within 128 of the hint, where a float32 of the key itself ties
    them (and only 32 blocks are gathered); the distance to the hint stays exact, so an exact
    hint's first gather holds the threshold."""
    rng = np.random.default_rng(1)  # seeds 1, 2, 5-8 of 0-11 missed with a float32 of the key
    ulps = rng.permutation(2048 * 64).reshape(2048, 64)  # distinct scores: no ties
    s = (np.float32(1.0).view(np.int32) + ulps).astype(np.int32).view(np.float32)
    k = int(s.size * 0.1)
    _, t = masks.topk_mask_with_threshold(jnp.asarray(s), k)
    assert bool(masks.plan(jnp.asarray(s), k, t).valid)
    got, t2 = masks.topk_masks({'w': jnp.asarray(s)}, {'w': k}, {'w': t})
    np.testing.assert_array_equal(got['w'], reference.topk(s, k))
    assert int(t2['w']) == int(t)


def test_gathered_path_resolves_ties_and_signed_zeros_by_index():
    rng = np.random.default_rng(5)
    s = rng.normal(size=(1088, 64)).astype(np.float32)
    spots = rng.choice(s.size, 9, replace=False)
    s.reshape(-1)[spots] = np.array([0.0, -0.0] * 4 + [0.0], np.float32)  # ties at zero
    k = int((s > 0).sum()) + 4  # the threshold is zero, 4 of the 9 zeros (plus natural ones) kept
    hint = masks.topk_mask_with_threshold(jnp.asarray(s + 1e-3), k)[1]
    assert bool(masks.plan(jnp.asarray(s), k, hint).valid)
    got, t = masks.topk_masks({'w': jnp.asarray(s)}, {'w': k}, {'w': hint})
    np.testing.assert_array_equal(got['w'], reference.topk(s, k))
    assert int(t['w']) == int(masks.order_keys(jnp.float32(0.0)))


def _hint_at_rank(s, rank):
    """The key of the rank-th largest score (1-based): a hint |e| = |rank - k| keys away."""
    return masks.order_keys(jnp.asarray(np.sort(s.reshape(-1))[::-1][rank - 1]))


def test_far_moved_threshold_takes_the_wide_gather_and_stays_exact():
    # 1088 blocks: the first try gathers 32 of them, the second 1088 // wide_share = 136
    rng = np.random.default_rng(6)
    s = rng.normal(size=(1088, 64)).astype(np.float32)
    k = 3000
    for e in (45, -45, 5000):  # above the threshold, below it, and too far for either try
        hint = _hint_at_rank(s, k + e)
        plan = masks.plan(jnp.asarray(s), k, hint)
        assert not bool(plan.valid)
        inside, cap, _, _ = masks.wide_blocks(plan)
        assert bool(inside.sum() <= cap) == (abs(e) < 100)
        got, t = masks.topk_masks({'w': jnp.asarray(s)}, {'w': k}, {'w': hint})
        np.testing.assert_array_equal(got['w'], reference.topk(s, k))
        assert int(t['w']) == int(masks.topk_mask_with_threshold(jnp.asarray(s), k)[1])


@pytest.mark.slow  # many compilations
@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(['normal', 'few']), st.integers(-200, 200))
def test_wide_gather_matches_reference_with_ties(seed, kind, e):
    rng = np.random.default_rng(seed)
    s = layer_scores(rng, (1088, 64), kind)
    k = int(rng.integers(1, s.size))
    hint = _hint_at_rank(s, int(np.clip(k + e, 1, s.size)))
    plan = masks.plan(jnp.asarray(s), k, hint)
    # the second try alone (gathered blocks or the whole layer, bisected within the bracket),
    # whether or not the first would have sufficed
    t, last = masks.second_try(jnp.asarray(s), k, plan)
    assert int(t) == int(masks.topk_mask_with_threshold(jnp.asarray(s), k)[1])
    r = np.asarray(masks.order_keys(jnp.asarray(s))).reshape(-1)
    chosen = (r > int(t)) | ((r == int(t)) & (np.arange(r.size) <= int(last)))
    np.testing.assert_array_equal(chosen, reference.topk(s, k).reshape(-1))
    got, _ = masks.topk_masks({'w': jnp.asarray(s)}, {'w': k}, {'w': hint})
    np.testing.assert_array_equal(got['w'], reference.topk(s, k))


def test_wide_gather_splits_ties_at_indices_beyond_the_gathered_size():
    # regression: the tie bisection must cover the layer's indices, not the gathered count
    rng = np.random.default_rng(8)
    s = rng.normal(size=(1088, 64)).astype(np.float32)
    flat = s.reshape(-1)
    spots = np.sort(rng.choice(np.arange(40000, flat.size), 6, replace=False))
    flat[spots] = np.float32(1.5)  # six ties, far beyond the 136 * 64 gathered positions
    k = int((flat > 1.5).sum()) + 3  # three of the six are kept: the lowest indices
    hint = _hint_at_rank(s, k + 45)
    plan = masks.plan(jnp.asarray(s), k, hint)
    inside, cap, _, _ = masks.wide_blocks(plan)
    assert not bool(plan.valid) and int(inside.sum()) <= cap  # the gathered second try
    got, _ = masks.topk_masks({'w': jnp.asarray(s)}, {'w': k}, {'w': hint})
    np.testing.assert_array_equal(got['w'], reference.topk(s, k))
    assert np.asarray(got['w']).reshape(-1)[spots].tolist() == [True] * 3 + [False] * 3


def test_selection_defaults_to_the_backend_and_rejects_unknown_names(monkeypatch):
    cpu = jax.default_backend() == 'cpu'
    assert masks.default_selection() == ('native' if cpu else 'segmented')  # kernels built here
    with pytest.raises(ValueError, match="selection must be one of .*'sorted'"):
        masks.topk_masks({'w': jnp.ones(4)}, {'w': 2}, selection='sorted')
    # without ljax's C++ kernels: XLA's hinted program, and 'native' refused in one line
    monkeypatch.setattr(masks, '_native_available', lambda: False)
    assert masks.default_selection() == ('hinted' if cpu else 'segmented')
    with pytest.raises(ValueError, match="selection='native' needs ljax's C\\+\\+ kernels"):
        masks.topk_masks({'w': jnp.ones(4)}, {'w': 2}, selection='native')


@pytest.mark.parametrize('fn', ['topk', 'restrict'])
def test_hinted_update_never_writes_a_layers_keys_out(fn):
    # The hinted selection reads each layer's scores twice (the plan's pass, the mask write), each
    # computing the order keys on the fly. XLA merged the two identical expressions and wrote the
    # keys out (uint32, the layer's size) to read them back: that doubled the mask update on
    # ResNet-50's shapes. No entry-level op may produce a uint32 array of a layer's full size.
    from ljax import restriction

    shapes = {'a': (256, 1024), 'b': (3, 3, 128, 128)}
    scores = {n: jnp.zeros(s, jnp.float32) for n, s in shapes.items()}
    kept = {n: int(np.prod(s)) // 10 for n, s in shapes.items()}
    hints = {n: jnp.uint32(1 << 31) for n in shapes}
    if fn == 'topk':
        lowered = masks.topk_masks.lower(scores, kept, hints, selection='hinted')
    else:
        mask = {n: jnp.zeros(s, bool) for n, s in shapes.items()}
        lowered = restriction.restrict_masks.lower(mask, scores, kept, 0.5, hints, selection='hinted')
    text = lowered.compile().as_text()
    entry = text[text.index('\nENTRY'):]
    sizes = {int(np.prod(s)) for s in shapes.values()}
    written = [
        line.strip()[:120]
        for line in entry.splitlines()
        for shape in re.findall(r'= u32\[([0-9,]+)\]', line)
        if int(np.prod([int(d) for d in shape.split(',')])) in sizes
    ]
    assert written == []


@pytest.mark.slow  # many compilations
@pytest.mark.parametrize('seed', range(3))
def test_stacked_selection_matches_the_per_row_selection(seed):
    # Rows of three sizes (two sharing one), tie-heavy and padded (key 0) rows, k from 0 to all
    # real keys, and hints on the threshold, near it, far off (the window misses: that row takes
    # 32 passes while the others take 16 in the same loop) and none (the [min, max] bracket).
    rng = np.random.default_rng(seed)
    sizes = [128, 128, 192, 320, 192]
    rows, ks, indices = [], [], []
    for i, size in enumerate(sizes):
        values = rng.normal(size=size) if i % 2 else rng.choice([-1.0, -0.0, 0.0, 0.5, 1.0], size)
        keys = np.array(masks.order_keys(jnp.asarray(values, jnp.float32)))
        real = size - int(rng.integers(0, size // 2)) if i > 1 else size
        keys[real:] = 0  # padding past a layer's end
        rows.append(jnp.asarray(keys))
        ks.append(jnp.int32([0, real, int(rng.integers(1, real))][i % 3]))
        indices.append(jnp.asarray(np.sort(rng.choice(10 * size, size, replace=False)), jnp.int32))
    want = selection.select(selection.Stacked(rows, indices, stack=False), ks)  # row by row, 32 bits
    exact = [np.asarray(t) for t in want[0]]
    for hints in (
        exact,
        [t + np.uint32(5) if t < 2**31 else t - np.uint32(5) for t in exact],
        [np.uint32(rng.integers(0, 2**32)) for _ in rows],
        None,
    ):
        got = jax.jit(
            lambda r, k, i, h: selection.select(selection.Stacked(r, i), k, h, span_rows=h is None)
        )(rows, ks, indices, hints)
        assert [int(t) for t in got[0]] == [int(t) for t in want[0]]
        assert [int(c) for c in got[1]] == [int(c) for c in want[1]]


@pytest.mark.parametrize('kind', ['normal', 'few', 'zeros'])
def test_native_kernel_matches_the_reference_across_chunks(kind):
    # 1,200,003 weights: 19 chunks of the kernel's pass and its write (run on XLA's thread pool)
    # and a short last block; ties spread over every chunk ('few', 'zeros': -0.0 ranks as +0.0).
    # The old mask donated too: the kernel then writes only the chunks and blocks that can change.
    rng = np.random.default_rng(11)
    s = layer_scores(rng, (1_200_003,), kind)
    old = rng.random(s.shape) < 0.2
    keys = np.asarray(masks.order_keys(jnp.asarray(s)))
    ranked = np.sort(keys)[::-1]
    # with weights, the masked weights too: written where the mask changes over the old ones
    # (donated with it), or all of them into a buffer of their own
    w = rng.normal(size=s.shape).astype(np.float32)
    w_old = np.where(old, w, np.float32(0))
    fresh = jax.jit(masks.native_topk_mask)
    in_place = jax.jit(masks.native_topk_mask, donate_argnums=(3, 5))
    weights_apart = jax.jit(masks.native_topk_mask, donate_argnums=3)
    for k in (0, 1, 12_345, 600_000, 1_200_002, 1_200_003):
        want = reference.topk(s, k)
        want_w = np.where(want, w, np.float32(0)).view(np.uint32)  # +0.0 where pruned
        _, t = masks.topk_mask_with_threshold(jnp.asarray(s), k)
        # hints a few keys off (the chunks' nearest blocks bound the search) and a few dozen
        near = [int(ranked[np.clip(k - 1 + d, 0, s.size - 1)]) for d in (-40, -3, 3, 40)]
        for hint in (None, t, int(keys[rng.integers(0, s.size)]), 1, 0xFFFFFFFF, *near):
            h = None if hint is None else jnp.uint32(hint)
            for step in (fresh, in_place, weights_apart):
                args = (jnp.asarray(s), k, h, jnp.array(old))
                if step is fresh:
                    got, t2, flips = step(*args)
                else:
                    got, t2, flips, got_w = step(*args, jnp.asarray(w), jnp.array(w_old))
                    np.testing.assert_array_equal(np.asarray(got_w).view(np.uint32), want_w)
                np.testing.assert_array_equal(got, want)
                assert int(t2) == int(t) and int(flips) == int(np.sum(want != old)), (k, hint)


def test_native_kernel_in_place_writes_every_block_that_changes():
    # As during a search: the old mask is nearly the new one (a few dozen scattered bits differ),
    # so in place the kernel skips most groups of blocks and writes only those that change. Every
    # changed bit and masked weight must still land, with any hint, near or far.
    rng = np.random.default_rng(5)
    s = layer_scores(rng, (1_200_003,), 'normal')
    w = rng.normal(size=s.shape).astype(np.float32)
    keys = np.asarray(masks.order_keys(jnp.asarray(s)))
    ranked = np.sort(keys)[::-1]
    in_place = jax.jit(masks.native_topk_mask, donate_argnums=(3, 5))
    for k in (12_345, 600_000):
        want = reference.topk(s, k)
        want_w = np.where(want, w, np.float32(0)).view(np.uint32)
        _, t = masks.topk_mask_with_threshold(jnp.asarray(s), k)
        for changed in (1, 37, 500):
            old = want.copy()
            flip = rng.choice(s.size, changed, replace=False)
            old[flip] = ~old[flip]
            w_old = np.where(old, w, np.float32(0))
            for hint in (t, int(ranked[k - 1 + 3]), int(ranked[k - 1 - 40]), 1):
                got, t2, flips, got_w = in_place(jnp.asarray(s), k, jnp.uint32(hint),
                                                 jnp.array(old), jnp.asarray(w), jnp.array(w_old))
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(np.asarray(got_w).view(np.uint32), want_w)
                assert int(t2) == int(t) and int(flips) == changed, (k, changed, hint)
        # the old mask exactly (key >= hint): it differs from the new one only between the hint
        # and the threshold, in blocks that only the selection's candidates reveal
        for hint in (int(ranked[k - 1 + 3]), int(ranked[k - 1 - 40])):
            old = keys >= hint
            w_old = np.where(old, w, np.float32(0))
            got, t2, flips, got_w = in_place(jnp.asarray(s), k, jnp.uint32(hint), jnp.array(old),
                                             jnp.asarray(w), jnp.array(w_old))
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(np.asarray(got_w).view(np.uint32), want_w)
            assert int(t2) == int(t) and int(flips) == int(np.sum(want != old)) > 0, (k, hint)


def test_native_kernel_runs_every_layer_of_a_step_in_one_call():
    # One call for all layers (a task each on the pool, the largest first): per layer the same
    # mask, threshold, flips and masked weights as alone, whatever the sizes (a short last block,
    # several chunks, one weight), k (0, all) and hints (none, near, far); in place with the
    # masked weights, the masks alone, and out of place.
    rng = np.random.default_rng(8)
    sizes, ks = [(70_001,), (3, 3, 16, 8), (1,), (1_100_000,), (64,)], [9_000, 0, 1, 550_000, 64]
    scores = [layer_scores(rng, shape, 'normal') for shape in sizes]
    olds = [rng.random(shape) < 0.3 for shape in sizes]
    weights = [rng.normal(size=shape).astype(np.float32) for shape in sizes]
    w_olds = [np.where(o, w, np.float32(0)) for o, w in zip(olds, weights)]
    wants = [reference.topk(s.reshape(-1), k).reshape(s.shape) for s, k in zip(scores, ks)]
    thresholds = [int(masks.topk_mask_with_threshold(jnp.asarray(s), k)[1])
                  for s, k in zip(scores, ks)]
    hints = [None, jnp.uint32(7), jnp.uint32(1), jnp.uint32(thresholds[3] - 5), None]
    in_place = jax.jit(masks.native_topk_masks, donate_argnums=(3, 5))
    masks_only = jax.jit(masks.native_topk_masks, donate_argnums=3)
    apart = jax.jit(masks.native_topk_masks)
    for step in (in_place, masks_only, apart):
        args = ([jnp.asarray(s) for s in scores], ks, hints, [jnp.array(o) for o in olds])
        if step is masks_only:
            got, t, flips = step(*args)
        else:
            got, t, flips, got_w = step(*args, [jnp.asarray(w) for w in weights],
                                        [jnp.array(w) for w in w_olds])
            for g, want, w in zip(got_w, wants, weights):
                np.testing.assert_array_equal(np.asarray(g).view(np.uint32),
                                              np.where(want, w, np.float32(0)).view(np.uint32))
        for g, want in zip(got, wants):
            np.testing.assert_array_equal(g, want)
        assert [int(v) for v in t] == thresholds
        assert [int(v) for v in flips] == [int(np.sum(w != o)) for w, o in zip(wants, olds)]
    # no layer at all: nothing to call, nothing flipped
    assert masks.topk_masks({}, {}, old={}, count_flips=True)[2] == 0


def test_native_kernel_updates_the_scores_as_optax_does_then_ranks_them():
    # With sgd= the call first moves the scores and momentum as optax's add_decayed_weights then
    # sgd with momentum do, on the straight-through gradient (the search's update), bit for bit
    # as XLA computes them, then ranks the new scores: the same masks, thresholds, flips and
    # masked weights as the kernel called on optax's scores. Sizes: several chunks and groups, a
    # short last block, one weight; k = 0 (its scores still move) and all; donated or copied.
    import optax

    assert masks.default_selection() == 'native'  # the kernels built, and registered with XLA
    rng = np.random.default_rng(9)
    sizes, ks = [(70_001,), (3, 3, 16, 8), (1,), (300_000,)], [9_000, 0, 1, 150_000]
    scores = [layer_scores(rng, shape, 'normal') for shape in sizes]
    grads = [rng.normal(size=shape).astype(np.float32) for shape in sizes]
    trace = [rng.normal(size=shape).astype(np.float32) for shape in sizes]
    weights = [rng.normal(size=shape).astype(np.float32) for shape in sizes]
    olds = [rng.random(shape) < 0.3 for shape in sizes]
    w_olds = [np.where(o, w, np.float32(0)) for o, w in zip(olds, weights)]
    lr = optax.cosine_decay_schedule(0.1, 20)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))
    state = optax.tree_utils.tree_set(tx.init(scores), trace=trace, count=jnp.int32(3))

    @jax.jit
    def reference(scores, state, grads, olds, weights, w_olds):
        updates, state = tx.update([g * w for g, w in zip(grads, weights)], state, scores)
        new = optax.apply_updates(scores, updates)
        return new, optax.tree_utils.tree_get(state, 'trace'), masks.native_topk_masks(
            new, ks, None, olds, weights, w_olds)

    def fused(scores, state, grads, olds, weights, w_olds):
        count = optax.tree_utils.tree_get(state, 'count')
        step = jnp.array(-1 * lr(count), jnp.float32)
        return masks.native_topk_masks(scores, ks, None, olds, weights, w_olds, sgd=(
            grads, optax.tree_utils.tree_get(state, 'trace'), (5e-4, 0.9, step)))

    def arrays():
        return ([jnp.array(s) for s in scores], jax.tree.map(jnp.array, state),
                [jnp.array(g) for g in grads], [jnp.array(o) for o in olds],
                [jnp.array(w) for w in weights], [jnp.array(w) for w in w_olds])

    def bits(a):
        return np.asarray(a).view(np.uint32 if np.asarray(a).dtype == np.float32 else np.uint8)

    new, momentum, want = reference(*arrays())
    assert any(not np.array_equal(bits(a), bits(b)) for a, b in zip(new, scores))
    for step in (jax.jit(fused), jax.jit(fused, donate_argnums=(0, 3, 5))):
        got = step(*arrays())
        for g, w in zip(jax.tree.leaves(got[:4]) + got[4] + got[5],
                        jax.tree.leaves(want) + new + momentum):
            np.testing.assert_array_equal(bits(g), bits(w))
    with pytest.raises(ValueError, match='needs the weights'):
        masks.native_topk_masks(scores, ks, sgd=(grads, trace, (0.0, 0.9, -0.1)))


@pytest.mark.parametrize('isa', ['avx2', 'scalar'])
def test_native_kernel_matches_the_reference_on_every_instruction_set(isa):
    # the test above runs the kernel's widest pass for this CPU (AVX-512 where it has it);
    # LJAX_TOPK_ISA makes a fresh process take a narrower one, which CPUs without it run
    done = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__, '-k',
         'native_kernel_matches_the_reference_across_chunks'],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent,
        env={**os.environ, 'LJAX_TOPK_ISA': isa},
    )
    assert done.returncode == 0 and '3 passed' in done.stdout, done.stdout[-3000:]


def test_the_search_steps_mask_update_is_the_native_kernel_on_cpu():
    scores = {'a': jnp.zeros((64, 64)), 'b': jnp.zeros((3, 3, 8, 8))}
    kept = {'a': 100, 'b': 50}
    hints = {n: jnp.uint32(1 << 31) for n in scores}
    old = {n: jnp.zeros(s.shape, bool) for n, s in scores.items()}
    text = masks.topk_masks.lower(scores, kept, hints, old=old).as_text()
    assert text.count('ljax_topk_masks') == 1  # one call for every layer, no XLA selection
    assert 'ljax_topk_mask' not in masks.topk_masks.lower(
        scores, kept, hints, old=old, selection='hinted').as_text()


@pytest.mark.parametrize('lines', [1, 64])
def test_segmented_ties_match_the_bisection_across_chunks(lines):
    """The segmented layout finds the last kept tie by running tie counts per chunk, with no loop;
    the same (threshold, last) as the row-by-row bisection, on tie-heavy rows whose ties at the
    threshold span many chunks (64 or 4,096 keys), with k cutting the ties anywhere."""
    rng = np.random.default_rng(0)
    rows, ks = [], []
    for size in (9000, 4096, 300, 5000, 64, 12288):
        values = rng.choice([-1.0, -0.0, 0.0, 0.5, 1.0], size).astype(np.float32)
        rows.append(masks.order_keys(jnp.asarray(values)))
        ks.append(jnp.int32(int(rng.integers(0, size + 1))))
    ks[0], ks[-1] = jnp.int32(1350), jnp.int32(2200)  # the cut deep among the top value's ties
    for k in (2, 3):  # the cut at the last key of a chunk, and at the first of the next
        edge = np.zeros(8192, np.float32)
        edge[[10, 4095, 4096, 8000]] = 1.0
        rows.append(masks.order_keys(jnp.asarray(edge)))
        ks.append(jnp.int32(k))
    want = selection.select(selection.Stacked(rows, stack=False), ks)
    got = jax.jit(lambda r, k: selection.select(selection.Segmented(r, lines=lines), k))(rows, ks)
    assert [int(t) for t in got[0]] == [int(t) for t in want[0]]
    assert [int(c) for c in got[1]] == [int(c) for c in want[1]]
    lasts = [int(c) for c in got[1]]
    assert any(0 <= c < selection.LAST and c >= 64 * lines for c in lasts), lasts  # a later chunk
    assert lasts[-2:] == [4095, 4096]


def test_the_segmented_update_loops_only_over_its_32_passes():
    """On a GPU a loop whose length is known only on the device waits on the host for every pass
    (docs/RESULTS.md, Speed): the segmented mask update has one loop, of 32 passes, known when it
    is compiled."""
    rng = np.random.default_rng(1)
    scores = {n: jnp.asarray(rng.choice([0.0, 1.0, 2.0], s).astype(np.float32))
              for n, s in (('a', (64, 80)), ('b', (3000,)))}
    kept = {'a': 2000, 'b': 1001}
    jaxpr = jax.make_jaxpr(
        lambda s: masks.topk_masks(s, kept, selection='segmented', old=None)
    )(scores).jaxpr
    loops = staging.staged(jaxpr, ('while',))
    assert len(loops) == 1, loops
    got = masks.topk_masks(scores, kept, selection='segmented')[0]
    for n, s in scores.items():
        np.testing.assert_array_equal(np.asarray(got[n]), reference.topk(np.asarray(s), kept[n]))
