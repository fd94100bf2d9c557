"""One ljax tree's step and mask-update times, for side-by-side runs of two trees (issue 10).

    git worktree add /tmp/old f3b89a6
    for t in /tmp/old $PWD /tmp/old $PWD; do python benchmarks/tree_ab.py $t; done
    python benchmarks/tree_ab.py /tmp/old --part mask; python benchmarks/tree_ab.py $PWD --part mask

The tree named first on the command line is imported (a checkout, e.g. a `git worktree`); run the
trees in alternating processes on an otherwise idle machine. `--part step` (default): the
ResNet-50 stand-in of `speed.py --parts loop` (32x32, batch 16, random labels, one device): 2
warm-up groups, then 4 groups of 8 dense and 8 search steps alternated, median ms per step of the
groups and their ratio. `--part mask`: `topk_masks` and `restrict_masks` (rate 0.5) with hints,
median of 7 calls, on the data of `speed.py --parts mask` (64 and 8 equal layers of 4.2M weights
in all, and ResNet-50's 54 kernels). Results: docs/RESULTS.md, Speed, section 1.
"""
import argparse
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
ap.add_argument('tree')
ap.add_argument('--part', choices=('step', 'mask'), default='step')
args = ap.parse_args()
sys.path.insert(0, args.tree)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ljax import masks, restriction  # noqa: E402
from ljax import sparsity as sparsity_lib  # noqa: E402
from ljax.models import get_model  # noqa: E402

import benchlib  # noqa: E402  (this checkout's benchmarks/, on the tree's ljax)


def step():
    from ljax.parallel import Parallel
    from ljax.pretrain import DenseTraining
    from ljax.search import Search, SearchOptions

    rng = np.random.default_rng(0)
    model = get_model('resnet50', 10)
    x = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    v = jax.device_get(model.init(jax.random.key(0), x[:1], train=False))
    dense = DenseTraining(model, lr=0.1, weight_decay=5e-4, total_steps=10**6)
    pd = Parallel(dense, jax.local_devices()[:1])
    sd = pd.replicate(dense.init_state(v))
    search = Search.create(model, v, x[:1], sparsity=0.9, total_steps=10**6, options=SearchOptions())
    ps = Parallel(search, jax.local_devices()[:1])
    ss = ps.replicate(search.init_state())
    xd, yd = ps.put(x, y)

    def group(p, s, n=8):
        t = time.perf_counter()
        for _ in range(n):
            s, m = p.train(s, xd, yd)
        jax.block_until_ready((s, m))
        return s, 1e3 * (time.perf_counter() - t) / n

    for _ in range(2):
        sd, _ = group(pd, sd, 2)
        ss, _ = group(ps, ss, 2)
    d, s = [], []
    for _ in range(4):
        sd, t = group(pd, sd)
        d.append(t)
        ss, t = group(ps, ss)
        s.append(t)
    print(f'{args.tree}: dense {np.median(d):.1f} ms, search {np.median(s):.1f} ms, ratio '
          f'{np.median(s) / np.median(d):.3f} (groups: {[round(a) for a in d]} {[round(a) for a in s]})')


def median_ms(f, *a, n=7):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def mask():
    model = get_model('resnet50', 1000)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    flat = sparsity_lib.flatten(v['params'])
    cases = {
        '64 equal layers': [(1024, 64)] * 64,
        '8 equal layers': [(8192, 64)] * 8,
        'resnet50 54 layers': [tuple(flat[f'{n}/kernel'].shape) for n in benchlib.called_layers(model, v, x)],
    }
    for label, shapes in cases.items():
        names = [f'l{i}' for i in range(len(shapes))]
        keys = jax.random.split(jax.random.key(0), len(shapes))
        scores = {m: jax.random.normal(k, s) for m, k, s in zip(names, keys, shapes)}
        kept = {m: max(1, int(np.prod(s)) // 10) for m, s in zip(names, shapes)}
        moved = {m: s + 1e-3 * jax.random.normal(jax.random.fold_in(k, 1), s.shape)
                 for (m, s), k in zip(scores.items(), keys)}
        prev, hints = masks.topk_masks(scores, kept)
        t1 = median_ms(masks.topk_masks, moved, kept, hints)
        t2 = median_ms(restriction.restrict_masks, prev, moved, kept, 0.5, hints)
        print(f'{args.tree} {label}: topk_masks {t1:.1f} ms, restrict_masks 0.5 {t2:.1f} ms', flush=True)


step() if args.part == 'step' else mask()
