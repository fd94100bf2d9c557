"""Data parallelism over every device of every process: one `jax.pmap` with the axis `AXIS_NAME`.

One device (one process, one local device, or `devices` naming one): no pmap. The per-device
function runs under `jax.jit` of a `jax.vmap` with `axis_name=AXIS_NAME` over a mapped axis of
size 1 whose inputs are all unmapped (`in_axes=None`): the collectives (`lax.pmean`, `lax.psum`)
reduce over that one member and trace to nothing, and every `lax.cond` stays a conditional (a
vmap over a *mapped* leading axis would turn each into a select that runs both branches: the
selection's rare second try then costs every step, measured 2x on the ResNet-50 stand-in). The
state keeps its leading axis of 1 and its donation, so everything else (replicate, put, `first`,
checkpoints) is the same on one device and on several; the program is the plain jitted step's.

A task (the jackpot search, dense pretraining) supplies pure per-device functions:
`train_step(state, frozen, x, y) -> (state, metrics)` and optionally
`eval_step(frozen, mask, batch_stats, x, y, weight) -> sums`; they reduce across devices with
`lax.pmean` / `lax.psum` over `AXIS_NAME`. `frozen` (the pre-trained params) is replicated once
and never donated.

Multi-host: the pmap names no devices, so its collectives span the devices of all processes
(`jax.distributed.initialize` joins them); each process passes its own share of the global batch,
which is split across its local devices. Only the local copies are ever read back (`first`).
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np
from flax import jax_utils

from ljax import cpumem

AXIS_NAME = 'batch'


def first(tree):
    """The first local device's copy of every leaf of a replicated tree, as host NumPy arrays.

    Reads the shard buffers: `a[0]` would dispatch one device op per leaf (about 1.6 ms each on
    CPU), and `np.asarray(a)` fails for arrays that span several processes.
    """

    def leaf(a):
        if isinstance(a, jax.Array):
            return a.addressable_shards[0].data
        return np.asarray(a)[0]

    fetched = jax.device_get(jax.tree.map(leaf, tree))
    return jax.tree.map(lambda a: a[0] if isinstance(a, np.ndarray) and a.ndim else a, fetched)


def _on_one_device(fn, sharding, donate=()):
    """`fn` (per-device, collectives over `AXIS_NAME`) as one jitted program on one device, taking
    and returning arrays with a leading axis of size 1 as pmap does (see the module docstring)."""

    def one(*args):
        args = jax.tree.map(lambda a: a[0], args)
        # unmapped inputs: collectives over the axis of size 1 are identities, conds stay conds;
        # out_axes=0 puts back the leading axis (a broadcast to size 1: a reshape)
        return jax.vmap(fn, in_axes=None, out_axes=0, axis_size=1, axis_name=AXIS_NAME)(*args)

    # outputs placed as `replicate` and `put` place the inputs: the next call's inputs then have
    # the same sharding, and the program is compiled once
    def jit(options=None):
        return jax.jit(one, donate_argnums=donate, out_shardings=sharding, compiler_options=options)

    if sharding.mesh.devices.flat[0].platform == 'cpu':  # temporaries kept paged in: ljax.cpumem
        cpumem.keep_freed_memory()
        return _HeapsSized(jit)
    return jit()


class _HeapsSized:
    """A jitted CPU program whose temporaries' heaps (`cpumem.compiler_options`) are sized on its
    first call to hold its largest value; the call reuses the trace the sizing made. Other
    attributes (`trace`, `lower`) are the jitted program's."""

    def __init__(self, jit):
        self._jit_with = jit
        self._options = cpumem.compiler_options()
        self._jit = jit(self._options)
        self._sized = self._options is None

    def __call__(self, *args):
        if not self._sized:
            options = cpumem.compiler_options(self._jit.trace(*args).jaxpr)
            if options != self._options:
                self._options, self._jit = options, self._jit_with(options)
            self._sized = True
        return self._jit(*args)

    def __getattr__(self, name):
        return getattr(self._jit, name)


class Parallel:
    """Train and eval steps of a task over all devices (or the given local devices): pmapped over
    several, one jitted program on one (`pmapped` says which)."""

    def __init__(self, task, devices=None, *, pmap: bool | None = None):
        """pmap: None (pmap over several devices or processes, one jitted program on one device);
        True forces pmap on one device too (the comparison in tests and benchmarks)."""
        self.task = task
        if devices is not None and jax.process_count() > 1:
            raise ValueError('devices: naming devices is for one process only (tests, benchmarks)')
        # With no `devices`, pmap spans every process's devices; naming local devices would make
        # each process reduce over its own devices only (a silently different search per host).
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.n = len(self.devices)
        pmap_devices = self.devices if devices is not None else None
        self._sharding = jax.NamedSharding(
            jax.sharding.Mesh(np.array(self.devices), (AXIS_NAME,)), jax.P(AXIS_NAME)
        )
        self.frozen = self.replicate(getattr(task, 'frozen', {}))
        # several devices, or several processes (whose collectives span all of them): pmap
        several = self.n > 1 or jax.process_count() > 1
        self.pmapped = several if pmap is None else bool(pmap)
        if several and not self.pmapped:
            raise ValueError('pmap: False needs one device in one process')

        def mapped(fn, donate=()):
            if fn is None:
                return None
            if self.pmapped:
                return jax.pmap(fn, AXIS_NAME, devices=pmap_devices, donate_argnums=donate)
            return _on_one_device(fn, self._sharding, donate)

        # the state is donated (updated in place) unless the task says not (`donate`)
        self.step = mapped(task.train_step, (0,) if getattr(task, 'donate', True) else ())
        self.eval = mapped(getattr(task, 'eval_step', None))
        self.bn = mapped(getattr(task, 'bn_step', None))

    # ------------------------------------------------------------------ placement
    def shard(self, *arrays):
        """(n_local, batch / n_local, ...) views of this process's share of a global batch; each
        argument an array or a pytree of arrays (a model's several inputs)."""

        def split(a):
            a = np.asarray(a)
            if a.shape[0] % self.n:
                raise ValueError(
                    f'batches: a global batch of {a.shape[0] * jax.process_count()} does not '
                    f'divide across {self.n * jax.process_count()} devices; use a batch size '
                    f'that is a multiple of {self.n * jax.process_count()}'
                )
            return a.reshape((self.n, a.shape[0] // self.n) + a.shape[1:])

        return [jax.tree.map(split, a) for a in arrays]

    def put(self, *arrays):
        """Shard and copy to the local devices ahead of the step (prefetch)."""
        return tuple(jax.device_put(a, self._sharding) for a in self.shard(*arrays))

    def replicate(self, tree):
        # pmap's own sharding (mesh axis AXIS_NAME): a different one would recompile at step 1.
        # Stacked on the host: flax stacks device arrays with `jnp.stack`, one compilation per
        # leaf shape (about 6 ms each on a CPU); host arrays it stacks with NumPy (copies)
        return jax_utils.replicate(jax.device_get(tree), self.devices, axis_name=AXIS_NAME)

    unreplicate = staticmethod(first)

    # ------------------------------------------------------------------ steps
    def train(self, state, x, y):
        """One step on a global batch (this process's share of it); returns device values only."""
        if not all(isinstance(a, jax.Array) for a in jax.tree.leaves(x)):
            x, y = self.shard(x, y)
        return self.step(state, self.frozen, x, y)

    def reestimate_batch_stats(self, batches: Iterable, mask, batch_stats, steps: int):
        """BN running statistics of the masked model after `steps` train-mode forward passes
        over `batches` ((x, y, ...) tuples), starting from `batch_stats`; host values."""
        mask_r, stats_r = self.replicate(mask), self.replicate(batch_stats)
        for i, batch in enumerate(batches):
            if i == steps:
                break
            stats_r = self.bn(self.frozen, mask_r, stats_r, *self.shard(batch[0]))
        return first(stats_r)

    def evaluate(self, batches: Iterable, mask, batch_stats) -> dict:
        """Accuracy and mean loss over (x, y) or (x, y, weight) batches; mask None = dense."""
        mask_r = self.replicate(mask) if mask is not None else None
        return self.evaluate_replicated(batches, mask_r, self.replicate(batch_stats))

    def evaluate_state(self, batches: Iterable, state) -> dict:
        """`evaluate` of a replicated search state's mask and statistics, left on the devices."""
        return self.evaluate_replicated(batches, state.mask, state.batch_stats)

    def evaluate_replicated(self, batches: Iterable, mask_r, batch_stats_r) -> dict:
        total: Any = None
        for batch in batches:
            x, y = batch[0], batch[1]
            w = batch[2] if len(batch) > 2 else np.ones(np.shape(y), np.float32)
            x, y, w = self.shard(x, y, w)
            # psum'd over all devices; summed on the host (float64) across batches
            out = first(self.eval(self.frozen, mask_r, batch_stats_r, x, y, w))
            out = {k: np.float64(v) for k, v in out.items()}
            total = out if total is None else {k: total[k] + out[k] for k in total}
        if total is None:
            raise ValueError('eval batches: empty; expected at least one (x, y) batch')
        count = float(total['count'])
        out = {'accuracy': float(total['correct']) / count, 'loss': float(total['loss']) / count}
        if 'correct5' in total:
            out['top5_accuracy'] = float(total['correct5']) / count
        return out
