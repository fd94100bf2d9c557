import glob

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ljax import masks, search_jackpot
from ljax.search import AXIS_NAME, Parallel, Search, SearchOptions


class Net(nn.Module):
    """BN-MLP; the first 4 input features are always 0 in `data`, so their weights get no gradient."""

    hidden: int = 32
    bn_axis: str | None = None

    @nn.compact
    def __call__(self, x, train):
        x = x.reshape(x.shape[0], -1)
        for _ in range(2):
            x = nn.Dense(self.hidden)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, axis_name=self.bn_axis)(x))
        return nn.Dense(5)(x)


def data(n_batches=4, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        x = rng.normal(size=(batch, 12)).astype(np.float32)
        x[:, :4] = 0.0
        out.append((x, (x[:, 4:9].argmax(1)).astype(np.int32)))
    return out


def pretrained(model=Net(), seed=0):
    v = model.init(jax.random.key(seed), np.zeros((1, 12), np.float32), train=False)
    # make BN statistics non-trivial, so "updated by the search" is visible
    v['batch_stats'] = jax.tree.map(lambda a: a + 0.5, v['batch_stats'])
    return jax.tree.map(np.asarray, v)


def test_result_contract():
    model, v = Net(), pretrained()
    before = jax.tree.map(np.copy, v)
    jp = search_jackpot(model, v, data(), sparsity=0.8, epochs=2)
    # the caller's variables are bit-identical
    jax.tree.map(np.testing.assert_array_equal, v, before)
    params, mask = jp.variables['params'], jp.mask
    assert mask['Dense_2']['kernel'] is None and mask['Dense_0']['bias'] is None  # classifier, bias
    assert mask['Dense_0']['kernel'].dtype == bool
    for layer in ('Dense_0', 'Dense_1'):
        w, m, got = (
            before['params'][layer]['kernel'],
            mask[layer]['kernel'],
            np.asarray(params[layer]['kernel']),
        )
        np.testing.assert_array_equal(got[m], w[m])  # kept: the pre-trained value, bit for bit
        assert np.all(got[~m] == 0.0) and not np.signbit(got[~m]).any()  # pruned: exactly +0.0
    for path in (
        ('Dense_2', 'kernel'),
        ('Dense_2', 'bias'),
        ('Dense_0', 'bias'),
        ('BatchNorm_0', 'scale'),
        ('BatchNorm_1', 'bias'),
    ):
        np.testing.assert_array_equal(params[path[0]][path[1]], before['params'][path[0]][path[1]])
    n = 12 * 32 + 32 * 32
    assert sum(jp.kept_per_layer.values()) == round(0.2 * n)
    assert jp.sparsity == pytest.approx(1 - round(0.2 * n) / n)
    # BatchNorm ran in training mode: running statistics moved
    assert not np.allclose(
        jp.variables['batch_stats']['BatchNorm_0']['mean'],
        before['batch_stats']['BatchNorm_0']['mean'],
    )
    assert len(jp.history) == 2 and {'loss', 'accuracy', 'flips'} <= set(jp.history[0])


def test_jax_array_inputs_are_not_donated():
    model = Net()
    v = jax.tree.map(jnp.asarray, pretrained())
    search_jackpot(model, v, data(2), sparsity=0.5, epochs=1)
    jax.tree.map(lambda a: a.block_until_ready(), v)  # raises if a buffer had been donated


@pytest.mark.parametrize('score_init', ['magnitude', 'random'])
@pytest.mark.parametrize('allocation', ['global_magnitude', 'uniform'])
def test_every_step_keeps_exactly_k_per_layer(score_init, allocation):
    model, v = Net(), pretrained()
    batches = data(3)
    search = Search.create(
        model,
        v,
        batches[0][0][:1],
        sparsity=0.7,
        total_steps=6,
        options=SearchOptions(score_init=score_init, allocation=allocation, restriction='cosine'),
    )
    par = Parallel(search)
    state = par.replicate(search.init_state())
    assert sum(search.kept.values()) == round(0.3 * (12 * 32 + 32 * 32))
    for step in range(6):
        x, y = batches[step % 3]
        state, _ = par.train(state, x, y)
        for n, k in search.kept.items():
            counts = np.asarray(state.mask[n]).reshape(4, -1).sum(1)
            assert np.all(counts == k), (step, n, counts, k)  # on each of the 4 devices
            np.testing.assert_array_equal(state.mask[n][0], state.mask[n][3])


def force_selection(monkeypatch, selection):
    """The step's mask update on a CPU: 'native' where ljax's kernels are built (the default);
    without them, 'segmented' for this small Net (`Search.selection`), and 'hinted' with
    SMALL_SEARCH = -1, as for larger models."""
    from ljax import search as search_lib

    if selection != 'native':
        monkeypatch.setattr(masks, '_native_available', lambda: False)
    if selection == 'hinted':
        monkeypatch.setattr(search_lib, 'SMALL_SEARCH', -1)


@pytest.fixture(params=['native', 'hinted', 'segmented'])
def selection(request, monkeypatch):
    force_selection(monkeypatch, request.param)
    return request.param


def test_every_selection_of_the_step_gives_the_same_masks(monkeypatch):
    model, v = Net(), pretrained()
    batches = data(3)
    final = {}
    cpu = jax.default_backend() == 'cpu'
    for selection in ('native', 'hinted', 'segmented'):
        with monkeypatch.context() as m:
            force_selection(m, selection)
            search = Search.create(model, v, batches[0][0][:1], sparsity=0.7, total_steps=6,
                                   options=SearchOptions(lr=1.0))
            assert search.selection == ('segmented' if selection == 'segmented' and cpu else None)
            assert masks.resolve_selection(search.selection) == (selection if cpu else 'segmented')
            par = Parallel(search)
            state = par.replicate(search.init_state())
            flips = 0
            for step in range(6):
                state, metrics = par.train(state, *batches[step % 3])
                flips += int(np.asarray(metrics['flips'])[0])
            assert flips > 0  # the masks moved: the paths agree on real updates
            final[selection] = jax.device_get((state.mask, state.thresholds))
    jax.tree.map(np.testing.assert_array_equal, final['native'], final['hinted'])
    jax.tree.map(np.testing.assert_array_equal, final['native'], final['segmented'])


def test_without_the_kernels_a_long_search_keeps_the_hinted_selection(monkeypatch):
    # the segmented updates cost more per step: a search past SHORT_SEARCH steps would pay that
    from ljax import search as search_lib

    monkeypatch.setattr(masks, '_native_available', lambda: False)
    model, v = Net(), pretrained()
    x = data(1)[0][0][:1]
    for steps, want in ((search_lib.SHORT_SEARCH, 'segmented'), (search_lib.SHORT_SEARCH + 1, None)):
        search = Search.create(model, v, x, sparsity=0.7, total_steps=steps)
        assert search.selection == (want if jax.default_backend() == 'cpu' else None)


@pytest.mark.parametrize('restriction', ['none', 'cosine'])
def test_flips_metric_counts_the_mask_bits_each_step_changed(restriction, selection):
    # the step counts flips inside the mask update (hinted: from its hint pass and gathered blocks)
    model, v = Net(), pretrained()
    batches = data(3)
    search = Search.create(
        model, v, batches[0][0][:1], sparsity=0.7, total_steps=6,
        options=SearchOptions(restriction=restriction, lr=1.0),
    )
    par = Parallel(search)
    state = par.replicate(search.init_state())
    seen = []
    for step in range(6):
        before = jax.device_get(state.mask)  # a copy: the step donates the state
        state, metrics = par.train(state, *batches[step % 3])
        changed = sum(int(np.sum(before[n][0] != np.asarray(state.mask[n][0]))) for n in search.names)
        assert np.all(np.asarray(metrics['flips']) == changed), (step, metrics['flips'], changed)
        assert_carried_weights(search, Parallel.unreplicate(state))
        seen.append(changed)
    assert sum(seen) > 0


def assert_carried_weights(search, state):
    """The state's masked weights, which the kernel rewrites only where the mask changed, are
    those of its mask bit for bit: kept weights untouched, pruned ones +0.0 (not -0.0)."""
    want = search.masked_weights(state.mask, np)
    for n in search.names:
        got = np.asarray(state.weights[n])
        assert got.dtype == want[n].dtype
        bits = f'u{got.dtype.itemsize}'  # compared as bits: -0.0 is not +0.0
        np.testing.assert_array_equal(got.view(bits), want[n].view(bits), err_msg=n)


@pytest.mark.parametrize('momentum', [0.9, 0.0])
def test_the_cpu_step_moves_the_scores_in_the_kernel_bit_for_bit_as_optax(momentum, monkeypatch):
    # With ljax's kernels (CPU), the float32 top-k step updates the scores inside the kernel's
    # pass (`Search.fused_update`): after steps that flip bits, every leaf of the state (scores,
    # optimizer state, masks, masked weights, thresholds) is bit for bit that of optax's update
    # followed by the kernel's top-k. N:M, the restriction, bfloat16 and no weight decay keep
    # optax's update.
    model, v = Net(hidden=48), pretrained(Net(hidden=48))
    batches = data(3)
    x = batches[0][0][:1]
    states = []
    for fused in (True, False):
        with monkeypatch.context() as m:
            search = Search.create(model, v, x, sparsity=0.7, total_steps=6,
                                   options=SearchOptions(lr=1.0, score_init='random',
                                                         momentum=momentum))
            assert search.fused_update
            m.setattr(Search, 'fused_update', fused)
            par = Parallel(search)
            state, flips = par.replicate(search.init_state()), 0
            for step in range(6):
                state, metrics = par.train(state, *batches[step % 3])
                flips += int(np.asarray(metrics['flips'])[0])
            assert flips > 0
            states.append(jax.device_get(state))
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        assert a.dtype == b.dtype
        bits = f'u{a.dtype.itemsize}'
        np.testing.assert_array_equal(a.view(bits), b.view(bits))
    for options in (dict(nm=(2, 4)), dict(restriction='cosine'), dict(dtype='bfloat16'),
                    dict(weight_decay=0.0)):
        search = Search.create(model, v, x, sparsity=None if 'nm' in options else 0.7,
                               total_steps=6, options=SearchOptions(**options))
        assert not search.fused_update, options


def test_state_keeps_the_last_two_thresholds_for_the_hint():
    model, v = Net(), pretrained()
    batches = data(2)
    search = Search.create(model, v, batches[0][0][:1], sparsity=0.7, total_steps=2)
    par = Parallel(search)
    state = par.replicate(search.init_state())
    seen = [jax.device_get(state.thresholds)]  # copies: the step donates the state
    for x, y in batches:
        state, _ = par.train(state, x, y)
        for n in search.names:
            np.testing.assert_array_equal(state.previous[n], seen[-1][n])
        seen.append(jax.device_get(state.thresholds))
    assert any(  # the threshold moved: the drift the hint extrapolates is not always zero
        not np.array_equal(seen[1][n], seen[2][n]) for n in search.names
    )


def test_magnitude_init_starts_from_the_magnitude_mask():
    model, v = Net(), pretrained()
    search = Search.create(model, v, np.zeros((1, 12), np.float32), sparsity=0.9, total_steps=1)
    state = search.init_state()
    for n in search.names:
        np.testing.assert_array_equal(state.mask[n], search.magnitude[n])
    flat = np.concatenate(
        [np.abs(v['params'][n.split('/')[0]]['kernel']).reshape(-1) for n in search.names]
    )
    kept = np.concatenate([np.asarray(search.magnitude[n]).reshape(-1) for n in search.names])
    assert flat[kept].min() >= flat[~kept].max()


@pytest.mark.parametrize('score_init', ['magnitude', 'wanda', 'random'])
def test_initial_mask_and_thresholds_are_the_top_k_of_the_initial_scores(score_init):
    """init_state skips the selection where the scores say what it picks (magnitude and Wanda
    init: 1.0 on the initial mask, 1 - margin elsewhere); a selection must agree bit for bit."""
    from ljax import masks

    model, v = Net(), pretrained()
    search = Search.create(
        model, v, np.zeros((1, 12), np.float32), sparsity=0.7, total_steps=1,
        options=SearchOptions(score_init=score_init, seed=3),
        calibration=data() if score_init == 'wanda' else None,
    )
    state = search.init_state()
    assert_carried_weights(search, jax.device_get(state))
    mask, thresholds = masks.topk_masks(dict(state.scores), search.kept)
    for n in search.names:
        assert state.mask[n].dtype == bool
        np.testing.assert_array_equal(state.mask[n], mask[n])
        np.testing.assert_array_equal(state.thresholds[n], thresholds[n])
        np.testing.assert_array_equal(state.previous[n], thresholds[n])
        assert int(np.sum(state.mask[n])) == search.kept[n]
    if score_init != 'random':
        initial = search.wanda if score_init == 'wanda' else search.magnitude
        for n in search.names:
            np.testing.assert_array_equal(state.mask[n], initial[n])


def test_score_gradient_is_dL_dmasked_weight_times_weight():
    """One SGD step with lr 1, no momentum or decay: scores_1 = scores_0 - dL/dscores."""
    model, v = Net(), pretrained()
    x, y = data(1, batch=8)[0]
    search = Search.create(
        model,
        v,
        x[:1],
        sparsity=0.5,
        total_steps=1,
        options=SearchOptions(lr=1.0, momentum=0.0, weight_decay=0.0),
    )
    par = Parallel(search, jax.local_devices()[:1])
    s0 = search.init_state()
    s1, _ = par.train(par.replicate(s0), x, y)

    def loss(masked_kernels):
        p = jax.tree.map(jnp.asarray, v['params'])
        p = {
            **p,
            'Dense_0': {**p['Dense_0'], 'kernel': masked_kernels[0]},
            'Dense_1': {**p['Dense_1'], 'kernel': masked_kernels[1]},
        }
        logits, _ = model.apply(
            {'params': p, 'batch_stats': v['batch_stats']}, x, train=True, mutable=['batch_stats']
        )
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    w = [v['params']['Dense_0']['kernel'], v['params']['Dense_1']['kernel']]
    m = [s0.mask['Dense_0/kernel'], s0.mask['Dense_1/kernel']]
    g = jax.grad(loss)([w[0] * m[0], w[1] * m[1]])
    for i, n in enumerate(['Dense_0/kernel', 'Dense_1/kernel']):
        np.testing.assert_allclose(
            s0.scores[n] - s1.scores[n][0], g[i] * w[i], rtol=1e-4, atol=1e-7
        )


@pytest.mark.slow  # compiles the search for 1 and 4 devices
def test_four_devices_agree_with_one_device():
    """Same global batches on 1 and on 4 devices, synchronised BN (axis_name=AXIS_NAME).

    Tolerance: the per-device sums (BN moments, loss mean, pmean of gradients) add the same
    numbers in a different order, so scores and statistics agree to float32 rounding (1e-5 here
    after 8 steps), not bit for bit; masks are compared exactly (no score lands within rounding
    of a threshold in this run).
    """
    model = Net(bn_axis=AXIS_NAME)
    v = pretrained(model)
    batches = data(4, batch=32)
    results = []
    for devices in (jax.local_devices()[:1], jax.local_devices()[:4]):
        search = Search.create(
            model,
            v,
            batches[0][0][:1],
            sparsity=0.8,
            total_steps=8,
            options=SearchOptions(restriction='poly4'),
        )
        par = Parallel(search, devices)
        state = par.replicate(search.init_state())
        for step in range(8):
            state, _ = par.train(state, *batches[step % 4])
        results.append(jax.device_get(state))
    one, four = results
    for n in one.mask:
        for d in range(4):
            np.testing.assert_array_equal(four.mask[n][d], one.mask[n][0])
        np.testing.assert_allclose(four.scores[n][0], one.scores[n][0], atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5),
        four.batch_stats,
        one.batch_stats,
    )


class NoBN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(sparsity=1.0), 'sparsity'),
        (dict(sparsity=-0.1), 'sparsity'),
        (dict(sparsity='0.9'), 'sparsity'),
        (dict(epochs=0), 'epochs'),
        (dict(epochs=1.5), 'epochs'),
        (dict(prunable=lambda path, leaf: False), 'prunable'),
        (dict(score_init='zeros'), 'score_init'),
        (dict(allocation='erk?'), 'allocation'),
        (dict(restriction='sometimes'), 'restriction'),
        (dict(learning_rate=0.1), 'options'),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    args = dict(sparsity=0.5, epochs=1) | kwargs
    with pytest.raises(ValueError, match=match):
        search_jackpot(Net(), pretrained(), data(1), **args)


def test_bad_variables_and_batches():
    v = pretrained()
    with pytest.raises(
        ValueError, match=r'variables.*Dense_0/kernel: expected \(12, 32\), found \(12, 16\)'
    ):
        bad = jax.tree.map(np.copy, v)
        bad['params']['Dense_0']['kernel'] = np.zeros((12, 16), np.float32)
        search_jackpot(Net(), bad, data(1), sparsity=0.5, epochs=1)
    with pytest.raises(ValueError, match='variables.*missing'):
        search_jackpot(
            Net(), {'params': {}, 'batch_stats': v['batch_stats']}, data(1), sparsity=0.5, epochs=1
        )
    with pytest.raises(ValueError, match='variables'):
        search_jackpot(Net(), v['params'], data(1), sparsity=0.5, epochs=1)
    with pytest.raises(ValueError, match='batches: empty'):
        search_jackpot(Net(), v, [], sparsity=0.5, epochs=1)
    with pytest.raises(ValueError, match='batches: got an iterator'):
        search_jackpot(Net(), v, iter(data(1)), sparsity=0.5, epochs=1)
    with pytest.raises(
        ValueError, match='batches: a global batch of 6 does not divide across 4 devices'
    ):
        search_jackpot(Net(), v, data(1, batch=6), sparsity=0.5, epochs=1)


class SqrtBias(nn.Module):
    """y = x @ kernel + sqrt(bias): a zero bias has an infinite gradient, the loss stays finite."""

    @nn.compact
    def __call__(self, x, train):
        k = self.param('kernel', nn.initializers.normal(1.0), (x.shape[-1], 8))
        b = self.param('bias', nn.initializers.zeros, (8,))
        return nn.Dense(5)(nn.relu(x @ k + jnp.sqrt(b)))


def test_the_step_differentiates_and_checks_the_pruned_layers_biases():
    """Only the kernels' scores train, yet the step also takes the gradient of each pruned
    kernel's bias (as a plain train step does, so XLA writes each layer's output gradient once)
    and checks it: an infinite bias gradient skips the step though the loss is finite."""
    search = Search.create(Net(), pretrained(), data()[0][0][:1], sparsity=0.5, total_steps=1)
    assert search.biases == ['Dense_0/bias', 'Dense_1/bias']  # not the classifier's, not BN's
    model = SqrtBias()
    v = jax.device_get(model.init(jax.random.key(0), np.zeros((1, 12), np.float32), train=False))
    search = Search.create(model, v, data()[0][0][:1], sparsity=0.5, total_steps=2)
    assert search.names == ['kernel'] and search.biases == ['bias']
    par = Parallel(search, jax.local_devices()[:1])
    state = search.init_state()
    before = np.array(state.scores['kernel'])
    new, metrics = par.train(par.replicate(state), *data(1)[0])
    assert np.isfinite(float(metrics['loss'][0])) and int(metrics['finite'][0]) == 0
    np.testing.assert_array_equal(new.scores['kernel'][0], before)


def test_model_without_batchnorm():
    model = NoBN()
    v = model.init(jax.random.key(0), np.zeros((1, 12), np.float32), train=False)
    batches = [(x, y % 3) for x, y in data(2)]  # 3 classes
    jp = search_jackpot(model, v, batches, sparsity=0.5, epochs=1, restriction='cosine')
    assert 'batch_stats' not in jp.variables
    # Dense(3) is constructed first (Dense_0) but called last: it is the classifier
    assert jp.kept_per_layer == {'Dense_1/kernel': 48}


@pytest.mark.parametrize('score_init, nm', [('magnitude', None), ('wanda', None), ('magnitude', (2, 4))])
def test_the_initial_state_from_a_mask_is_made_on_the_host(score_init, nm):
    """From a magnitude or Wanda mask the initial state is NumPy, nothing compiled: the mask,
    scores 1.0 on it and 1.0 - margin elsewhere, the key of 1.0 (N:M: 0), the optimizer's own
    initial state and JAX's split of the seed's key."""
    from ljax import masks

    model, v = Net(), pretrained()
    search = Search.create(
        model, v, np.zeros((1, 12), np.float32), sparsity=None if nm else 0.7, total_steps=4,
        options=SearchOptions(score_init=score_init, seed=7, nm=nm, score_margin=0.25),
        calibration=data() if score_init == 'wanda' else None,
    )
    state = search.init_state()
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(state))
    initial = search.wanda if score_init == 'wanda' else search.magnitude
    one = 0 if nm else int(masks.order_keys(jnp.float32(1.0)))
    for n in search.names:
        m = np.asarray(initial[n], bool)
        np.testing.assert_array_equal(state.mask[n], m)
        np.testing.assert_array_equal(state.scores[n], np.where(m, 1.0, 0.75).astype(np.float32))
        assert state.scores[n].dtype == np.float32 and state.thresholds[n].dtype == np.uint32
        assert int(state.thresholds[n]) == one and int(state.previous[n]) == one
    want = search.optimizer().init({n: jnp.asarray(s) for n, s in state.scores.items()})
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        state.rng, jax.random.key_data(jax.random.split(jax.random.key(7))[1])
    )
    assert int(state.step) == 0 and state.step.dtype == np.int32


def test_checkpoints_leave_out_the_masked_weights_and_a_resume_rebuilds_them(tmp_path):
    from ljax import checkpoints

    model, v = Net(), pretrained()
    batches = data(3)
    search = Search.create(model, v, batches[0][0][:1], sparsity=0.7, total_steps=6,
                           options=SearchOptions(lr=1.0))
    par = Parallel(search)
    state = par.replicate(search.init_state())
    for step in range(3):
        state, _ = par.train(state, *batches[step])
    state = Parallel.unreplicate(state)
    ckpt = checkpoints.Checkpoints(str(tmp_path), 2)
    ckpt.save(3, search.checkpointed(state), {'wall_seconds': 0.0})
    ckpt.wait()
    abstract = search.checkpointed(search.init_state())
    assert not jax.tree.leaves(abstract.weights)  # 4 bytes a weight not written to disk
    step, restored, _ = ckpt.restore(abstract)
    ckpt.close()
    assert step == 3
    resumed = search.resumed(restored)
    assert jax.tree.structure(resumed) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_carried_weights(search, resumed)
    # and the search goes on from there as from the state it was saved from
    one = par.train(par.replicate(resumed), *batches[0])[0]
    two = par.train(par.replicate(state), *batches[0])[0]
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
