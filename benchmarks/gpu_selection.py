"""The search step with each `masks.topk_masks` selection, side by side in one process (issue 10).

    python benchmarks/gpu_selection.py 128      # batch; SIZE=224 (image side), STEPS=20

ResNet-50, synthetic data, one device: the dense step, then the search step with the selection
forced to 'segmented', 'hinted' and 'segmented' again (ms per step over STEPS steps after 3
warm-up steps, and the ratio to dense), whether the masks agree after those steps, and then the
mask update alone per selection. Run on an NVIDIA H200: docs/RESULTS.md, Speed, section 5.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.getcwd())
import ljax.search as search_mod
from ljax import masks
from ljax.models import get_model
from ljax.parallel import Parallel
from ljax.pretrain import DenseTraining
from ljax.search import Search, SearchOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_profile import log, step_ms, timeit

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
S = int(os.environ.get('SIZE', 224))
STEPS = int(os.environ.get('STEPS', 20))


class Forced:
    def __init__(self, selection):
        self.selection = selection

    def __getattr__(self, a):
        return getattr(masks, a)

    def topk_masks(self, scores, kept, hints=None):
        return masks.topk_masks(scores, kept, hints, selection=self.selection)


def main():
    log(jax.devices(), jax.__version__, 'default selection', masks.default_selection())
    model = get_model('resnet50', 1000)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, S, S, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    variables = jax.device_get(model.init(jax.random.key(0), x[:1], train=False))
    dense = DenseTraining(model, lr=0.1, weight_decay=1e-4, total_steps=10**6, dtype='float32')
    par = Parallel(dense)
    xd, yd = par.put(x, y)
    d, _ = step_ms(par, par.replicate(dense.init_state(variables)), xd, yd, STEPS)
    log(f'dense {d:.2f} ms/step')
    states = {}
    for sel in ('segmented', 'hinted', 'segmented'):
        search_mod.masks = Forced(sel)
        search = Search.create(model, variables, x[:1], sparsity=0.9, total_steps=10**6,
                               options=SearchOptions(dtype='float32'))
        par = Parallel(search)
        ms, st = step_ms(par, par.replicate(search.init_state()), xd, yd, STEPS)
        states[sel] = jax.device_get(jax.tree.map(lambda a: a[0], st))
        log(f'search ({sel}) {ms:.2f} ms/step = {ms / d:.3f} x dense')
    search_mod.masks = masks
    a, b = states['segmented'], states['hinted']
    same = all(np.array_equal(a.mask[n], b.mask[n]) for n in a.mask)
    log(f'masks after {3 + STEPS} steps identical between selections: {same}')

    s = b
    names = list(s.scores)
    scores = {n: jnp.asarray(s.scores[n]) for n in names}
    hints = {n: masks.extrapolate(s.thresholds[n], s.previous[n]) for n in names}
    kept = {n: int(np.asarray(s.mask[n]).sum()) for n in names}

    base = masks.topk_masks.__wrapped__
    results = {}
    for sel in ('hinted', 'segmented'):
        f = jax.jit(functools.partial(base, selection=sel))
        g = lambda sc, h, f=f: f(sc, kept, h)
        ms, r = timeit(g, scores, hints), g(scores, hints)
        results[sel] = r
        log(f'topk_masks {sel}: {ms:.2f} ms')
    f = jax.jit(functools.partial(base, selection='hinted'))
    log(f'topk_masks hinted, no hints (per-layer 32 passes): {timeit(lambda sc: f(sc, kept), scores):.2f} ms')

    log('done')


main()
