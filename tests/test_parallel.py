"""`ljax.parallel.Parallel` on one device: one jitted program (no pmap), the same state as pmap
over that one device, the non-finite guard there too; several devices keep pmap."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from ljax import cpumem
from ljax.parallel import Parallel, first
from ljax.pretrain import DenseTraining
from ljax.search import Search, SearchOptions
from tests.test_search import Net, data, pretrained


def _search(**options):
    model, v = Net(), pretrained()
    return Search.create(
        model, v, data(1)[0][0][:1], sparsity=0.7, total_steps=8, options=SearchOptions(**options)
    )


def _run(par, search, batches):
    state = par.replicate(search.init_state())
    metrics = []
    for x, y in batches:
        state, m = par.train(state, x, y)
        metrics.append(m)
    return jax.device_get(state), jax.device_get(metrics)


def test_one_device_is_one_jitted_program_without_collectives():
    search = _search()
    one = Parallel(search, jax.devices()[:1])
    assert not one.pmapped and Parallel(search).pmapped  # conftest: 4 devices
    assert Parallel(search, jax.devices()[:1], pmap=True).pmapped
    with pytest.raises(ValueError, match='pmap: False needs one device'):
        Parallel(search, pmap=False)
    state = one.replicate(search.init_state())
    x, y = one.put(*data(1)[0])
    jaxpr = str(one.step.trace(state, one.frozen, x, y).jaxpr)
    # the collectives over the axis of size 1 trace to nothing; no pmap, no shard_map
    for primitive in ('pmap', 'shard_map', 'psum', 'pmean', 'all_reduce'):
        assert primitive not in jaxpr, primitive
    # the outputs are placed as the inputs: one compilation for every step
    for x, y in data(3):
        state, _ = one.train(state, x, y)
    assert one.step._cache_size() == 1


@pytest.mark.parametrize('options', [{}, {'restriction': 'cosine'}])
def test_one_device_gives_the_state_of_pmap_over_one_device(options):
    """The jitted program and pmap over the same one device, 6 steps.

    Masks, thresholds, step and metrics agree exactly; floats to 1 ulp (rtol 1e-6), not bit for
    bit: pmap keeps each `lax.pmean` as an all-reduce between the batch moments and the BN
    running-average update, where the jitted program has none, so XLA fuses (and vectorises) the
    moment reductions differently and the running means may differ in the last bit (measured:
    scores bit-identical, BN running means 1 ulp apart)."""
    search = _search(**options)
    batches = data(6)
    devices = jax.devices()[:1]
    one, m_one = _run(Parallel(search, devices), search, batches)
    pm, m_pm = _run(Parallel(search, devices, pmap=True), search, batches)
    for field in ('mask', 'thresholds', 'previous', 'step'):
        jax.tree.map(np.testing.assert_array_equal, getattr(one, field), getattr(pm, field))
    for field in ('scores', 'opt_state', 'batch_stats'):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            getattr(one, field),
            getattr(pm, field),
        )
    for a, b in zip(m_one, m_pm):
        assert a['flips'] == b['flips'] and a['finite'] == b['finite'] == 1
        np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-6)


def test_one_device_skips_a_non_finite_batch():
    search = _search()
    par = Parallel(search, jax.devices()[:1])
    (x0, y0), (x1, y1) = data(2)
    x1 = x1.copy()
    x1[3, 5] = np.nan
    state, m0 = par.train(par.replicate(search.init_state()), x0, y0)
    before = jax.device_get(state)
    state, m1 = par.train(state, x1, y1)
    after = jax.device_get(state)
    assert int(m0['finite'][0]) == 1 and int(m1['finite'][0]) == 0 and int(m1['flips'][0]) == 0
    assert int(after.step[0]) == int(before.step[0]) + 1
    for field in ('scores', 'mask', 'thresholds', 'previous', 'opt_state', 'batch_stats'):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, field), getattr(before, field))
    state, m2 = par.train(state, x0, y0)  # and the next finite batch is applied
    assert int(m2['finite'][0]) == 1


def test_one_device_dense_training_evaluation_and_statistics():
    """DenseTraining's step (NaN batch skipped, state unchanged), evaluation and the BN
    re-estimation on one device agree with pmap over that device."""
    model, v = Net(), pretrained()
    batches = data(3)
    devices = jax.devices()[:1]
    states = {}
    for kind in ('jit', 'pmap'):
        task = DenseTraining(model, lr=0.1, weight_decay=5e-4, total_steps=4)
        par = Parallel(task, devices, pmap=kind == 'pmap')
        state = par.replicate(task.init_state(v))
        for x, y in batches:
            state, m = par.train(state, x, y)
        before = jax.device_get(state)
        x = batches[0][0].copy()
        x[0, 0] = np.inf
        state, m = par.train(state, x, batches[0][1])
        after = jax.device_get(state)
        assert int(m['finite'][0]) == 0 and int(after['step'][0]) == int(before['step'][0]) + 1
        for key in ('params', 'batch_stats', 'opt_state'):
            jax.tree.map(np.testing.assert_array_equal, after[key], before[key])
        states[kind] = after
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        states['jit'],
        states['pmap'],
    )
    search = _search()
    mask = search.init_state().mask
    results = {}
    for kind in ('jit', 'pmap'):
        par = Parallel(search, devices, pmap=kind == 'pmap')
        results[kind] = (
            par.evaluate(batches, mask, v['batch_stats']),
            par.reestimate_batch_stats(batches, mask, v['batch_stats'], 2),
        )
    assert results['jit'][0] == pytest.approx(results['pmap'][0], rel=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        results['jit'][1],
        results['pmap'][1],
    )


def test_dense_training_takes_another_optimizer():
    """tx= replaces the recipe: plain SGD without momentum moves every parameter by -lr * grad."""
    model, v = Net(), pretrained()
    (x, y), = data(1)
    task = DenseTraining(model, lr=0.1, weight_decay=5e-4, total_steps=4, tx=optax.sgd(0.5))
    par = Parallel(task, jax.devices()[:1])
    state, _ = par.train(par.replicate(task.init_state(v)), x, y)

    def loss(params):
        logits, _ = model.apply({'params': params, 'batch_stats': v['batch_stats']}, x,
                                train=True, mutable=['batch_stats'])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(v['params'])
    want = jax.tree.map(lambda p, g: p - 0.5 * g, v['params'], grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 first(state)['params'], want)


_FAULTS = '''
import resource
import jax, jax.numpy as jnp, numpy as np
from ljax import cpumem
from ljax.parallel import Parallel

# a search-like step over 8 layers: masked weights and gradients of 9.4 MB each, and in the last
# two of 40.9 MB each (over glibc's largest mmap threshold: only M_MMAP_MAX 0 keeps them)
SHAPES = [(1536, 1536)] * 6 + [(1536, 6656), (6656, 1536)]


class Task:
    frozen = {i: np.random.default_rng(i).normal(size=shape).astype(np.float32) / 40
              for i, shape in enumerate(SHAPES)}

    def train_step(self, state, frozen, x, y):
        def loss(s):
            h = x
            for i in range(8):
                h = jnp.tanh(h @ (frozen[i] * s[i]))
            return jnp.sum(h ** 2)
        l, g = jax.value_and_grad(loss)(state)
        return {i: state[i] - 1e-6 * g[i] * frozen[i] for i in range(8)}, {'loss': l}

par = Parallel(Task(), jax.local_devices()[:1])
state = par.replicate({i: jnp.ones(shape, jnp.float32) for i, shape in enumerate(SHAPES)})
x, y = par.put(np.ones((8, 1536), np.float32), np.zeros(8, np.int32))
temp = par.step.lower(state, par.frozen, x, y).compile().memory_analysis().temp_size_in_bytes
for _ in range(10):  # every thread that allocates has met the step's sizes
    state, m = par.train(state, x, y)
    jax.block_until_ready(m)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    state, m = par.train(state, x, y)
    jax.block_until_ready(m)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(temp >> 12, faults, cpumem.keep_freed_memory())
'''


@pytest.mark.parametrize('switch', ['1', '0'])
def test_cpu_step_temporaries_stay_paged_in(switch):
    """A step's temporaries, 160+ MB in all in buffers of up to 41 MB (over glibc's mmap
    threshold), are paged in once, not at every step (ljax.cpumem), unless LJAX_MALLOPT=0 (the
    fault count then shows the test can fail)."""
    done = subprocess.run(
        [sys.executable, '-c', _FAULTS], capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, 'LJAX_MALLOPT': switch, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pages, faults, applied = done.stdout.split()[-3:]
    pages, faults = int(pages), float(faults)
    assert pages > (64 << 20) >> 12  # the masked weights, alive from forward to backward
    if switch == '1':
        # most steps fault no page; some still fault a few while glibc's heaps settle (up to 19%
        # of the pages, measured)
        assert applied == 'True' and faults < 0.4 * pages, (pages, faults)
    else:
        assert applied == 'False' and faults > 0.9 * pages, (pages, faults)


def test_largest_value_counts_the_values_inside_conditionals():
    """`cpumem.largest_value_bytes` reads the jaxprs in equations' parameters (a cond's branches,
    a scan's body), where the largest value of a step may only exist."""

    def f(p, v):
        def big(v):  # a 1000 x 1000 float32 outer product, 4 MB, only in this branch
            return jax.numpy.outer(v, v).sum()

        def scanned(c, _):
            return c + jax.numpy.tile(v, 30).sum(), None  # 120 kB a step

        return jax.lax.cond(p, big, jax.numpy.sum, v) + jax.lax.scan(scanned, 0.0, None, 3)[0]

    jaxpr = jax.make_jaxpr(f)(True, np.ones(1000, np.float32))
    assert cpumem.largest_value_bytes(jaxpr) == 4_000_000
    inner = jax.make_jaxpr(lambda v: jax.lax.scan(
        lambda c, _: (c + jax.numpy.tile(v, 30).sum(), None), 0.0, None, 3)[0])
    assert cpumem.largest_value_bytes(inner(np.ones(1000, np.float32))) == 120_000
    assert cpumem.compiler_options(jaxpr) == {
        'xla_multiheap_size_constraint_per_heap': cpumem.HEAP_BYTES
    }


_BIG = '''
import sys
import jax, jax.numpy as jnp, numpy as np
from ljax import cpumem
from ljax.parallel import Parallel

D = 4608  # 81 MiB matrices: one value over the heaps' 56 MB


class Task:
    frozen = {0: np.random.default_rng(0).normal(size=(D, D)).astype(np.float32) / 80}

    def train_step(self, state, frozen, x, y):
        def loss(s):
            return jnp.sum(jnp.tanh(x @ (frozen[0] * s[0])) ** 2)
        l, g = jax.value_and_grad(loss)(state)
        return {0: state[0] - 1e-6 * g[0] * frozen[0]}, {'loss': l}


par = Parallel(Task(), jax.local_devices()[:1])
state = par.replicate({0: jnp.ones((D, D), jnp.float32)})
x, y = par.put(np.ones((8, D), np.float32), np.zeros(8, np.int32))
if sys.argv[1] == 'parallel':
    state, m = par.train(state, x, y)
else:  # the same program at the fixed heap size
    par.step._jit_with(cpumem.compiler_options()).lower(state, par.frozen, x, y).compile()
print('done')
'''


@pytest.mark.parametrize('how', ['parallel', 'fixed heaps'])
def test_cpu_heaps_hold_the_largest_value_without_warnings(how):
    """XLA warns on stderr for every buffer over the heap size at each compile: `Parallel` sizes
    the heaps to the step's largest value, so a step with an 81 MiB value compiles quietly, while
    the same program with the fixed heaps warns (showing the test can fail)."""
    done = subprocess.run(
        [sys.executable, '-c', _BIG, how], capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu', 'LJAX_MALLOPT': '1',
             'TF_CPP_MIN_LOG_LEVEL': '0'},  # XLA's warnings shown (conftest hides them)
    )
    assert done.returncode == 0 and done.stdout.split()[-1] == 'done', done.stderr[-3000:]
    warned = 'larger than the per-heap size limit' in done.stderr
    assert warned == (how == 'fixed heaps'), done.stderr[-3000:]
