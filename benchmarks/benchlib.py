"""Shared pieces of the benchmark and study scripts: data, models, pretraining, timing, CSV.

Data: Fashion-MNIST read with `ljax.data.load_fashion_mnist_idx` and normalised exactly as
`ljax.data.get_dataset` does (mean / std of `ljax.data.MEAN_STD`), held in memory as float32, with
a train order that depends only on (seed, epoch): every row of the study sees the same batches in
the same order. `pool=2` averages 2x2 pixels (28x28 -> 14x14), the resolution the ResNet-32 runs at
on a 2-core CPU. `synthetic=True` gives a small learnable stand-in (no files), for smoke tests.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ljax import convert, masks, reductions, restriction
from ljax import data as ljax_data
from ljax.loop import Loop
from ljax.parallel import Parallel
from ljax.pretrain import DenseTraining

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ------------------------------------------------------------------------ layers in call order
def called_layers(model, variables, x) -> list[str]:
    """Paths ('block/Dense_0') of the flax.linen Dense/Conv modules in the order the model calls
    them: ResNet-50's layer shapes in order for the mask-update benchmarks (ljax itself finds
    kernels from the computation, `ljax.sparsity.find_kernels`)."""
    import flax.linen as nn

    types = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.ConvLocal)
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == '__call__' and isinstance(context.module, types):
            path = '/'.join(context.module.path)
            if path not in order:
                order.append(path)
        return next_fun(*args, **kwargs)

    def run(v, x):
        with nn.intercept_methods(record):
            return model.apply(v, x, train=False)

    jax.eval_shape(run, variables, x)
    return order


# ------------------------------------------------------------------------ per-layer restriction
@jax.jit
def restrict_mask_with_threshold(mask, scores, k, rate, hint=None):
    """One layer's short restriction as the search step computed it before
    `ljax.restriction.restrict_masks` batched every layer: (new mask, top-k threshold key). The
    per-layer comparator of `speed.py --parts mask`."""
    top, threshold = masks.topk_mask_with_threshold(scores, k, hint=hint)
    revive = top & ~mask
    prune = mask & ~top
    c = reductions.count(revive)
    r = restriction.num_swaps(rate, c)

    def restricted():
        come_in = masks.topk_mask(scores, r, valid=revive)
        stay = masks.topk_mask(scores, c - r, valid=prune)
        return (mask & ~(prune & ~stay)) | come_in

    return jax.lax.cond(r == c, lambda: top, restricted), threshold


# ----------------------------------------------------------------------------------------- data
class Data:
    """Fashion-MNIST (or a synthetic stand-in) as normalised float32 NHWC arrays in memory."""

    def __init__(
        self,
        *,
        pool: int = 1,
        train_examples: int | None = None,
        test_examples: int | None = None,
        synthetic: bool = False,
        seed: int = 0,
        synthetic_seed: int | None = None,
    ):
        """`seed` sets the train order; the synthetic data come from `synthetic_seed` (default
        `seed`)."""
        if synthetic:
            (xtr, ytr), (xte, yte) = _synthetic(
                train_examples or 512,
                test_examples or 256,
                seed if synthetic_seed is None else synthetic_seed,
            )
        else:
            # the directory ljax itself reads: $LJAX_FASHION_MNIST_DIR, else Debian's
            raw = ljax_data.load_fashion_mnist_idx(
                os.environ.get(ljax_data.FASHION_MNIST_ENV) or ljax_data.FASHION_MNIST_DIR
            )
            xtr, ytr = raw['train']
            xte, yte = raw['test']
            xtr, ytr = xtr[:train_examples], ytr[:train_examples]
            xte, yte = xte[:test_examples], yte[:test_examples]
        mean, std = (np.array(v, np.float32) * 255 for v in ljax_data.MEAN_STD['fashion_mnist'])
        self.x_train = _pool((xtr.astype(np.float32) - mean) / std, pool)
        self.y_train = np.asarray(ytr, np.int32)
        self.x_test = _pool((xte.astype(np.float32) - mean) / std, pool)
        self.y_test = np.asarray(yte, np.int32)
        self.seed = seed
        self.synthetic = synthetic

    @property
    def shape(self):
        return self.x_train.shape[1:]

    def steps_per_epoch(self, batch: int) -> int:
        return len(self.y_train) // batch

    def train_batches(self, epoch: int, batch: int):
        """(x, y) batches of one epoch; the order depends only on (seed, epoch); remainder dropped."""
        steps = self.steps_per_epoch(batch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.y_train))
        for i in range(steps):
            idx = np.sort(order[i * batch : (i + 1) * batch])
            yield self.x_train[idx], self.y_train[idx]

    def test_batches(self, batch: int) -> list:
        """(x, y, weight) batches covering the test split once; the last one padded with weight 0."""
        out = []
        n = len(self.y_test)
        for start in range(0, n, batch):
            x, y = self.x_test[start : start + batch], self.y_test[start : start + batch]
            w = np.ones(len(y), np.float32)
            pad = batch - len(y)
            if pad:
                x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
                y = np.concatenate([y, np.zeros(pad, y.dtype)])
                w = np.concatenate([w, np.zeros(pad, w.dtype)])
            out.append((x, y, w))
        return out


def _pool(x, pool):
    if pool == 1:
        return np.ascontiguousarray(x)
    n, h, w, c = x.shape
    return np.ascontiguousarray(x.reshape(n, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4)))


def _synthetic(n_train, n_test, seed):
    """Ten classes, each a fixed random 28x28 pattern plus noise, as uint8 images."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 255, size=(10, 28, 28, 1))

    def draw(n):
        y = rng.integers(0, 10, n)
        x = np.clip(0.5 * patterns[y] + rng.normal(64, 40, size=(n, 28, 28, 1)), 0, 255)
        return x.astype(np.uint8), y

    return draw(n_train), draw(n_test)


# ------------------------------------------------------------------------------------ pretraining
def pretrain(
    model,
    data: Data,
    *,
    epochs: int,
    batch: int,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    seed: int = 0,
    log=print,
) -> dict:
    """Dense training from scratch on the loop that `ljax.train.pretrain` runs
    (`ljax.pretrain.DenseTraining`: SGD nesterov 0.9, cosine lr, coupled weight decay), on one
    device; returns {'params', 'batch_stats'}."""
    steps = data.steps_per_epoch(batch)
    task = DenseTraining(model, lr=lr, weight_decay=weight_decay, total_steps=epochs * steps)
    variables = model.init(jax.random.key(seed), jnp.zeros((1,) + data.shape), train=False)
    par = Parallel(task, jax.local_devices()[:1])

    def on_epoch(epoch, state, row):
        log(f'  pretrain epoch {epoch}/{epochs}: loss {row["loss"]:.4f} ({row["seconds"]:.0f} s)')

    loop = Loop(par, epochs, steps, batch, on_epoch=on_epoch, progress=False, desc='pretrain')
    state, _ = loop.run(
        par.replicate(task.init_state(variables)), lambda epoch, _: data.train_batches(epoch, batch)
    )
    final = par.unreplicate(state)
    return {'params': final['params'], 'batch_stats': final['batch_stats']}


def evaluate(model, variables, batches) -> dict:
    """Test accuracy and mean loss of `variables` (eval mode, running statistics) on one device."""

    @jax.jit
    def sums(variables, x, y, w):
        logits = model.apply(variables, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum((jnp.argmax(logits, -1) == y) * w), jnp.sum(loss * w), jnp.sum(w)

    c = l = n = 0.0
    for x, y, w in batches:
        a, b, d = sums(variables, x, y, w)
        c, l, n = c + float(a), l + float(b), n + float(d)
    return {'accuracy': c / n, 'loss': l / n}


def load_or_pretrain(path: str, model, data: Data, *, log=print, **kwargs) -> tuple[dict, float]:
    """Variables cached at `path` (.npz), pretraining them first if absent; (variables, seconds spent)."""
    if os.path.exists(path):
        return convert.load_variables_npz(path), 0.0
    log(f'pretraining {path} ...')
    t0 = time.time()
    variables = pretrain(model, data, log=log, **kwargs)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    convert.save_variables_npz(variables, path)
    return variables, time.time() - t0


# ---------------------------------------------------------------------------------------- helpers
def machine() -> str:
    """One line: CPU model, cores, memory, jax version and backend."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
    except (ValueError, OSError):
        mem = float('nan')
    dev = jax.devices()[0]
    return (
        f'{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; jax {jax.__version__} on '
        f'{dev.platform} ({len(jax.devices())} device(s))'
    )


def load_average() -> str:
    try:
        return ' '.join(f'{v:.2f}' for v in os.getloadavg())
    except OSError:
        return 'n/a'


def git_revision() -> str:
    try:
        return subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def merge_csv(path: str, rows: list[dict], models, key=('model',)) -> None:
    """`write_csv`, keeping the rows already in `path` whose `key` fields (as text) are not among
    `models` (values, or tuples of them for a key of several fields): a run on some models
    replaces their rows and leaves every other row as it was."""
    def of(r):
        return tuple(str(r.get(k)) for k in key)

    done = {of(dict(zip(key, m if isinstance(m, tuple) else (m,)))) for m in models}
    kept = []
    if os.path.exists(path):
        with open(path, newline='') as f:
            kept = [r for r in csv.DictReader(f) if of(r) not in done]
    write_csv(path, kept + list(rows))


def write_json(path: str, payload) -> None:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
    return '\n'.join(lines)


def pyplot():
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------- the plain flax train step
def plain_train_step(state, x, y, dtype=None):
    """The step users write themselves, as flax's examples write it: a `TrainState` with
    `batch_stats`, BatchNorm in training mode (`mutable=['batch_stats']`), cross-entropy, one
    `apply_gradients`. The yardstick of the speed benchmarks (jit it). dtype (e.g. 'bfloat16'):
    the forward and backward in it (params and x cast inside, logits back to float32), as ljax's
    `dtype` option does; None: as they are."""

    def loss_fn(params):
        inputs = x
        if dtype is not None:
            params = jax.tree.map(lambda p: p.astype(dtype), params)
            inputs = x.astype(dtype)
        logits, updates = state.apply_fn(
            {'params': params, 'batch_stats': state.batch_stats},
            inputs,
            train=True,
            mutable=['batch_stats'],
        )
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    state = state.replace(batch_stats=updates['batch_stats'])
    metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == y)}
    return state, metrics


def plain_train_state(model, variables, lr: float = 0.1, momentum: float = 0.9):
    """`TrainState` (with batch_stats) of `model` for `plain_train_step`: `optax.sgd(lr, momentum)`."""
    from flax.training import train_state

    class TrainState(train_state.TrainState):
        batch_stats: dict

    return TrainState.create(
        apply_fn=model.apply,
        params=variables['params'],
        tx=optax.sgd(lr, momentum),
        batch_stats=variables.get('batch_stats', {}),
    )


class PlainStep:
    """`jax.jit(plain_train_step)` on `devices` (default: every local device): the state
    replicated and the batch split across them by sharding (jit's data parallelism), which on one
    device is the plain jitted step. donate: the state donated to the step (updated in place, as
    ljax's steps are) or not (flax's examples' bare `jax.jit(train_step)`)."""

    def __init__(
        self, model, variables, devices=None, lr: float = 0.1, momentum: float = 0.9, donate=True,
        dtype=None,
    ):
        devices = list(devices) if devices is not None else jax.local_devices()
        mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
        self.replicated = jax.NamedSharding(mesh, jax.P())
        self.split = jax.NamedSharding(mesh, jax.P('batch'))
        self.state = jax.device_put(
            plain_train_state(model, variables, lr, momentum), self.replicated
        )
        self.step = jax.jit(
            plain_train_step if dtype in (None, 'float32') else
            functools.partial(plain_train_step, dtype=jnp.dtype(dtype)),
            donate_argnums=(0,) if donate else (),
            out_shardings=(self.replicated, self.replicated),
        )

    def put(self, x, y):
        return jax.device_put(x, self.split), jax.device_put(y, self.split)

    def __call__(self, x, y):
        """One step on (x, y) (placed by `put`); returns the metrics."""
        self.state, metrics = self.step(self.state, x, y)
        return metrics


def interleaved(fns: dict, steps: int, warmup: int = 2) -> dict:
    """{name: median seconds of one call} of argument-less callables (each returning what to wait
    on), after `warmup` calls each (compilation), called in turn `steps` times, so that machine
    noise hits each alike."""
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(t) for k, t in times.items()}
