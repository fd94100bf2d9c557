import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ljax import sparsity
from ljax.modelfn import ModelFn, model_fn


class LinenNet(nn.Module):
    bn_axis: str | None = None
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(6)(x.reshape(x.shape[0], 4))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8, axis_name=self.bn_axis)(x)
        x = nn.Dropout(self.rate, deterministic=not train)(nn.relu(x))
        return nn.Dense(3)(x)


class NnxNet(nnx.Module):
    """Written the NNX way: mode attributes set by .train()/.eval(), Rngs held by Dropout, and a
    list of layers (its State keys are the ints 0, 1)."""

    def __init__(self, rngs, bn_axis=None, rate=0.5):
        self.layers = nnx.List([nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 6, rngs=rngs)])
        self.bn = nnx.BatchNorm(6, momentum=0.8, axis_name=bn_axis, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = self.layers[1](nnx.relu(self.layers[0](x)))
        return self.head(self.drop(nnx.relu(self.bn(x))))


def x_of(n=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 4)), jnp.float32)


def linen_variables(model=LinenNet()):
    v = model.init(jax.random.key(0), x_of(1), train=False)
    v['batch_stats'] = jax.tree.map(lambda a: a + 0.3, v['batch_stats'])
    return v


def leaves(tree):
    """Host copies of every leaf; PRNG keys as their key data."""
    key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)  # noqa: E731
    return [np.asarray(jax.random.key_data(a) if key(a) else a) for a in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_linen_matches_model_apply_in_train_and_eval_mode():
    model, v, x = LinenNet(), linen_variables(), x_of()
    fn = model_fn(model, v, x[:1])
    assert fn.kind == 'linen' and set(fn.variables) == {'params', 'batch_stats'}
    key = jax.random.key(3)
    logits, stats = jax.jit(lambda v, x: fn.apply(v, x, train=True, rng=key))(fn.variables, x)
    want, updates = model.apply(
        v, x, train=True, mutable=['batch_stats'], rngs={'dropout': key}
    )
    # jitted against eager: XLA may order the float operations differently (on the CI machine of
    # 2026-11-27 one logit near 0.02 differed by 6e-8), so an absolute float32 slack as well
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # noqa: E731
    close(logits, want)
    jax.tree.map(close, stats, dict(updates['batch_stats']))
    assert not np.allclose(stats['BatchNorm_0']['mean'], v['batch_stats']['BatchNorm_0']['mean'])
    logits, stats = fn.apply(fn.variables, x, train=False, rng=None)
    close(logits, model.apply(v, x, train=False))
    assert stats is fn.variables['batch_stats']
    assert fn.rebuild(fn.variables) is fn.variables


def test_nnx_matches_the_module_in_train_and_eval_mode():
    m, x = NnxNet(nnx.Rngs(0), rate=0.0), x_of()
    m.bn.mean[...] = jnp.full((6,), 0.3)
    fn = model_fn(m)
    assert fn.kind == 'nnx'
    direct = nnx.clone(m)
    direct.eval()
    logits, stats = jax.jit(lambda v, x: fn.apply(v, x, train=False))(fn.variables, x)
    np.testing.assert_allclose(logits, direct(x), rtol=1e-6)
    assert_trees_equal(stats, fn.variables['batch_stats'])
    direct.train()
    logits, stats = jax.jit(lambda v, x: fn.apply(v, x, train=True, rng=jax.random.key(1)))(
        fn.variables, x
    )
    np.testing.assert_allclose(logits, direct(x), rtol=1e-6)  # batch statistics
    for name in ('mean', 'var'):  # running averages updated as the module updates its own
        np.testing.assert_allclose(stats['bn'][name], getattr(direct.bn, name)[...], rtol=1e-6)
    assert not np.allclose(stats['bn']['mean'], 0.3)


def test_nnx_names_are_the_param_state_paths():
    m = NnxNet(nnx.Rngs(0))
    fn = model_fn(m)
    state_paths = {
        '/'.join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))
    }
    assert set(sparsity.flatten(fn.variables['params'])) == state_paths
    assert 'layers/0/kernel' in state_paths
    assert set(sparsity.flatten(fn.variables['batch_stats'])) == {'bn/mean', 'bn/var'}


def test_the_input_module_is_never_modified():
    m, x = NnxNet(nnx.Rngs(0, dropout=5)), x_of()
    before = leaves(nnx.state(m))  # params, batch stats, RNG keys and counts
    fn = model_fn(m)
    step = jax.jit(lambda v, x, k: fn.apply(v, x, train=True, rng=k))
    for i in range(2):
        step(fn.variables, x, jax.random.key(i))
    fn.apply(fn.variables, x, train=True, rng=jax.random.key(0))  # not jitted either
    doubled = jax.tree.map(lambda a: 2 * a, fn.variables)
    rebuilt = fn.rebuild(doubled)
    rebuilt.train()
    rebuilt(x)  # the new module updates its own statistics and RNG counts, not m's
    after = leaves(nnx.state(m))
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert m.drop.deterministic is False and m.bn.use_running_average is False


def test_rebuild_gives_a_module_with_these_values():
    m, x = NnxNet(nnx.Rngs(0)), x_of()
    fn = model_fn(m)
    new = {
        'params': jax.tree.map(lambda a: 1.5 * a, fn.variables['params']),
        'batch_stats': jax.tree.map(lambda a: a + 0.7, fn.variables['batch_stats']),
    }
    rebuilt = fn.rebuild(new)
    assert isinstance(rebuilt, NnxNet) and rebuilt is not m
    np.testing.assert_array_equal(
        rebuilt.layers[0].kernel[...], new['params']['layers']['0']['kernel']
    )
    rebuilt.eval()
    np.testing.assert_allclose(
        rebuilt(x), fn.apply(new, x, train=False)[0], rtol=1e-6
    )
    assert not np.allclose(rebuilt(x), fn.apply(fn.variables, x, train=False)[0])


class CallFlags(nnx.Module):
    """An NNX module that takes `train` in its call (flags there override mode attributes), and
    one with no BatchNorm at all."""

    def __init__(self, rngs, bn=True):
        self.dense = nnx.Linear(4, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs) if bn else None

    def __call__(self, x, train=False):
        x = self.dense(x)
        return self.bn(x, use_running_average=not train) if self.bn is not None else x


def test_nnx_call_with_a_train_argument_and_without_batch_norm():
    x = x_of()
    fn = model_fn(CallFlags(nnx.Rngs(0)))
    logits, stats = fn.apply(fn.variables, x, train=True, rng=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(logits).mean(0), 0.0, atol=1e-5)  # batch statistics
    assert not np.allclose(stats['bn']['mean'], 0.0)
    direct = CallFlags(nnx.Rngs(0))
    np.testing.assert_allclose(fn.apply(fn.variables, x, train=False)[0], direct(x), rtol=1e-6)

    fn = model_fn(CallFlags(nnx.Rngs(0), bn=False))
    assert fn.variables['batch_stats'] == {}
    logits, stats = jax.jit(lambda v: fn.apply(v, x, train=True, rng=jax.random.key(0)))(
        fn.variables
    )
    assert stats == {}
    np.testing.assert_allclose(logits, CallFlags(nnx.Rngs(0), bn=False)(x), rtol=1e-6)
    assert isinstance(fn.rebuild(fn.variables), CallFlags)


class NoFlag(nn.Module):
    """linen as users often write it: no `train` argument; BatchNorm and Dropout fixed at
    construction."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=False)(x)
        x = nn.Dropout(0.5, deterministic=True)(x)
        return nn.Dense(3)(x)


def test_linen_without_a_train_argument_is_called_without_one():
    x = x_of()
    model = NoFlag()
    v = model.init(jax.random.key(0), x)
    fn = model_fn(model, v, x[:1])
    want, updates = model.apply(v, x, mutable=['batch_stats'])
    logits, stats = fn.apply(fn.variables, x, train=True, rng=jax.random.key(1))
    np.testing.assert_allclose(logits, want, rtol=1e-6)
    jax.tree.map(np.testing.assert_allclose, stats, updates['batch_stats'])
    np.testing.assert_allclose(fn.apply(fn.variables, x, train=False)[0], want, rtol=1e-6)


class Bridged(nnx.Module):
    """Wrapped by nnx.bridge.to_linen: its Dropout is built (and needs a 'dropout' stream) on
    every linen call, eval included."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x, train=False):
        return self.head(self.drop(self.dense(x), deterministic=not train))


@pytest.mark.parametrize('kind', ['linen', 'nnx', 'bridge'])
def test_dropout_draws_from_the_rng_argument(kind):
    x = x_of(16)
    if kind == 'linen':
        fn = model_fn(LinenNet(), linen_variables(), x[:1])
    elif kind == 'nnx':
        fn = model_fn(NnxNet(nnx.Rngs(0)))
    else:
        model = nnx.bridge.to_linen(Bridged)
        v = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x[:1])
        fn = model_fn(model, v, x[:1])
        direct = model.apply(v, x, rngs={'dropout': jax.random.key(7)})  # eval by default
        np.testing.assert_allclose(fn.apply(fn.variables, x, train=False)[0], direct, rtol=1e-6)
    step = jax.jit(lambda v, x, k: fn.apply(v, x, train=True, rng=k)[0])
    a, b, c = (step(fn.variables, x, jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)  # same key, same masks: pure
    assert not np.allclose(a, c)
    raw = step(fn.variables, x, jax.random.key_data(jax.random.key(1)))  # raw key data works too
    np.testing.assert_array_equal(a, raw)
    e1, _ = fn.apply(fn.variables, x, train=False)
    e2, _ = fn.apply(fn.variables, x, train=False, rng=jax.random.key(9))
    np.testing.assert_array_equal(e1, e2)  # eval: no dropout


@pytest.mark.parametrize('kind', ['linen', 'nnx'])
def test_synchronised_batch_norm_and_gradients_under_pmap(kind):
    """As the search uses it: pmapped over axis 'batch', gradients w.r.t. the params pmean'd."""
    n = jax.local_device_count()
    assert n == 4  # tests/conftest.py
    x = x_of(16)
    y = jnp.arange(16) % 3
    if kind == 'linen':
        plain = model_fn(LinenNet(rate=0.0), linen_variables(), x[:1])
        synced = model_fn(LinenNet(bn_axis='batch', rate=0.0), linen_variables(), x[:1])
    else:
        plain = model_fn(NnxNet(nnx.Rngs(0), rate=0.0))
        synced = model_fn(NnxNet(nnx.Rngs(0), bn_axis='batch', rate=0.0))

    def loss_grads(fn, v, x, y):
        def loss(params):
            logits, stats = fn.apply(
                {'params': params, 'batch_stats': v['batch_stats']}, x, train=True,
                rng=jax.random.key(0),
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, stats)

        return jax.grad(loss, has_aux=True)(v['params'])

    want_grads, (want, want_stats) = loss_grads(plain, plain.variables, x, y)
    def shard_step(v, x, y):
        grads, aux = loss_grads(synced, v, x, y)
        return jax.lax.pmean(grads, 'batch'), aux  # statistics are not averaged: BN syncs them

    step = jax.pmap(
        shard_step,
        axis_name='batch',
        in_axes=(None, 0, 0),
    )
    grads, (logits, stats) = step(synced.variables, x.reshape(n, -1, 4), y.reshape(n, -1))
    np.testing.assert_allclose(np.asarray(logits).reshape(16, 3), want, rtol=1e-5, atol=1e-6)
    for tree, ref in ((stats, want_stats), (grads, want_grads)):
        got, ref = sparsity.flatten(tree), sparsity.flatten(ref)
        assert set(got) == set(ref) and got
        for name in ref:
            for replica in np.asarray(got[name]):  # every replica: the global-batch value
                np.testing.assert_allclose(replica, ref[name], rtol=1e-4, atol=1e-6)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r'^model: expected a flax.linen or flax.nnx Module, got'):
        model_fn(lambda x: x)
    with pytest.raises(ValueError, match=r'^variables: an nnx.Module holds its own weights'):
        model_fn(NnxNet(nnx.Rngs(0)), {'params': {}})
    model, v, x = LinenNet(), linen_variables(), x_of(1)
    with pytest.raises(ValueError, match=r'^variables: expected the pre-trained variables'):
        model_fn(model, None, x)
    bad = {'params': dict(v['params'], Dense_1={'kernel': jnp.zeros((5, 3)), 'bias': jnp.zeros(3)})}
    bad['batch_stats'] = v['batch_stats']
    fit = r'^variables: params do not fit .*Dense_1/kernel: expected \(6, 3\), found \(5, 3\)'
    with pytest.raises(ValueError, match=fit):
        model_fn(model, bad, x)
    with pytest.raises(ValueError, match=r'^variables: the model has BatchNorm but .*no batch_st'):
        model_fn(model, {'params': v['params']}, x)
    with pytest.raises(ValueError, match=r'^batches: the model does not accept x of shape \(1, 2'):
        model_fn(model, v, jnp.zeros((1, 2, 3)))  # 6 values do not reshape to (1, 4)
    assert isinstance(model_fn(model, v, x), ModelFn)
