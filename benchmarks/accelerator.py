"""Dense and search step time on whatever accelerator is present (GPU, TPU; CPU for a smoke run).

    python benchmarks/accelerator.py            # ResNet-50 224x224 batch 128/256 f32/bf16, VGG-19 32x32 batch 256
    python benchmarks/accelerator.py --quick    # tiny shapes, seconds on a CPU (the tests run it)
    python benchmarks/accelerator.py --cases resnet50:256:bfloat16 vgg19:256:float32   # some rows
    python benchmarks/accelerator.py --guard cond   # ljax's steps with CPU's non-finite guard

Synthetic data, every local device (pmap over several, one jitted program on one; the global batch
is split across them). Each row times `--steps` steps dispatched back to back with one wait at the
end (the steady state of the loop, which reads metrics only once per log interval), after
`--warmup` steps that include compilation: the yardstick, the plain flax train step users write
themselves (`benchlib.PlainStep`: TrainState, `jax.jit(train_step)`, `optax.sgd(0.1, 0.9)`,
train-mode BN, the batch split across the devices by sharding), the dense training step (`ljax.pretrain.DenseTraining`: every weight trained, SGD momentum) and the
jackpot search step (`ljax.search.Search.train_step`: STE forward, SGD on the scores, exact top-k
mask update of every prunable layer), both at 90% sparsity. Prints a markdown table and writes
CSV to --out (default benchmarks/out/accelerator.csv) after every row, with the seconds of the
warm-up steps (compilation included). Measured on an NVIDIA H200: docs/RESULTS.md, Speed, section 5.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib

from ljax import loop
from ljax.models import get_model
from ljax.parallel import Parallel
from ljax.pretrain import DenseTraining
from ljax.search import Search, SearchOptions


def cases(quick: bool) -> dict:
    """{'name:batch:dtype': (label, model, input shape, global batch, dtype)}."""
    if quick:
        mlp = get_model('mlp', 10, hidden=(32, 32))
        rows = [('mlp', 'BN-MLP 784-32-32-10', mlp, (28, 28, 1), 8, d) for d in ('float32', 'bfloat16')]
    else:
        resnet50 = get_model('resnet50', 1000)
        rows = [
            ('resnet50', 'ResNet-50, 224x224', resnet50, (224, 224, 3), batch, dtype)
            for batch in (128, 256)
            for dtype in ('float32', 'bfloat16')
        ] + [('vgg19', 'VGG-19, 32x32', get_model('vgg19_cifar', 10), (32, 32, 3), 256, 'float32')]
    return {f'{name}:{batch}:{dtype}': (label, model, shape, batch, dtype)
            for name, label, model, shape, batch, dtype in rows}


def throughput(par, state, x, y, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per step, `steps` steps dispatched back to back with one wait at the end;
    seconds of the warm-up steps, compilation included)."""
    x, y = par.put(x, y)
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = par.train(state, x, y)
    jax.block_until_ready(metrics)
    t1 = time.perf_counter()
    for _ in range(steps):
        state, metrics = par.train(state, x, y)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - t1) / steps, t1 - t0


def plain_throughput(model, variables, x, y, dtype, steps: int, warmup: int) -> tuple[float, float]:
    """`throughput` of the plain flax train step (`benchlib.PlainStep`: TrainState, `jax.jit`,
    `optax.sgd(0.1, 0.9)`, train-mode BN, forward and backward in `dtype`), the state replicated
    and the batch split across the local devices by sharding (one device: the plain jitted step)."""
    plain = benchlib.PlainStep(model, variables, dtype=dtype)
    x, y = plain.put(x, y)
    t0 = time.perf_counter()
    for _ in range(warmup):
        metrics = plain(x, y)
    jax.block_until_ready(metrics)
    t1 = time.perf_counter()
    for _ in range(steps):
        metrics = plain(x, y)
    jax.block_until_ready((plain.state, metrics))
    return (time.perf_counter() - t1) / steps, t1 - t0


def row(label, model, shape, batch, dtype, steps, warmup) -> dict:
    rng = np.random.default_rng(0)
    local = batch // jax.process_count()
    x = rng.normal(size=(local,) + shape).astype(np.float32)
    y = rng.integers(0, 10, local).astype(np.int32)
    variables = jax.device_get(model.init(jax.random.key(0), x[:1], train=False))
    if jax.process_count() == 1:
        plain_s, plain_warmup = plain_throughput(model, variables, x, y, dtype, steps, warmup)
    else:  # the plain step's global batch would need assembling across processes: not timed
        plain_s = plain_warmup = float('nan')
    dense = DenseTraining(model, lr=0.1, weight_decay=1e-4, total_steps=10**6, dtype=dtype)
    par = Parallel(dense)
    dense_s, dense_warmup = throughput(par, par.replicate(dense.init_state(variables)), x, y, steps, warmup)
    search = Search.create(
        model, variables, x[:1], sparsity=0.9, total_steps=10**6, options=SearchOptions(dtype=dtype)
    )
    par = Parallel(search)
    search_s, search_warmup = throughput(par, par.replicate(search.init_state()), x, y, steps, warmup)
    return {
        'model': label,
        'batch': batch,
        'dtype': dtype,
        'devices': jax.device_count(),
        'plain_ms': 1e3 * plain_s,
        'dense_ms': 1e3 * dense_s,
        'search_ms': 1e3 * search_s,
        'plain_img_s': batch / plain_s,
        'dense_img_s': batch / dense_s,
        'search_img_s': batch / search_s,
        'search_over_dense': search_s / dense_s,
        'dense_over_plain': dense_s / plain_s,
        'search_over_plain': search_s / plain_s,
        'plain_warmup_s': plain_warmup,
        'dense_warmup_s': dense_warmup,
        'search_warmup_s': search_warmup,
        'guard': loop.default_guard(),
        'matmul_precision': str(jax.config.jax_default_matmul_precision or 'default'),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--steps', type=int, default=None, help='timed steps (default 20; quick 2)')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--cases', nargs='+', default=None,
                    help='only these rows, as name:batch:dtype (e.g. vgg19:256:float32); default all')
    ap.add_argument('--guard', choices=loop.GUARDS, default=None,
                    help="the non-finite guard of ljax's steps (default: the backend's, "
                         "`ljax.loop.default_guard()`)")
    ap.add_argument('--out', default=os.path.join(benchlib.HERE, 'out', 'accelerator.csv'))
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.quick else 20)
    unknown = sorted(set(args.cases or ()) - set(cases(args.quick)))
    if unknown:
        ap.error(f'unknown --cases {", ".join(unknown)}; choose from {", ".join(cases(args.quick))}')
    default_guard = loop.default_guard
    if args.guard:
        loop.default_guard = lambda: args.guard  # read by `loop.update_if_finite` at trace time
    try:
        return run(args, steps)
    finally:
        loop.default_guard = default_guard


def run(args, steps: int) -> list:
    device = jax.devices()[0]
    print(f'{jax.device_count()} x {device.device_kind} ({device.platform}); {benchlib.machine()}; '
          f'guard {loop.default_guard()}\n', flush=True)
    rows = []
    table = cases(args.quick)
    for key, case in table.items():
        if args.cases and key not in args.cases:
            continue
        rows.append(row(*case, steps, args.warmup))
        r = rows[-1]
        print(f"{r['model']} batch {r['batch']} {r['dtype']}: plain {r['plain_ms']:.1f} ms, "
              f"dense {r['dense_ms']:.1f} ms, search {r['search_ms']:.1f} ms (warm-up with "
              f"compilation {r['plain_warmup_s']:.0f} s, {r['dense_warmup_s']:.0f} s, "
              f"{r['search_warmup_s']:.0f} s)", flush=True)
        # after every row, so a run stopped at a time limit keeps what it measured
        os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
        benchlib.write_csv(args.out, rows)
    print()
    print(benchlib.markdown_table(
        ['model', 'batch', 'dtype', 'devices', 'plain ms', 'dense ms', 'search ms', 'plain img/s',
         'dense img/s', 'search img/s', 'dense / plain', 'search / plain', 'search / dense'],
        [[r['model'], r['batch'], r['dtype'], r['devices'], f"{r['plain_ms']:.1f}", f"{r['dense_ms']:.1f}",
          f"{r['search_ms']:.1f}", f"{r['plain_img_s']:.0f}", f"{r['dense_img_s']:.0f}",
          f"{r['search_img_s']:.0f}", f"{r['dense_over_plain']:.3f}", f"{r['search_over_plain']:.3f}",
          f"{r['search_over_dense']:.3f}"] for r in rows],
    ))
    return rows


if __name__ == '__main__':
    main()
