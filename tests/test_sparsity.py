import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ljax import masks, sparsity
from tests import reference


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


def test_classifier_is_the_last_layer_called_not_the_last_in_tree_order():
    model = TwelveDense()
    v = model.init(jax.random.key(0), jnp.ones((1, 4)))
    last_path = jax.tree_util.tree_flatten_with_path(v['params'])[0][-1][0]
    assert jax.tree_util.keystr(last_path) == "['Dense_9']['kernel']"  # jax sorts dict keys
    names = sparsity.prunable_names(
        v['params'], sparsity.default_prunable(model, v, jnp.ones((1, 4)))
    )
    assert 'Dense_11/kernel' not in names and len(names) == 11
    assert all(n.endswith('kernel') for n in names)

    model = HeadFirst()
    v = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    names = sparsity.prunable_names(
        v['params'], sparsity.default_prunable(model, v, jnp.ones((1, 8, 8, 3)))
    )
    assert names == ['conv_init/kernel']


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
