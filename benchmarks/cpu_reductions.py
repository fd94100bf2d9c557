"""Whole-array reductions: `jnp` against `ljax.reductions`, side by side in one run (issue 10).

    python benchmarks/cpu_reductions.py            # 25,165,824 elements (ResNet-50's prunable size)
    python benchmarks/cpu_reductions.py --size 1000003

XLA:CPU rewrites a reduction over more than 32 elements into reduce-windows over a materialised
copy of its input; `ljax.reductions` reduces over rows of 32, then over the row results. Prints ms
per jitted call (mean of --calls after one warm-up) for the flip count, the finiteness check (the
rows trick, and the train steps' `tree_all_finite`: ljax's C++ kernel where it is built) and the
max of a `where`, the ratio, and whether the results agree. Results: docs/RESULTS.md, Speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib

from ljax import reductions


def ms_per_call(f, args, calls):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(calls):
        r = f(*args)
    jax.block_until_ready(r)
    return 1e3 * (time.perf_counter() - t) / calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--size', type=int, default=25_165_824)
    ap.add_argument('--calls', type=int, default=10)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.normal(size=args.size).astype(np.float32))
    a, b = g > 1, g > 1.01
    index = jnp.arange(args.size, dtype=jnp.int32)
    cases = [
        ('flip count: sum(a != b)', (a, b),
         lambda a, b: jnp.sum(a != b, dtype=jnp.int32), lambda a, b: reductions.count(a != b)),
        ('finite: all(isfinite(g))', (g,),
         lambda g: jnp.all(jnp.isfinite(g)), reductions.all_finite),
        ('finite: tree_all_finite (native kernel where built)', (g,),
         lambda g: jnp.all(jnp.isfinite(g)), reductions.tree_all_finite),
        ('max(where(a, index, -1))', (a, index),
         lambda a, i: jnp.max(jnp.where(a, i, -1)), lambda a, i: reductions.total(jnp.where(a, i, -1), jnp.max)),
    ]
    print(f'{benchlib.machine()}; {args.size} elements\n', flush=True)
    rows = []
    for label, xs, plain, ours in cases:
        plain, ours = jax.jit(plain), jax.jit(ours)
        t_plain, t_ours = ms_per_call(plain, xs, args.calls), ms_per_call(ours, xs, args.calls)
        same = bool(np.array_equal(np.asarray(plain(*xs)), np.asarray(ours(*xs))))
        rows.append([label, f'{t_plain:.2f}', f'{t_ours:.2f}', f'{t_plain / t_ours:.1f}', same])
        print(rows[-1], flush=True)
    print()
    print(benchlib.markdown_table(['reduction', 'jnp ms', 'ljax.reductions ms', 'speed-up', 'same result'], rows))
    return rows


if __name__ == '__main__':
    main()
