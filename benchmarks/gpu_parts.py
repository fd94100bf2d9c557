"""Where the search step's extra time goes on a GPU, per model, and what the segmented selection's
chunking and unrolling buy (issue 10).

    python benchmarks/gpu_parts.py vgg19:32:256 resnet50:224:128     # model:image side:batch

For each case (synthetic data, float32, one device): the dense step and the search step, each
profiled (`gpu_profile.profile`: wall ms, GPU kernel ms and kernels per step, kernel time by source;
the first case only, later ones are timed); the search step with each variant of the segmented selection (`masks.Tuning.lines` lines of 64 keys
summed per chunk before the segment sum, the 32 passes unrolled or in a loop; masks compared with
the first variant's after the same steps); the search with the short restriction (cosine rate);
then the mask update alone per variant (`topk_masks`, and `restrict_masks` at rate 0.5) on the
searched scores. On a CPU (a smoke run) there are no kernels to count, only wall times.
"""
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_dump_to=/tmp/xla_dump --xla_dump_hlo_module_re=.*(fun|train_step).*')

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_profile import log, profile, step_ms, timeit

from ljax import masks, restriction
from ljax.models import get_model
from ljax.parallel import Parallel
from ljax.pretrain import DenseTraining
from ljax.search import Search, SearchOptions

STEPS = int(os.environ.get('STEPS', 20))
TOP = int(os.environ.get('TOP', 25))
# (lines per chunk, unrolled): the session-8 code was (1, False)
VARIANTS = [(1, False), (1, True), (64, False), (64, True)]


import ljax.search as search_mod

TUNING = masks.TUNING


class Tuned:
    """The search's masks / restriction module with this variant's tuning (a static argument)."""

    def __init__(self, mod):
        self.mod = mod

    def __getattr__(self, name):
        return getattr(self.mod, name)

    def topk_masks(self, *a, **k):
        return self.mod.topk_masks(*a, tuning=TUNING, **k)

    def restrict_masks(self, *a, **k):
        return self.mod.restrict_masks(*a, tuning=TUNING, **k)


def use(variant):
    global TUNING
    TUNING = masks.Tuning(lines=variant[0], unroll=variant[1])
    search_mod.masks, search_mod.restriction = Tuned(masks), Tuned(restriction)


def case(spec, full=True):
    """`full`: profile dense and search and time every variant's search step; otherwise time the
    dense step and the first and last variants' search steps, unprofiled."""
    name, side, batch = spec.split(':')
    side, batch = int(side), int(batch)
    model = get_model('vgg19_cifar' if name == 'vgg19' else name, 10 if name == 'vgg19' else 1000)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, side, side, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    variables = jax.device_get(model.init(jax.random.key(0), x[:1], train=False))
    log(f'== {spec}')

    dense = DenseTraining(model, lr=0.1, weight_decay=1e-4, total_steps=10**6, dtype='float32')
    par = Parallel(dense)
    xd, yd = par.put(x, y)
    state = par.replicate(dense.init_state(variables))
    if full:
        _, d = profile(f'{name}_dense', par, state, xd, yd, top=TOP)
    else:
        d, _ = step_ms(par, state, xd, yd, STEPS)
        log(f'{spec} dense {d:.2f} ms/step')

    def search(variant, restr='none', prof=False):
        use(variant)
        s = Search.create(model, variables, x[:1], sparsity=0.9, total_steps=10**6,
                          options=SearchOptions(dtype='float32', restriction=restr))
        p = Parallel(s)
        ms, state = step_ms(p, p.replicate(s.init_state()), xd, yd, STEPS)
        log(f'{spec} search (restriction {restr}), lines {variant[0]}, unrolled {variant[1]}: '
            f'{ms:.2f} ms/step = {ms / d:.3f} x dense {d:.2f}')
        host = jax.device_get(jax.tree.map(lambda a: a[0], state))  # after 3 + STEPS steps
        if prof:
            profile(f'{name}_search_{variant[0]}_{int(variant[1])}', p, state, xd, yd, top=TOP)
        return s, host

    states = {}
    for v in VARIANTS if full else (VARIANTS[0], VARIANTS[-1]):
        s, states[v] = search(v, prof=full and v in (VARIANTS[0], VARIANTS[-1]))
    first = states[VARIANTS[0]]
    for v in list(states)[1:]:
        same = all(np.array_equal(first.mask[n], states[v].mask[n]) for n in first.mask)
        log(f'masks of {v} identical to {VARIANTS[0]}: {same}')
    for v in (VARIANTS[0], VARIANTS[-1]):
        search(v, restr='cosine')

    names = list(first.scores)
    scores = {n: jnp.asarray(first.scores[n]) for n in names}
    old = {n: jnp.asarray(first.mask[n]) for n in names}
    kept = s.kept
    log(f'{len(names)} prunable layers, {sum(v.size for v in scores.values())} weights')
    for v in VARIANTS:
        use(v)
        topk = jax.jit(lambda sc: masks.topk_masks(sc, kept, selection='segmented', tuning=TUNING))
        restr = jax.jit(
            lambda m, sc: restriction.restrict_masks(
                m, sc, kept, 0.5, selection='segmented', tuning=TUNING
            )
        )
        log(f'lines {v[0]}, unrolled {v[1]}: topk_masks {timeit(topk, scores):.2f} ms, '
            f'restrict_masks rate 0.5 {timeit(restr, old, scores):.2f} ms')


def main():
    log(jax.devices(), jax.__version__)
    for i, spec in enumerate(sys.argv[1:] or ['vgg19:32:256', 'resnet50:224:128']):
        case(spec, full=i == 0)
    search_mod.masks, search_mod.restriction = masks, restriction
    log('done')


if __name__ == '__main__':
    main()
