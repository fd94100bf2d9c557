"""Speed and memory of the search: step time, mask-update scaling, bytes of the search state.

    python benchmarks/speed.py           # full (a few minutes on a 2-core CPU)
    python benchmarks/speed.py --quick   # tiny sizes (seconds), used by the tests
    python benchmarks/speed.py --parts plain --with-pmap   # the headline alone, + the pmap path

Headline (`--parts plain`): step time against the plain flax train step users write themselves
(`benchlib.PlainStep`: `TrainState`, `jax.jit(train_step)`, `optax.sgd(0.1, 0.9)`, BatchNorm
`mutable=['batch_stats']`), same model, data, batch, float32 and device, in the same process,
interleaved step by step with ljax's dense step (`DenseTraining` with the plain step's optimizer)
and search step (90% sparsity),
both through `Parallel` on that device; ratios to the faster of the plain step with and without
donating its state. Models: the ResNet-50 stand-in (32x32, batch 16), ResNet-32 32/64/128 (32x32,
batch 64), the shipped BN-MLP (batch 256). `--parts api`: the public API with compilation, 160
steps of a small MLP and 94 of a small BN-CNN as a plain Python loop of the plain step against
`search_jackpot`, wall time of the whole call, JAX's caches cleared before each. `--parts
breakdown`: one search step of the ResNet-50 stand-in in parts (dense and masked
forward/backward, score update, mask update, both in the one call the step makes on CPU, the
guard's check) beside its floor, the bytes a search step must move beyond a dense step at this
machine's measured memory bandwidth. Both time the search past its first steps (`--warm`, 8
random batches in turn). CSV: speed_plain.csv, speed_api.csv, speed_breakdown.csv.

0. Steady state through the one loop (`--parts loop`): `search_jackpot` timed by its per-epoch
   callback against dense training on the same loop; the same search with the last threshold as
   the hint instead of its extrapolation (`masks.extrapolate`); and a 'floor' run, the same search
   with the mask update replaced by one elementwise pass (`one_pass_masks`): what no exact
   selection can go below, so floor / dense is the lowest search / dense this machine allows.
1. Step time, per model of the study (the shipped BN-MLP at 28x28, the narrow ResNet-32 at
   14x14, batch 256): a dense training step (SGD momentum 0.9 + coupled weight decay on the
   weights, train-mode BN) against the jackpot search step (`ljax.search.Parallel.train`: STE
   forward, SGD on the scores, mask update) with plain top-k (rate 1) and with the short
   restriction (rate 0.5), all on one device (the dense step pmapped, the search steps through
   `Parallel`: one jitted program), interleaved step by step so machine noise hits each alike; median of --steps steps after compilation. The ratio is search / dense.
2. The mask update alone, all layers in one jit: `masks.topk_masks` and
   `restriction.restrict_masks` (plain top-k and the short restriction at rate 0.5) against the
   per-layer loop of `benchlib.restrict_mask_with_threshold` they replace, against the number of prunable
   weights (the first L kernels ResNet-50 calls, conv1 ... fc, for 1M ... 25.5M weights) and
   against depth at a fixed size (L equal layers); 10% kept, scores N(0, 1) moved by N(0, 1e-3)
   from those that chose the previous mask and hints (as during a search); also the update without
   hints, one counting pass over all keys (the unit of cost) and `lax.top_k` + scatter. Median of
   --repeats, interleaved; the results are checked equal to the per-layer loop's.
3. Memory: bytes of `SearchState` (scores f32, mask bool, masked weights, threshold keys, SGD
   momentum, batch_stats, step, RNG) against the bytes of the frozen params: the params' shapes from
   `jax.eval_shape`, the initial state made on the host from zeros (ResNet-50: about 300 MB).

Prints markdown tables; writes CSV to --results-dir (default docs/results) and PNG plots to
--figures-dir (default docs/figures).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib

from ljax import loop as loop_lib
from ljax import masks, reductions, restriction
from ljax import sparsity as sparsity_lib
from ljax.models import get_model
from ljax import search_jackpot
from ljax.loop import Loop
from ljax.modelfn import model_fn
from ljax.pretrain import DenseTraining
from ljax.search import AXIS_NAME, Parallel, Search, SearchOptions


# ------------------------------------------------------------------ 0. steady state through the loop
def loop_models(quick: bool):
    """(label, model, input shape, batch, target search / dense)."""
    if quick:
        return [('BN-MLP 784-32-32-10', get_model('mlp', 10, hidden=(32, 32)), (28, 28, 1), 16, None)]
    return [
        ('shipped BN-MLP 784-768-768-10', get_model('mlp', 10, hidden=(768, 768)), (28, 28, 1), 256, 1.15),
        ('ResNet-50, 32x32', get_model('resnet50', 10), (32, 32, 3), 16, 1.10),
    ]


_TOPK_MASKS = masks.topk_masks


@functools.partial(jax.jit, static_argnames=('count_flips', 'selection'))
def one_pass_masks(scores, kept, hints=None, old=None, count_flips=None, selection=None,
                   weights=None, masked=None):
    """The floor of any mask update, standing in for `masks.topk_masks` in the 'floor' run: one
    elementwise pass (read the scores, write the mask `key >= hint`). Not a top-k: the count kept
    drifts; it times what an exact selection cannot go below (it must read every score and write
    every mask bit), everything else in the search step unchanged. With `old`, the flips it
    reports are 0 (not counted: a floor); with `weights`, the masked weights are `masked` as they
    were (a floor: not rewritten)."""
    if hints is None:  # the initial mask: exact
        return _TOPK_MASKS(scores, kept, old=old, count_flips=count_flips, selection=selection,
                           weights=weights, masked=masked)
    new = {n: masks.order_keys(s) >= hints[n] for n, s in scores.items()}
    flips = old is not None if count_flips is None else count_flips
    out = (new, hints) + ((jnp.int32(0),) if flips else ())
    if weights is not None:
        out += (masked if masked is not None else masks.masked_weights(new, weights),)
    return out


def loop_times(label, model, shape, batch, target, steps_per_epoch, epochs, rounds):
    """Epoch times through the one loop (`ljax.loop.Loop`), steady state: `search_jackpot` timed by
    its per-epoch callback, against dense training (`ljax.pretrain.DenseTraining`) on the same loop,
    rounds alternated; the median over every epoch but each run's first (compilation)."""
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.normal(size=(batch,) + shape).astype(np.float32),
            rng.integers(0, 10, batch).astype(np.int32),
        )
        for _ in range(steps_per_epoch)
    ]
    v = jax.device_get(model.init(jax.random.key(0), batches[0][0][:1], train=False))
    seconds = {'dense': [], 'search': [], 'last_hint': [], 'floor': []}

    def run_search(kind):
        rows = []
        with contextlib.ExitStack() as stack:
            if kind == 'floor':
                stack.enter_context(mock.patch.object(masks, 'topk_masks', one_pass_masks))
            if kind == 'last_hint':  # the hint before extrapolation: the last threshold alone
                stack.enter_context(mock.patch.object(masks, 'extrapolate', lambda last, _: last))
            search_jackpot(
                model, v, batches, sparsity=0.9, epochs=epochs, progress=False,
                callback=lambda epoch, row: rows.append(row['seconds']),
            )
        seconds[kind] += rows[1:]

    for _ in range(rounds):
        task = DenseTraining(model, lr=0.1, weight_decay=5e-4, total_steps=epochs * steps_per_epoch)
        par = Parallel(task)
        loop = Loop(par, epochs, steps_per_epoch, batch * jax.process_count(), progress=False)
        _, rows = loop.run(par.replicate(task.init_state(v)), lambda e, s: iter(batches))
        seconds['dense'] += [r['seconds'] for r in rows[1:]]
        for kind in ('search', 'last_hint', 'floor'):
            run_search(kind)
    dense, search, last_hint, floor = (
        float(np.median(seconds[k])) / steps_per_epoch
        for k in ('dense', 'search', 'last_hint', 'floor')
    )
    return {
        'model': label,
        'batch': batch,
        'input': 'x'.join(map(str, shape)),
        'devices': jax.device_count(),
        'dense_ms_per_step': 1e3 * dense,
        'search_ms_per_step': 1e3 * search,
        'ratio': search / dense,
        'last_hint_ms_per_step': 1e3 * last_hint,
        'last_hint_ratio': last_hint / dense,
        'floor_ms_per_step': 1e3 * floor,
        'floor_ratio': floor / dense,
        'target': target,
        'epochs_timed': len(seconds['search']),
    }


# ------------------------------------------------ 4. against the plain flax train step (headline)
def plain_models(quick: bool):
    """(label, model, input shape, batch, target search / plain, target dense / plain)."""
    if quick:
        return [('BN-MLP 784-32-32-10', get_model('mlp', 10, hidden=(32, 32)), (28, 28, 1), 16, None, None)]
    return [
        ('ResNet-50 stand-in, 32x32', get_model('resnet50', 10), (32, 32, 3), 16, 1.20, 1.05),
        (
            'ResNet-32 (32/64/128), 32x32',
            get_model('resnet32_cifar', 10, widths=(32, 64, 128)),
            (32, 32, 3),
            64,
            1.05,
            1.05,
        ),
        ('shipped BN-MLP 784-768-768-10', get_model('mlp', 10, hidden=(768, 768)), (28, 28, 1), 256, 1.10, 1.05),
    ]


def _cycled(step, placed):
    """An argument-less callable calling `step(x, y)` on `placed` batches in turn."""
    box = [0]

    def run():
        box[0] += 1
        return step(*placed[(box[0] - 1) % len(placed)])

    return run


def _ljax_step(par, state, batches, warm: int = 0, seen: list | None = None):
    """An argument-less callable running `par.train` on `batches` in turn (placed once), state
    carried, after `warm` untimed steps; each call's metrics appended to `seen` if given."""
    box = [state]

    def step(x, y):
        box[0], metrics = par.train(box[0], x, y)
        if seen is not None:
            seen.append(metrics)
        return metrics

    run = _cycled(step, [par.put(x, y) for x, y in batches])
    for _ in range(warm):
        jax.block_until_ready(run())
    if seen is not None:
        seen.clear()
    return run


def plain_times(label, model, shape, batch, target, dense_target, steps, with_pmap=False,
                warm: int = 50, n_batches: int = 8, min_seconds: float = 2.0):
    """Median step times, interleaved step by step on one device in one process: the plain flax
    train step (`benchlib.PlainStep`: TrainState, `jax.jit(train_step)`, `optax.sgd(0.1, 0.9)`,
    train-mode BN; state donated, and not donated), ljax's dense step (`DenseTraining` with the same
    optimizer: it differs by ljax's step machinery alone) and ljax's
    search step (90% sparsity, plain top-k), each through `Parallel` on that device; with_pmap
    adds the search step pmapped over the one device (the path before issue 34). Every step takes
    `n_batches` random batches in turn. The search is timed as it runs most of its steps: after
    `warm` untimed steps, past the first ones, which flip tens of thousands of bits each (its
    median flips per timed step are reported). `steps` timed steps of each, or as many as
    `min_seconds` of plain steps if more. Ratios are to the faster of the two plain steps."""
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(batch,) + shape).astype(np.float32),
                rng.integers(0, 10, batch).astype(np.int32)) for _ in range(n_batches)]
    v = jax.device_get(model.init(jax.random.key(0), batches[0][0][:1], train=False))
    device = jax.local_devices()[0]
    runs = {}
    for key, donate in (('plain', True), ('plain_not_donated', False)):
        plain = benchlib.PlainStep(model, v, [device], donate=donate)
        runs[key] = _cycled(plain, [plain.put(x, y) for x, y in batches])
    # the plain step's optimizer: the two differ by ljax's step machinery alone
    dense = DenseTraining(model, lr=0.1, weight_decay=0.0, total_steps=1, tx=optax.sgd(0.1, 0.9))
    par = Parallel(dense, [device])
    runs['dense'] = _ljax_step(par, par.replicate(dense.init_state(v)), batches)
    search = Search.create(model, v, batches[0][0][:1], sparsity=0.9, total_steps=10**6)
    par = Parallel(search, [device])
    seen: list = []
    runs['search'] = _ljax_step(par, par.replicate(search.init_state()), batches, warm, seen)
    if with_pmap:
        par = Parallel(search, [device], pmap=True)
        runs['search_pmap'] = _ljax_step(par, par.replicate(search.init_state()), batches, warm)
    # at least min_seconds of plain steps, counted from compiled ones: a step of a few ms swings
    # more than the ratios' margins
    jax.block_until_ready(runs['plain']())
    t = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(runs['plain']())
    steps = max(steps, int(min_seconds / ((time.perf_counter() - t) / 3)))
    med = benchlib.interleaved(runs, steps)
    plain = min(med['plain'], med['plain_not_donated'])
    flips = np.median([int(np.asarray(m['flips']).reshape(-1)[0]) for m in seen])
    row = {
        'model': label,
        'batch': batch,
        'input': 'x'.join(map(str, shape)),
        **{f'{k}_ms': 1e3 * t for k, t in med.items()},
        'dense_over_plain': med['dense'] / plain,
        'search_over_plain': med['search'] / plain,
        'search_over_dense': med['search'] / med['dense'],
        'target_search': target,
        'target_dense': dense_target,
        'steps': steps,
        'warm': warm,
        'search_flips_per_step': flips,
    }
    if with_pmap:
        row['search_pmap_over_plain'] = med['search_pmap'] / plain
    return row


def api_models(quick: bool) -> list[tuple]:
    """(label, model, input shape, batch, batches per epoch, target) of the api part: the issue's
    small MLP (160 steps) and small BN-CNN (94 steps)."""
    if quick:
        return [('BN-MLP 784-32-32-10', get_model('mlp', 10, hidden=(32, 32)), (28, 28, 1), 16, 8, None)]
    from ljax.models.resnet_cifar import ResNetCifar

    return [
        ('BN-MLP 784-64-64-10', get_model('mlp', 10, hidden=(64, 64)), (28, 28, 1), 32, 80, 1.3),
        ('BN-CNN ResNet-8 (8/16/32), 28x28', ResNetCifar(depth=8, widths=(8, 16, 32), num_classes=10),
         (28, 28, 1), 32, 47, 1.25),
    ]


def api_times(quick: bool, rounds: int) -> list[dict]:
    """Wall time of a whole run with compilation, through the public API: a plain Python loop of
    the plain flax step (TrainState, `jax.jit(train_step)`, a host read of the loss per epoch)
    against `search_jackpot` (90% sparsity, no progress bar), on the same model and batches, 2
    epochs, JAX's caches cleared before each run, runs alternated; the median of `rounds`."""
    out = []
    epochs = 2
    for label, model, shape, batch, n_batches, target in api_models(quick):
        rng = np.random.default_rng(0)
        batches = [
            (rng.normal(size=(batch,) + shape).astype(np.float32), rng.integers(0, 10, batch).astype(np.int32))
            for _ in range(n_batches)
        ]
        v = jax.device_get(model.init(jax.random.key(0), batches[0][0][:1], train=False))

        def plain_loop():
            state = benchlib.plain_train_state(model, v)
            step = jax.jit(benchlib.plain_train_step)
            for _ in range(epochs):
                for x, y in batches:
                    state, metrics = step(state, x, y)
                float(metrics['loss'])
            return state

        def ljax_run():
            return search_jackpot(model, v, batches, sparsity=0.9, epochs=epochs, progress=False)

        seconds = {'plain': [], 'search_jackpot': []}
        for _ in range(rounds):
            for key, fn in (('plain', plain_loop), ('search_jackpot', ljax_run)):
                jax.clear_caches()
                t = time.perf_counter()
                jax.block_until_ready(jax.tree.leaves(fn()))
                seconds[key].append(time.perf_counter() - t)
        plain, ours = (float(np.median(seconds[k])) for k in ('plain', 'search_jackpot'))
        out.append({
            'model': label,
            'batch': batch,
            'steps': n_batches * epochs,
            'plain_loop_s': plain,
            'search_jackpot_s': ours,
            'ratio': ours / plain,
            'target': target,
            'rounds': rounds,
        })
    return out


def memory_bandwidth(n: int = 1 << 25, repeats: int = 7) -> float:
    """Bytes per second of a jitted, donated `a * c + b` over `n` float32 (reads 2, writes 1)."""
    triad = jax.jit(lambda a, b: a * 1.0001 + b, donate_argnums=(0,))
    box = [jnp.ones(n, jnp.float32)]
    b = jnp.ones(n, jnp.float32)

    def run():
        box[0] = triad(box[0], b)
        return box[0]

    jax.block_until_ready(run())  # compile
    return 12 * n / benchlib.median_time(run, repeats)


def breakdown_models(quick: bool) -> list[tuple]:
    """(label, model, input shape, batch) of the breakdown part: the ResNet-50 stand-in (compute
    cheap next to its weights) and the shipped BN-MLP at batch 256."""
    if quick:
        return [('BN-MLP 784-32-32-10', get_model('mlp', 10, hidden=(32, 32)), (28, 28, 1), 16)]
    return [
        ('ResNet-50 stand-in, 32x32', get_model('resnet50', 10), (32, 32, 3), 16),
        ('shipped BN-MLP 784-768-768-10', get_model('mlp', 10, hidden=(768, 768)), (28, 28, 1), 256),
    ]


def breakdown_times(label, model, shape, batch, steps: int, bandwidth: float, warm: int = 50,
                    n_batches: int = 8) -> dict:
    """One search step of a model (90% sparsity) in parts, each jitted alone on the state after
    `warm` search steps on `n_batches` random batches in turn (the mask update: the next step's
    scores under that state's hints and mask), interleaved: the plain flax step (the faster of
    donated and not), the dense forward/backward (the plain step without its update), the masked
    forward/backward (the search's: over the masked weights its state carries, gradients with
    respect to them), the score update (STE product and SGD on scores and momentum), the mask
    update (`topk_masks` with hints and flips, over the old mask and masked weights in place),
    both as the step makes them where `Search.fused_update` (the score update in the kernel's
    pass: one call), and the guard's check of the gradients; beside the floor: the bytes a search
    step must move beyond a dense step, at `bandwidth` (bytes/s, this machine's measured)."""
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(batch,) + shape).astype(np.float32),
                rng.integers(0, 10, batch).astype(np.int32)) for _ in range(n_batches)]
    x, y = batches[0]
    v = jax.device_get(model.init(jax.random.key(0), x[:1], train=False))
    device = jax.local_devices()[0]
    search = Search.create(model, v, x[:1], sparsity=0.9, total_steps=10**6)
    par = Parallel(search, [device])
    replicated = par.replicate(search.init_state())
    # a state as during a search, past the first steps (which flip tens of thousands of bits each
    # while the thresholds jump far from their hints)
    for i in range(warm):
        replicated, _ = par.train(replicated, *batches[i % n_batches])
    state = jax.device_put(par.unreplicate(replicated), device)  # a copy: the step donates
    replicated, _ = par.train(replicated, *batches[warm % n_batches])
    after = jax.device_put(par.unreplicate(replicated), device)  # the scores the next update sees
    nxt = (warm + 1) % n_batches
    run_search = _ljax_step(par, replicated, batches[nxt:] + batches[:nxt])
    plains = [benchlib.PlainStep(model, v, [device], donate=d) for d in (True, False)]
    names, kept, tx = search.names, search.kept, search.optimizer()
    params = jax.device_put(search.params, device)
    xd, yd = jax.device_put((x, y), device)
    key = jax.random.key(0)

    def loss_of(p, batch_stats):
        logits, bs = search.apply(p, batch_stats, xd, train=True, rng=key)
        return search.loss(logits.astype(jnp.float32), yd).mean(), bs

    @jax.jit
    def dense_fwd_bwd(params, batch_stats):
        return jax.value_and_grad(loss_of, has_aux=True)(params, batch_stats)

    @jax.jit
    def masked_fwd_bwd(params, weights, batch_stats):
        f = sparsity_lib.flatten(params)
        return jax.value_and_grad(
            lambda w: loss_of(sparsity_lib.unflatten({**f, **w}), batch_stats), has_aux=True
        )(weights)

    (_, _), g = masked_fwd_bwd(params, state.weights, state.batch_stats)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def score_update(scores, opt_state, g, params):
        f = sparsity_lib.flatten(params)
        updates, opt_state = tx.update({n: g[n] * f[n] for n in names}, opt_state, scores)
        return optax.apply_updates(scores, updates), opt_state

    @functools.partial(jax.jit, donate_argnums=(3, 4))
    def mask_update(scores, thresholds, previous, old, masked, params):
        f = sparsity_lib.flatten(params)
        hints = {n: masks.extrapolate(thresholds[n], previous[n]) for n in names}
        return masks.topk_masks(scores, kept, hints, old=old, weights={n: f[n] for n in names},
                                masked=masked)

    @functools.partial(jax.jit, donate_argnums=0)
    def fused_update(moving, thresholds, previous, g, params):
        scores, opt_state, mask, weights = moving
        f = sparsity_lib.flatten(params)
        hints = {n: masks.extrapolate(thresholds[n], previous[n]) for n in names}
        now = types.SimpleNamespace(scores=scores, opt_state=opt_state, mask=mask, weights=weights)
        return search._fused_step(now, g, {n: f[n] for n in names}, hints)

    check = jax.jit(lambda g: loop_lib.finite(jnp.float32(0), g))
    # donated by the updates; the mask update writes over the old mask and masked weights, as in
    # the step (the first call flips the next step's bits, later ones find them flipped)
    box = jax.tree.map(jnp.copy, [state.scores, state.opt_state, state.mask, state.weights])
    fused_box, hints_of = jax.tree.map(jnp.copy, box), [state.thresholds, state.previous]

    def run_update():
        box[0], box[1] = score_update(box[0], box[1], g, params)
        return box[0]

    def run_mask_update():
        box[2], _, flips, box[3] = mask_update(after.scores, state.thresholds, state.previous,
                                               box[2], box[3], params)
        return flips

    def run_fused_update():  # the state moves on as in the step, under the same gradients
        scores, opt_state, mask, thresholds, flips, weights = fused_update(
            fused_box, *hints_of, g, params)
        fused_box[:] = [scores, opt_state, mask, weights]
        hints_of[:] = [thresholds, hints_of[0]]
        return flips

    runs = {
        'plain step': functools.partial(plains[0], *plains[0].put(x, y)),
        'plain step, not donated': functools.partial(plains[1], *plains[1].put(x, y)),
        'search step': run_search,
        'dense forward/backward': lambda: dense_fwd_bwd(params, state.batch_stats),
        'masked forward/backward': lambda: masked_fwd_bwd(params, state.weights, state.batch_stats),
        'score update': run_update,
        'mask update': run_mask_update,
        **({'score and mask update, one call': run_fused_update} if search.fused_update else {}),
        'finite check of the gradients': lambda: check(g),
    }
    med = benchlib.interleaved(runs, steps)
    med['plain step'] = min(med['plain step'], med.pop('plain step, not donated'))  # the faster
    prunable = sum(int(np.size(search.magnitude[n])) for n in names)
    # beyond a dense step (whose forward reads the weights as the search's reads the masked ones
    # it carries): the weights read again by the score update (STE product: 4 bytes), the old
    # mask read and the new one written (1 + 1): 6 bytes a weight (the selection ranks the new
    # scores as the update writes them, and the masked weights are rewritten only where the mask
    # changes)
    extra = 6 * prunable
    floor = extra / bandwidth
    return {
        'model': label,
        'batch': batch,
        'prunable': prunable,
        **{f'{k} (ms)': 1e3 * t for k, t in med.items()},
        'bytes_beyond_dense': extra,
        'bandwidth_GB_s': bandwidth / 1e9,
        'floor (ms)': 1e3 * floor,
        'floor_search_over_plain': (med['plain step'] + floor) / med['plain step'],
        'search_over_plain': med['search step'] / med['plain step'],
        'steps': steps,
    }


# ------------------------------------------------------------------------------- 1. step time
def step_models(quick: bool):
    """(label, model, input shape, batch)."""
    if quick:
        return [('BN-MLP 784-32-32-10', get_model('mlp', 10, hidden=(32, 32)), (28, 28, 1), 16)]
    return [
        ('BN-MLP 784-768-768-10, 28x28', get_model('mlp', 10, hidden=(768, 768)), (28, 28, 1), 256),
        (
            'ResNet-32 (8/16/32), 14x14',
            get_model('resnet32_cifar', 10, widths=(8, 16, 32)),
            (14, 14, 1),
            256,
        ),
        (  # the study's 'resnet32_budget' (issue 15): what a step costs at full resolution
            'ResNet-32 (8/16/32), 28x28',
            get_model('resnet32_cifar', 10, widths=(8, 16, 32)),
            (28, 28, 1),
            256,
        ),
    ]


def dense_step(model, tx, device):
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply(
                {'params': p, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd[
                'batch_stats'
            ]

        (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        g = jax.lax.pmean(g, AXIS_NAME)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), jax.lax.pmean(bs, AXIS_NAME), opt_state, loss

    return jax.pmap(step, AXIS_NAME, donate_argnums=(0, 1, 2), devices=[device])


def step_times(label, model, shape, batch, steps, sparsity=0.9):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    v = jax.device_get(model.init(jax.random.key(0), x[:1], train=False))
    device = jax.local_devices()[0]
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    dense = dense_step(model, tx, device)
    d_state = [
        jax_utils.replicate(t, [device])
        for t in (v['params'], v['batch_stats'], tx.init(v['params']))
    ]
    searches = {
        kind: Search.create(
            model,
            v,
            x[:1],
            sparsity=sparsity,
            total_steps=10**6,
            options=SearchOptions(restriction=restriction_),
        )
        for kind, restriction_ in (('top-k', 'none'), ('SR 0.5', 0.5))
    }
    pars = {kind: Parallel(search, [device]) for kind, search in searches.items()}
    states = {kind: pars[kind].replicate(s.init_state()) for kind, s in searches.items()}
    search = searches['top-k']
    metrics = {k: [] for k in states}  # every call's, warm-up included

    def run_dense():
        nonlocal d_state
        p, b, o, loss = dense(*d_state, x[None], y[None])
        d_state = [p, b, o]
        return loss

    def run_search(kind):
        def fn():
            states[kind], m = pars[kind].train(states[kind], x, y)
            metrics[kind].append(m)
            return m

        return fn

    fns = {'dense': run_dense, 'top-k': run_search('top-k'), 'SR 0.5': run_search('SR 0.5')}
    med = benchlib.interleaved(fns, steps, warmup=3)
    flips = {k: [int(m['flips'][0]) for m in ms[3:]] for k, ms in metrics.items()}
    n_params = sum(int(np.size(a)) for a in jax.tree.leaves(v['params']))
    n_prunable = sum(int(np.size(search.magnitude[n])) for n in search.names)
    return {
        'model': label,
        'batch': batch,
        'input': 'x'.join(map(str, shape)),
        'params': n_params,
        'prunable': n_prunable,
        'dense_ms': 1e3 * med['dense'],
        'search_topk_ms': 1e3 * med['top-k'],
        'search_sr_ms': 1e3 * med['SR 0.5'],
        'ratio_topk': med['top-k'] / med['dense'],
        'ratio_sr': med['SR 0.5'] / med['dense'],
        'images_per_s_dense': batch / med['dense'],
        'images_per_s_search': batch / med['top-k'],
        'mean_flips_topk': float(np.mean(flips['top-k'])),
        'mean_flips_sr': float(np.mean(flips['SR 0.5'])),
        'steps': steps,
    }


# --------------------------------------------------------------------------- 2. mask update
def resnet50_kernels():
    """Shapes of ResNet-50's conv and fc kernels, in the order the model calls them."""
    model = get_model('resnet50', 1000)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    flat = sparsity_lib.flatten(v['params'])
    return [
        tuple(flat[f'{layer}/kernel'].shape) for layer in benchlib.called_layers(model, v, x)
    ]


def prefixes(shapes, targets):
    """For each target count, the shortest prefix of `shapes` holding at least that many weights."""
    sizes = np.cumsum([int(np.prod(s)) for s in shapes])
    out = []
    for t in targets:
        i = int(np.searchsorted(sizes, t))
        out.append(shapes[: min(i + 1, len(shapes))])
    return out


def equal_layers(total, depths):
    """`total` weights split into L equal (n, 64) layers, for each L: depth at a fixed size."""
    return [[(max(1, total // (64 * d)), 64)] * d for d in depths]


def mask_update_times(shapes, repeats, with_lax=True):
    names = [f'layer{i}/kernel' for i in range(len(shapes))]
    n = sum(int(np.prod(s)) for s in shapes)
    keys = jax.random.split(jax.random.key(0), len(shapes))
    scores = {m: jax.random.normal(k, s) for m, k, s in zip(names, keys, shapes)}
    kept = {m: max(1, int(np.prod(s)) // 10) for m, s in zip(names, shapes)}
    # a search step: the mask and hints come from the previous scores, which moved a little
    moved = {
        m: s + 1e-3 * jax.random.normal(jax.random.fold_in(k, 1), s.shape)
        for (m, s), k in zip(scores.items(), keys)
    }
    prev, hints = masks.topk_masks(scores, kept)

    @jax.jit
    def per_layer(mask, scores, hints, rate):  # the search step before topk_masks/restrict_masks
        return {
            m: benchlib.restrict_mask_with_threshold(
                mask[m], scores[m], kept[m], rate, hint=hints[m]
            )
            for m in names
        }

    # XLA's program ('hinted'); the CPU default, the C++ kernel, is timed in the breakdown
    topk = jax.jit(lambda s, h: masks.topk_masks(s, kept, h, selection='hinted'))
    restrict = jax.jit(lambda m, s, h, r: restriction.restrict_masks(m, s, kept, r, h))
    one_pass = jax.jit(  # one counting pass over every key: the unit the passes above cost
        lambda s: [reductions.count(masks.order_keys(s[m]) >= hints[m]) for m in names]
    )

    @jax.jit
    def lax_topk(scores):
        out = {}
        for m in names:
            s, k = scores[m], kept[m]
            _, idx = jax.lax.top_k(s.reshape(-1), k)
            out[m] = jnp.zeros(s.size, bool).at[idx].set(True).reshape(s.shape)
        return out

    rows = {
        'per-layer loop, top-k (rate 1, hint)': lambda: per_layer(prev, moved, hints, 1.0),
        'per-layer loop, SR 0.5 (hint)': lambda: per_layer(prev, moved, hints, 0.5),
        'topk_masks (hint)': lambda: topk(moved, hints),
        'restrict_masks, top-k (rate 1, hint)': lambda: restrict(prev, moved, hints, 1.0),
        'restrict_masks, SR 0.5 (hint)': lambda: restrict(prev, moved, hints, 0.5),
        'topk_masks, no hint (32 shared passes)': lambda: topk(moved, None),
        'one counting pass': lambda: one_pass(moved),
    }
    if with_lax:
        rows['lax.top_k + scatter'] = lambda: lax_topk(moved)
    out = {'prunable': n, 'layers': len(shapes)}
    for fn in rows.values():  # compile
        jax.block_until_ready(fn())
    times = {label: [] for label in rows}
    for _ in range(repeats):  # interleaved, so that machine noise hits each alike
        for label, fn in rows.items():
            times[label].append(benchlib.median_time(fn, 1))
    out.update({label: float(np.median(t)) for label, t in times.items()})
    same = True
    for rate in (1.0, 0.5):
        old, (new, thresholds) = per_layer(prev, moved, hints, rate), restrict(prev, moved, hints, rate)
        same &= all(
            bool(jnp.all(old[m][0] == new[m])) and int(old[m][1]) == int(thresholds[m])
            for m in names
        )
    new_topk, _ = topk(moved, hints)
    out['candidates_per_update'] = int(sum(int(jnp.sum(new_topk[m] & ~prev[m])) for m in names))
    out['layers_with_candidates'] = int(sum(bool(jnp.any(new_topk[m] & ~prev[m])) for m in names))
    out['identical_to_per_layer'] = same
    if with_lax:
        ref = lax_topk(moved)
        out['identical_to_lax_top_k'] = all(bool(jnp.all(ref[m] == new_topk[m])) for m in names)
    return out


# ------------------------------------------------------------------------------------ 3. memory
def memory_models(quick: bool):
    small = [
        ('BN-MLP 784-768-768-10', get_model('mlp', 10, hidden=(768, 768)), (28, 28, 1)),
        ('ResNet-32 (8/16/32)', get_model('resnet32_cifar', 10, widths=(8, 16, 32)), (14, 14, 1)),
        (
            'ResNet-32 (16/32/64), He et al.',
            get_model('resnet32_cifar', 10, widths=(16, 32, 64)),
            (32, 32, 3),
        ),
        (
            'ResNet-32 (32/64/128), authors',
            get_model('resnet32_cifar', 10, widths=(32, 64, 128)),
            (32, 32, 3),
        ),
        ('VGG-19 (CIFAR)', get_model('vgg19_cifar', 10), (32, 32, 3)),
    ]
    if quick:
        return small[:2]
    return small + [('ResNet-50', get_model('resnet50', 1000), (224, 224, 3))]


def nbytes(tree) -> int:
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def memory_row(label, model, shape):
    x = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    # Kernel detection traces the model (make_jaxpr) on concrete zeros: no compute, ~100 MB at most.
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), (variables, x))
    predicate = sparsity_lib.default_prunable(model_fn(model, *zeros), zeros[1])
    names = sparsity_lib.prunable_names(variables['params'], predicate)
    flat = sparsity_lib.flatten(variables['params'])
    kept = {n: max(1, int(np.prod(flat[n].shape)) // 10) for n in names}
    magnitude = {n: jax.ShapeDtypeStruct(flat[n].shape, jnp.bool_) for n in names}

    # the initial state is made on the host (NumPy): from zeros of the right shapes, which the OS
    # maps lazily (ResNet-50: about 300 MB touched)
    params, batch_stats, magnitude = jax.tree.map(
        lambda a: np.zeros(a.shape, a.dtype),
        (variables['params'], variables.get('batch_stats'), magnitude),
    )
    state = Search(None, params, batch_stats, names, kept, magnitude, SearchOptions(), 1000).init_state()
    params = nbytes(variables['params'])
    parts = {
        'scores': nbytes(state.scores),
        'mask': nbytes(state.mask),
        'masked_weights': nbytes(state.weights),
        'thresholds': nbytes(state.thresholds) + nbytes(state.previous),
        'optimizer': nbytes(state.opt_state),
        'batch_stats': nbytes(state.batch_stats),
        'step_rng': nbytes(state.step) + nbytes(state.rng),
    }
    total = sum(parts.values())
    prunable = sum(int(np.prod(flat[n].shape)) for n in names)
    return {
        'model': label,
        'params': sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables['params'])),
        'prunable': prunable,
        'params_bytes': params,
        'state_bytes': total,
        'state_over_params': total / params,
        **{f'{k}_bytes': v for k, v in parts.items()},
        'dense_training_extra_bytes': params + nbytes(variables.get('batch_stats', {})),
    }


# ----------------------------------------------------------------------------------------- main
def mib(b):
    return f'{b / 2**20:.2f}'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true')
    ap.add_argument(
        '--steps', type=int, default=None, help='timed steps per kind (default 30; quick 2)'
    )
    ap.add_argument(
        '--repeats', type=int, default=None, help='mask-update repeats (default 7; quick 1)'
    )
    ap.add_argument('--results-dir', default=None)
    ap.add_argument('--figures-dir', default=None)
    ap.add_argument('--parts', default='plain,api,breakdown,loop,step,mask,memory')
    ap.add_argument(
        '--with-pmap', action='store_true',
        help='plain part: also the search step pmapped over the one device (the old path)',
    )
    ap.add_argument('--rounds', type=int, default=None, help='api part: runs each (default 3; quick 1)')
    ap.add_argument(
        '--warm', type=int, default=None,
        help='plain and breakdown parts: untimed search steps first (default 50; quick 2)',
    )
    ap.add_argument(
        '--plain-models', default=None,
        help='plain part: only the models whose label starts so (e.g. resnet-50,shipped)',
    )
    args = ap.parse_args(argv)
    out = os.path.join(benchlib.HERE, 'out', 'speed_quick')
    results_dir = args.results_dir or (
        out if args.quick else os.path.join(benchlib.ROOT, 'docs', 'results')
    )
    figures_dir = args.figures_dir or (
        out if args.quick else os.path.join(benchlib.ROOT, 'docs', 'figures')
    )
    steps = args.steps or (2 if args.quick else 30)
    repeats = args.repeats or (1 if args.quick else 7)
    warm = args.warm if args.warm is not None else (2 if args.quick else 50)
    parts = args.parts.split(',')
    plt = benchlib.pyplot()
    os.makedirs(figures_dir, exist_ok=True)
    t_all = time.time()
    print(
        f'machine: {benchlib.machine()}; load average {benchlib.load_average()}; '
        f'ljax {benchlib.git_revision()}\n',
        flush=True,
    )

    if 'plain' in parts:
        chosen = args.plain_models.split(',') if args.plain_models else None
        rows = [
            plain_times(*m, steps, args.with_pmap, warm, min_seconds=0.0 if args.quick else 2.0)
            for m in plain_models(args.quick)
            if chosen is None or any(m[0].lower().startswith(c.lower()) for c in chosen)
        ]
        benchlib.write_csv(os.path.join(results_dir, 'speed_plain.csv'), rows)
        print(
            f'## Against the plain flax train step (median of {steps} interleaved steps or '
            '2 s, one '
            f'device, float32, 8 batches in turn, the search after {warm} steps; load average '
            f'after: {benchlib.load_average()})\n'
        )
        pm = args.with_pmap
        print(
            benchlib.markdown_table(
                ['model', 'batch', 'plain ms (donated)', 'plain ms (not donated)', 'ljax dense ms',
                 'ljax search ms', 'search flips / step']
                + (['search, pmap ms', 'pmap / plain'] if pm else [])
                + ['dense / plain', 'search / plain', 'targets (search, dense)'],
                [
                    [r['model'], r['batch'], f"{r['plain_ms']:.1f}", f"{r['plain_not_donated_ms']:.1f}",
                     f"{r['dense_ms']:.1f}", f"{r['search_ms']:.1f}",
                     f"{r['search_flips_per_step']:.0f}"]
                    + ([f"{r['search_pmap_ms']:.1f}", f"{r['search_pmap_over_plain']:.3f}"] if pm else [])
                    + [f"**{r['dense_over_plain']:.3f}**", f"**{r['search_over_plain']:.3f}**",
                       f"<= {r['target_search']}, <= {r['target_dense']}" if r['target_search'] else '']
                    for r in rows
                ],
            )
            + '\n',
            flush=True,
        )

    if 'api' in parts:
        rows = api_times(args.quick, args.rounds or (1 if args.quick else 3))
        benchlib.write_csv(os.path.join(results_dir, 'speed_api.csv'), rows)
        print(
            f"## Public API with compilation (median of {rows[0]['rounds']} alternated runs, "
            'caches cleared before each)\n'
        )
        print(
            benchlib.markdown_table(
                ['model', 'batch', 'steps', 'plain loop s', 'search_jackpot s', 'search_jackpot / plain', 'target'],
                [[r['model'], r['batch'], r['steps'], f"{r['plain_loop_s']:.2f}", f"{r['search_jackpot_s']:.2f}",
                  f"**{r['ratio']:.2f}**", f"<= {r['target']}" if r['target'] else ''] for r in rows],
            )
            + '\n',
            flush=True,
        )

    if 'breakdown' in parts:
        bandwidth = memory_bandwidth(1 << 22 if args.quick else 1 << 25)
        rows = [breakdown_times(*m, steps, bandwidth, warm) for m in breakdown_models(args.quick)]
        benchlib.write_csv(os.path.join(results_dir, 'speed_breakdown.csv'), rows)
        print(
            f"## One search step in parts (median of {steps} interleaved calls, on the state after "
            f"{warm} search steps; load average after: {benchlib.load_average()})\n"
        )
        labels = [k[: -len(' (ms)')] for k in rows[0] if k.endswith(' (ms)') and k != 'floor (ms)']
        print(
            benchlib.markdown_table(
                ['model, batch, prunable'] + labels
                + ['floor beyond dense', 'plain + floor / plain', 'search / plain'],
                [[f"{r['model']}, {r['batch']}, {r['prunable']:,}"]
                 + [f"{r[k + ' (ms)']:.1f}" for k in labels]
                 + [f"{r['floor (ms)']:.1f} ({r['bytes_beyond_dense'] / 1e6:.0f} MB at "
                    f"{r['bandwidth_GB_s']:.1f} GB/s)", f"{r['floor_search_over_plain']:.3f}",
                    f"{r['search_over_plain']:.3f}"] for r in rows],
            )
            + '\n',
            flush=True,
        )

    if 'loop' in parts:
        spe, epochs, rounds = (2, 2, 1) if args.quick else (8, 4, 2)
        rows = [
            loop_times(label, model, shape, batch, target, spe, epochs, rounds)
            for label, model, shape, batch, target in loop_models(args.quick)
        ]
        benchlib.write_csv(os.path.join(results_dir, 'speed_loop.csv'), rows)
        print('## Steady state through the loop: search step / dense step\n')
        print(
            benchlib.markdown_table(
                ['model', 'batch', 'devices', 'dense ms/step', 'search ms/step', 'search / dense',
                 'last-threshold hint / dense', 'floor ms/step', 'floor / dense', 'target'],
                [
                    [r['model'], r['batch'], r['devices'], f"{r['dense_ms_per_step']:.1f}",
                     f"{r['search_ms_per_step']:.1f}", f"{r['ratio']:.3f}",
                     f"{r['last_hint_ratio']:.3f}", f"{r['floor_ms_per_step']:.1f}",
                     f"{r['floor_ratio']:.3f}",
                     f"<= {r['target']}" if r['target'] else '']
                    for r in rows
                ],
            )
            + '\n',
            flush=True,
        )

    if 'step' in parts:
        rows = [
            step_times(label, model, shape, batch, steps)
            for label, model, shape, batch in step_models(args.quick)
        ]
        print(
            f'Step time (median of {steps} interleaved steps, one device; load average after: '
            f'{benchlib.load_average()}):\n'
        )
        print(
            benchlib.markdown_table(
                [
                    'model',
                    'batch',
                    'prunable',
                    'dense ms',
                    'search top-k ms',
                    'search / dense',
                    'search SR 0.5 ms',
                    'SR / dense',
                    'img/s dense',
                    'img/s search',
                ],
                [
                    [
                        r['model'],
                        r['batch'],
                        f'{r["prunable"]:,}',
                        f'{r["dense_ms"]:.1f}',
                        f'{r["search_topk_ms"]:.1f}',
                        f'{r["ratio_topk"]:.2f}',
                        f'{r["search_sr_ms"]:.1f}',
                        f'{r["ratio_sr"]:.2f}',
                        f'{r["images_per_s_dense"]:.0f}',
                        f'{r["images_per_s_search"]:.0f}',
                    ]
                    for r in rows
                ],
            ),
            flush=True,
        )
        benchlib.write_csv(os.path.join(results_dir, 'speed_step_time.csv'), rows)

    if 'mask' in parts:
        if args.quick:
            shapes = [(3, 3, 8, 16), (64, 64)]
            targets = [1000, 5248]
            depth = equal_layers(8192, [1, 4])
        else:
            shapes = resnet50_kernels()
            targets = [2_500_000, 10_000_000, 25_502_912]
            depth = equal_layers(4_194_304, [1, 8, 64])
        rows = [
            {'shapes': 'resnet50 prefix', **mask_update_times(p, repeats)}
            for p in prefixes(shapes, targets)
        ] + [{'shapes': 'equal layers', **mask_update_times(p, repeats)} for p in depth]
        info = (
            'shapes',
            'prunable',
            'layers',
            'candidates_per_update',
            'layers_with_candidates',
            'identical_to_per_layer',
            'identical_to_lax_top_k',
        )
        labels = [k for k in rows[0] if k not in info]
        print(
            f'\nMask update, all layers in one jit, 10% kept, warm-started (scores moved by N(0, 1e-3)'
            f' since the previous mask and hints); first L ResNet-50 kernels (call order), then '
            f'L equal layers of one total size (median of {repeats}; load average after: '
            f'{benchlib.load_average()}):\n'
        )
        print(
            benchlib.markdown_table(
                ['shapes', 'prunable weights', 'layers']
                + [f'{k} (ms)' for k in labels]
                + ['same as per-layer', 'same as lax.top_k'],
                [
                    [r['shapes'], f'{r["prunable"]:,}', r['layers']]
                    + [f'{1e3 * r[k]:.1f}' for k in labels]
                    + [r['identical_to_per_layer'], r.get('identical_to_lax_top_k', '')]
                    for r in rows
                ],
            ),
            flush=True,
        )
        benchlib.write_csv(
            os.path.join(results_dir, 'speed_mask_update.csv'),
            [
                {
                    **{k: v for k, v in r.items() if k not in labels},
                    **{f'{k} (s)': r[k] for k in labels},
                }
                for r in rows
            ],
        )
        prefix_rows = [r for r in rows if r['shapes'] == 'resnet50 prefix']
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        n = [r['prunable'] / 1e6 for r in prefix_rows]
        for k, mk in zip(labels, 'osd^v<>x'):
            ax.plot(n, [1e3 * r[k] for r in prefix_rows], mk + '-', ms=4, label=k)
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('prunable weights (millions; first L ResNet-50 kernels)')
        ax.set_ylabel('one mask update, all layers (ms)')
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize=6)
        ax.set_title('Mask-update time vs size (2-core CPU)', fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(figures_dir, 'speed_mask_update.png'), dpi=90)
        plt.close(fig)

    if 'memory' in parts:
        rows = [memory_row(*m) for m in memory_models(args.quick)]
        print('\nMemory: search state vs frozen params (90% sparsity; MiB):\n')
        print(
            benchlib.markdown_table(
                [
                    'model',
                    'params',
                    'prunable',
                    'params MiB',
                    'state MiB',
                    'state / params',
                    'scores',
                    'mask',
                    'masked weights',
                    'optimizer (momentum)',
                    'batch_stats',
                    'thresholds + step + rng (bytes)',
                ],
                [
                    [
                        r['model'],
                        f'{r["params"]:,}',
                        f'{r["prunable"]:,}',
                        mib(r['params_bytes']),
                        mib(r['state_bytes']),
                        f'{r["state_over_params"]:.2f}',
                        mib(r['scores_bytes']),
                        mib(r['mask_bytes']),
                        mib(r['masked_weights_bytes']),
                        mib(r['optimizer_bytes']),
                        mib(r['batch_stats_bytes']),
                        f'{r["thresholds_bytes"] + r["step_rng_bytes"]:,}',
                    ]
                    for r in rows
                ],
            ),
            flush=True,
        )
        benchlib.write_csv(os.path.join(results_dir, 'speed_memory.csv'), rows)
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        y = np.arange(len(rows))
        ax.barh(
            y + 0.2,
            [r['params_bytes'] / r['params_bytes'] for r in rows],
            0.4,
            color='gray',
            label='frozen params (= 1)',
        )
        left = np.zeros(len(rows))
        for part, color in (
            ('scores', 'tab:blue'),
            ('optimizer', 'tab:orange'),
            ('mask', 'tab:green'),
            ('masked_weights', 'tab:red'),
            ('batch_stats', 'tab:purple'),
        ):
            w = np.array([r[f'{part}_bytes'] / r['params_bytes'] for r in rows])
            ax.barh(y - 0.2, w, 0.4, left=left, color=color, label=f'state: {part}')
            left += w
        ax.set_yticks(y, [r['model'] for r in rows], fontsize=7)
        ax.set_xlabel('bytes relative to the params')
        ax.legend(fontsize=7, loc='lower right')
        ax.grid(alpha=0.3, axis='x')
        ax.set_title('Search state vs params', fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(figures_dir, 'speed_memory.png'), dpi=90)
        plt.close(fig)
    print(
        f'\ntotal {time.time() - t_all:.0f} s; CSV in {results_dir}, figures in {figures_dir}',
        flush=True,
    )


if __name__ == '__main__':
    main()
