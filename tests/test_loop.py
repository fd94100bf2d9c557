"""The one loop (`ljax.loop`) and the search step's guards: no host reads between log points,
non-finite steps skipped and counted, bfloat16, bad batches named."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array as jax_array

from ljax import loop, search_jackpot
from ljax.loop import NonFiniteError, keep_if_not_finite
from ljax.parallel import Parallel
from ljax.pretrain import DenseTraining
from ljax.search import Search, SearchOptions
from tests import staging
from tests.test_search import Net, assert_carried_weights, data, pretrained


def test_no_device_to_host_read_between_log_points(monkeypatch):
    """Every read of a device value (`ArrayImpl._value`: np.asarray, float(), device_get) is
    recorded with the number of steps dispatched so far: reads happen only at log points.

    (`jax.transfer_guard_device_to_host`, which the loop also sets around each step, cannot see
    such reads on CPU, where device buffers are host memory.)"""
    events, steps = [], [0]
    train = Parallel.train

    def counted_train(self, *args):
        steps[0] += 1
        return train(self, *args)

    value = jax_array.ArrayImpl._value

    def recorded(self):
        events.append(steps[0])
        return value.fget(self)

    monkeypatch.setattr(Parallel, 'train', counted_train)
    monkeypatch.setattr(jax_array.ArrayImpl, '_value', property(recorded))
    search_jackpot(Net(), pretrained(), data(12), sparsity=0.8, epochs=2, log_every=4, progress=False)
    during = sorted({s for s in events if 0 < s < 24})
    assert steps[0] == 24 and during, events  # metrics were read, at some points
    assert set(during) <= {4, 8, 12, 16, 20}, during


def _search(total_steps=4, sparsity=0.7, **options):
    model, v = Net(), pretrained()
    search = Search.create(
        model, v, data(1)[0][0][:1], sparsity=sparsity, total_steps=total_steps,
        options=SearchOptions(**options),
    )
    return search, Parallel(search)


@pytest.fixture(params=loop.GUARDS)
def guard(request, monkeypatch):
    """Each guard of the steps ('cond' is CPU's default, 'select' GPU's and TPU's)."""
    monkeypatch.setattr(loop, 'default_guard', lambda: request.param)
    return request.param


def test_a_non_finite_step_leaves_the_state_unchanged_and_is_counted(guard):
    search, par = _search()
    (x0, y0), (x1, y1) = data(2)
    x1 = x1.copy()
    x1[3, 5] = np.nan  # one pixel
    state, m0 = par.train(par.replicate(search.init_state()), x0, y0)
    before = par.unreplicate(state)
    state, m1 = par.train(state, x1, y1)
    after = par.unreplicate(state)
    assert int(m0['finite'][0]) == 1 and int(m1['finite'][0]) == 0 and int(m1['flips'][0]) == 0
    assert int(after.step) == int(before.step) + 1  # the schedules and the data move on
    for field in ('scores', 'mask', 'thresholds', 'opt_state', 'batch_stats'):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, field), getattr(before, field))


def test_non_finite_steps_are_counted_in_history_and_a_hopeless_epoch_stops():
    batches = data(4)
    x = batches[1][0].copy()
    x[0, 7] = np.inf
    batches[1] = (x, batches[1][1])
    jp = search_jackpot(Net(), pretrained(), batches, sparsity=0.7, epochs=2, progress=False)
    assert [row['nonfinite_steps'] for row in jp.history] == [1, 1]
    assert all(np.isfinite(s).all() for s in jp.scores.values())
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(jp.variables['batch_stats']))
    poisoned = [(np.full_like(x, np.nan), y) for x, y in data(2)]
    with pytest.raises(NonFiniteError, match='every step of epoch 1 had a non-finite loss'):
        search_jackpot(Net(), pretrained(), poisoned, sparsity=0.7, epochs=1, progress=False)


def test_an_update_that_overflows_is_skipped_too():
    """An exploding learning rate leaves loss and gradients finite (the weights are frozen) but
    overflows the scores: such a step is skipped as well."""
    grads = {'a': jnp.ones(3)}
    new, old = {'a': jnp.full(3, 2.0)}, {'a': jnp.zeros(3)}
    kept, finite = keep_if_not_finite(jnp.float32(1), grads, new, old, updated={'a': jnp.full(3, jnp.inf)})
    assert int(finite) == 0 and np.all(np.asarray(kept['a']) == 0)
    kept, finite = keep_if_not_finite(jnp.float32(1), grads, new, old, updated=new)
    assert int(finite) == 1 and np.all(np.asarray(kept['a']) == 2)
    with pytest.raises(ValueError, match='lr: expected a finite number > 0'):
        search_jackpot(Net(), pretrained(), data(1), sparsity=0.5, epochs=1, lr=-1.0)


def test_an_overflowing_search_stops_at_the_end_of_the_epoch():
    """The steps decide on loss and gradients before the update (`update_if_finite`); an update
    that overflows anyway (finite gradients, an absurd learning rate) leaves NaN/inf in the
    state, which the loop finds at the end of the epoch."""
    with pytest.raises(NonFiniteError, match='an update overflowed'):
        search_jackpot(Net(), pretrained(), data(4), sparsity=0.5, epochs=1, lr=1e30, progress=False)


@pytest.mark.parametrize('how', loop.GUARDS)
def test_update_if_finite_runs_the_update_or_keeps(how):
    from ljax.loop import update_if_finite

    old = {'a': jnp.zeros(3)}
    update, keep = lambda: {'a': old['a'] + 1}, lambda: old
    for grads, want in (({'a': jnp.ones(3)}, (1.0, 1)), ({'a': jnp.array([1.0, jnp.nan, 1.0])}, (0.0, 0))):
        new, finite = jax.jit(lambda g: update_if_finite(jnp.float32(1), g, update, keep, how))(grads)
        assert float(new['a'][0]) == want[0] and int(finite) == want[1]
    new, finite = update_if_finite(jnp.float32(jnp.inf), {'a': jnp.ones(3)}, update, keep, how)
    assert int(finite) == 0 and float(new['a'][0]) == 0.0
    with pytest.raises(ValueError, match="guard: expected one of \\('cond', 'select'\\), got 'where'"):
        update_if_finite(jnp.float32(1), (), update, keep, 'where')


def test_the_guard_is_a_conditional_on_cpu_and_a_select_elsewhere(monkeypatch):
    """'cond' stages a conditional, which on a GPU waits for its predicate on the host; 'select'
    stages none."""
    def lowered(how):
        f = lambda g: loop.update_if_finite(jnp.float32(1), g, lambda: g + 1, lambda: g, how)
        return jax.jit(f).lower(jnp.ones(3)).as_text()

    assert 'case' in lowered('cond') and 'case' not in lowered('select')
    assert loop.default_guard() == 'cond'  # these tests run on CPU
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    assert loop.default_guard() == 'select'


@pytest.mark.parametrize('how', loop.GUARDS)
def test_update_if_finite_without_gradients_decides_on_the_loss_before_the_backward(how):
    """Dense training's guard: the update is applied only for a finite loss; a NaN batch
    changes nothing (flag 0). Decided on the loss, so gradients are not looked at."""
    from ljax.loop import update_if_finite

    old = {'w': jnp.ones(3)}

    def step(x):
        loss, backward = jax.vjp(lambda w: jnp.sum(w * x), old['w'])
        return update_if_finite(
            loss, (), lambda: {'w': old['w'] - backward(jnp.ones_like(loss))[0]}, lambda: old, how
        )

    new, finite = jax.jit(step)(jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(new['w'], [0.0, -1.0, -2.0])
    assert int(finite) == 1
    new, finite = jax.jit(step)(jnp.array([1.0, jnp.nan, 3.0]))
    np.testing.assert_array_equal(new['w'], old['w'])
    assert int(finite) == 0


def test_dense_training_skips_a_non_finite_batch(guard):
    model, v = Net(), pretrained()
    task = DenseTraining(model, lr=0.1, weight_decay=5e-4, total_steps=4)
    par = Parallel(task, jax.devices()[:1])
    (x, y), = data(1)
    bad = x.copy()
    bad[0, 2] = np.nan
    state = par.replicate(task.init_state(v))
    before = jax.device_get(state)
    new, m = par.train(state, bad, y)
    after = jax.device_get(new)
    assert int(m['finite'][0]) == 0 and int(after['step'][0]) == int(before['step'][0]) + 1
    for field in ('params', 'batch_stats', 'opt_state'):
        jax.tree.map(np.testing.assert_array_equal, after[field], before[field])
    new, m = par.train(new, x, y)
    assert int(m['finite'][0]) == 1
    assert not np.array_equal(jax.tree.leaves(jax.device_get(new)['params'])[0],
                              jax.tree.leaves(before['params'])[0])


@pytest.mark.parametrize('options', [
    {}, {'sparsity': None, 'nm': (2, 4), 'restriction': 'cosine'},
])
def test_the_gpu_choices_search_as_the_cpu_ones(monkeypatch, request, options):
    """GPU's guard and selection ('select', 'segmented') give the state of CPU's ('cond', the
    default selection), bit for bit, a skipped step included: top-k, and N:M under the short
    restriction."""
    from ljax import masks

    batches = data(4)
    x = batches[2][0].copy()
    x[1, 3] = np.nan
    batches[2] = (x, batches[2][1])
    finals = {}
    request.addfinalizer(jax.clear_caches)
    for how in loop.GUARDS:
        jax.clear_caches()  # the default selection is resolved when traced
        monkeypatch.setattr(loop, 'default_guard', lambda: how)
        if how == 'select':
            monkeypatch.setattr(masks, 'default_selection', lambda: 'segmented')
        search, par = _search(**{'sparsity': 0.7, **options})
        state, flags = par.replicate(search.init_state()), []
        for x, y in batches:
            state, m = par.train(state, x, y)
            flags.append(int(m['finite'][0]))
        assert flags == [1, 1, 0, 1]
        finals[how] = jax.device_get(par.unreplicate(state))
    jax.tree.map(np.testing.assert_array_equal, finals['cond'], finals['select'])


@pytest.mark.parametrize('checked', [True, False])
def test_dense_training_donates_its_state_where_it_checks_the_gradients(checked, monkeypatch):
    """On a CPU with ljax's kernels the dense step checks its gradients before the update and
    donates its state (`DenseTraining.checks_gradients`, `donate`); without them it decides on
    the loss with the backward inside the update and keeps the state passed in, unchanged."""
    model, v = Net(), pretrained()
    task = DenseTraining(model, lr=0.1, weight_decay=5e-4, total_steps=4)
    cpu = jax.default_backend() == 'cpu'
    assert task.checks_gradients is cpu
    assert task.donate
    if not checked:
        monkeypatch.setattr(DenseTraining, 'checks_gradients', False)
        assert task.donate is (not cpu)
    par = Parallel(task, jax.devices()[:1])
    state = par.replicate(task.init_state(v))
    # a copy on the device: a host view of a CPU buffer would keep it from being donated
    before = jax.device_get(jax.tree.map(jnp.copy, state))
    (x, y), = data(1)
    new, m = par.train(state, x, y)
    after = jax.device_get(new)
    if task.donate:  # the input's buffers were given to the step
        assert all(a.is_deleted() for a in jax.tree.leaves(state['params']))
    else:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), before)
    assert int(m['finite'][0]) == 1 and int(after['step'][0]) == int(before['step'][0]) + 1
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(after['params']), jax.tree.leaves(before['params'])))


class _Sqrt(nn.Module):
    """A finite loss whose gradient is not: d sqrt(w)/dw at w = 0 is inf."""

    @nn.compact
    def __call__(self, x, train):
        w = self.param('w', nn.initializers.zeros, (x.shape[-1], 5))
        return x @ jnp.sqrt(w) + nn.Dense(5)(x)


@pytest.mark.parametrize('checked', [True, False])
def test_dense_training_skips_non_finite_gradients_where_it_checks_them(checked, monkeypatch):
    if not checked:
        monkeypatch.setattr(DenseTraining, 'checks_gradients', False)
    model = _Sqrt()
    (x, y), = data(1)
    v = jax.tree.map(np.asarray, model.init(jax.random.key(0), x[:1], train=False))
    task = DenseTraining(model, lr=0.1, weight_decay=0.0, total_steps=4)
    par = Parallel(task, jax.devices()[:1])
    new, m = par.train(par.replicate(task.init_state(v)), x, y)
    assert np.isfinite(float(m['loss'][0]))
    w = np.asarray(new['params']['w'][0])
    if task.checks_gradients:  # skipped: nothing written
        assert int(m['finite'][0]) == 0 and np.all(w == 0)
    else:  # decided on the finite loss: applied, and the loop's end-of-epoch check stops it
        assert int(m['finite'][0]) == 1 and not np.all(np.isfinite(w))


def test_bfloat16_search_keeps_float32_state_and_exact_counts():
    runs = {}
    for dtype in ('float32', 'bfloat16'):
        search, par = _search(dtype=dtype)
        state = par.replicate(search.init_state())
        losses = []
        for x, y in data(4):
            state, m = par.train(state, x, y)
            losses.append(float(m['loss'][0]))
        final = par.unreplicate(state)
        for n, k in search.kept.items():
            assert int(final.mask[n].sum()) == k
        assert all(a.dtype == np.float32 for a in jax.tree.leaves(final.scores))
        assert all(a.dtype == np.float32 for a in jax.tree.leaves(final.batch_stats))
        # the masked weights the step reads are in the search's dtype, and follow its mask
        assert all(a.dtype == np.dtype(dtype) for a in jax.tree.leaves(final.weights))
        assert_carried_weights(search, final)
        runs[dtype] = losses
    # Same first step up to bfloat16 rounding; then the masks drift apart a little.
    np.testing.assert_allclose(runs['bfloat16'][0], runs['float32'][0], rtol=0.01)
    np.testing.assert_allclose(runs['bfloat16'], runs['float32'], rtol=0.15)
    with pytest.raises(ValueError, match='dtype'):
        _search(dtype='float16')


@pytest.mark.parametrize(
    'damage, message',
    [
        (lambda x, y: (x, y + 5), r'batches: batch 2: label \d+ outside \[0, 5\)'),
        (lambda x, y: (x, y[:-1]), r'batches: batch 2: 16 inputs but labels of shape \(15,\)'),
        (lambda x, y: (x[:, :6], y), r'batches: batch 2: x of shape \(16, 6\)'),
        (lambda x, y: (x, y.astype(np.float32)), 'batches: batch 2: labels of dtype float32'),
    ],
)
def test_bad_batches_are_named(damage, message):
    batches = data(3)
    batches[2] = damage(*batches[2])
    with pytest.raises(ValueError, match=message):
        search_jackpot(Net(), pretrained(), batches, sparsity=0.5, epochs=1, progress=False)


def test_dict_batches_as_tfds_yields_them():
    batches = [{'image': x, 'label': y} for x, y in data(2)]
    jp = search_jackpot(Net(), pretrained(), batches, sparsity=0.5, epochs=1, progress=False)
    assert len(jp.history) == 1


def test_nnx_search_result():
    """search_jackpot(module, batches): a new module whose pruned kernels are 0.0, the input
    module untouched, BN running statistics as searched."""
    from flax import nnx

    class NNXNet(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(12, 32, rngs=rngs)
            self.bn = nnx.BatchNorm(32, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.head = nnx.Linear(32, 5, rngs=rngs)

        def __call__(self, x):
            return self.head(self.drop(nnx.relu(self.bn(self.l1(x)))))

    module = NNXNet(nnx.Rngs(0))
    weights = lambda m: nnx.state(m, nnx.Param, nnx.BatchStat)
    before = jax.tree.map(np.array, weights(module))
    jp = search_jackpot(module, data(3), sparsity=0.75, epochs=2, progress=False)
    jax.tree.map(np.testing.assert_array_equal, weights(module), before)  # input untouched
    assert jp.kept_per_layer == {'l1/kernel': 96}  # the head is the classifier: left dense
    mask = np.asarray(jp.mask['l1']['kernel'])
    kernel = np.asarray(jp.model.l1.kernel[...])
    np.testing.assert_array_equal(kernel[mask], np.asarray(module.l1.kernel[...])[mask])
    assert np.all(kernel[~mask] == 0.0)
    np.testing.assert_array_equal(jp.model.head.kernel[...], module.head.kernel[...])
    assert not np.allclose(jp.model.bn.mean[...], module.bn.mean[...])  # searched statistics
    assert len(jp.history) == 2


def test_nm_erk_and_wanda_searches():
    """2:4 keeps exactly 2 of every 4 inputs at every step; ERK and Wanda init keep exact counts
    and start from their one-shot masks."""
    search, par = _search(sparsity=None, nm=(2, 4), restriction='cosine')
    state = par.replicate(search.init_state())
    for x, y in data(3):
        state, _ = par.train(state, x, y)
        for n in search.names:
            m = np.asarray(state.mask[n][0])
            groups = m.reshape(m.shape[0] // 4, 4, m.shape[1]).sum(1)
            assert np.all(groups == 2), n
    assert set(search.kept.values()) == {12 * 32 // 2, 32 * 32 // 2}
    with pytest.raises(ValueError, match='sparsity: nm=2:4 keeps 2 of every 4'):
        search_jackpot(Net(), pretrained(), data(1), sparsity=0.9, epochs=1, nm=(2, 4))
    jp = search_jackpot(
        Net(), pretrained(), data(2), epochs=1, nm=(2, 4), progress=False, score_init='wanda'
    )
    assert jp.sparsity == 0.5
    for allocation in ('erk', 'global_magnitude'):
        batches = data(2)
        model, v = Net(), pretrained()
        search = Search.create(
            model, v, batches[0][0][:1], sparsity=0.75, total_steps=2,
            options=SearchOptions(allocation=allocation, score_init='wanda'), calibration=batches,
        )
        assert sum(search.kept.values()) == round(0.25 * (12 * 32 + 32 * 32))
        state = search.init_state()
        for n in search.names:
            np.testing.assert_array_equal(state.mask[n], search.wanda[n])


def test_periodic_actions_on_log_steps_and_between_them():
    """A checkpoint-like action due on a log step (metrics already read) and between log steps
    sees the epoch sums of every step so far."""
    from ljax.loop import EpochSums, Loop, Periodic

    search, par = _search(total_steps=12)
    seen = []
    loop = Loop(
        par, 1, 12, 16, log_every=4, progress=False,
        periodic=[Periodic(4, lambda step, state: seen.append((step, loop.sums.steps))),
                  Periodic(None, lambda step, state: seen.append((step, loop.sums.steps)), frozenset({6}))],
    )
    _, rows = loop.run(par.replicate(search.init_state()), lambda e, s: iter(data(12)))
    assert seen == [(4, 4), (6, 6), (8, 8)]
    assert rows[0]['nonfinite_steps'] == 0 and isinstance(loop.sums, EpochSums)


def test_loss_option_is_the_loss_the_search_minimises():
    """A loss that is 0 for every example gives zero score gradients (only weight decay moves
    the scores); label smoothing gives a loss different from plain cross-entropy."""
    import optax

    zero = lambda logits, labels: jnp.zeros(labels.shape[0]) * logits.sum()
    search, par = _search(loss=zero, weight_decay=0.0, momentum=0.0)
    state = par.replicate(search.init_state())
    before = par.unreplicate(state).scores
    state, m = par.train(state, *data(1)[0])
    assert float(m['loss'][0]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, par.unreplicate(state).scores, before)

    def smoothed(logits, labels):
        target = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), 0.1)
        return optax.softmax_cross_entropy(logits, target)

    losses = {}
    for name, fn in (('plain', None), ('smoothed', smoothed)):
        search, par = _search(loss=fn)
        _, m = par.train(par.replicate(search.init_state()), *data(1)[0])
        losses[name] = float(m['loss'][0])
    assert losses['smoothed'] != pytest.approx(losses['plain'], rel=1e-4)


@pytest.mark.parametrize('nm, restriction, loops', [
    (None, 'none', 1), ((2, 4), 'none', 0), (None, 'cosine', 2), ((2, 4), 'cosine', 2),
])
def test_the_gpu_step_stages_no_conditional_and_no_device_sized_loop(
    monkeypatch, request, nm, restriction, loops
):
    """A conditional, or a loop whose length is known only on the device, makes a GPU wait on the
    host every step (docs/RESULTS.md, Speed). With GPU's guard ('select') and selection
    ('segmented') a search step stages neither: its loops are 32-pass selections (the top-k's;
    with the short restriction also the revive/prune one, or per N:M layer the arrivals'). A
    rate-1 N:M step is `nm.nm_restrict_all` at rate 1."""
    from ljax import masks, nm as nm_lib

    monkeypatch.setattr(loop, 'default_guard', lambda: 'select')
    monkeypatch.setattr(masks, 'default_selection', lambda: 'segmented')
    # `topk_masks` resolves its default selection when traced: not from a cache, nor into one
    jax.clear_caches()
    request.addfinalizer(jax.clear_caches)
    search, par = _search(sparsity=None if nm else 0.7, nm=nm, restriction=restriction)
    state = par.replicate(search.init_state())
    (x, y), = data(1)
    xs, ys = par.shard(x, y)
    jaxpr = jax.make_jaxpr(par.step)(state, par.frozen, xs, ys).jaxpr
    staged = staging.staged(jaxpr, ('cond', 'while'))
    assert staged == ['while'] * loops, staged
    if nm and restriction == 'none':
        before = par.unreplicate(state)
        after = par.unreplicate(par.train(state, x, y)[0])
        want = nm_lib.nm_restrict_all(before.mask, after.scores, *nm, 1.0, search.input_axes)
        jax.tree.map(np.testing.assert_array_equal, after.mask, want)
