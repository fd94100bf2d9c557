"""Where the search step's time goes on a GPU, against the dense step (issue 10).

    python benchmarks/gpu_profile.py 128        # batch; SIZE=224 (image side) by default

ResNet-50, synthetic data, one device. For the search step (the backend's selection), the dense
step: wall ms per step over 10 steps, then a `jax.profiler` trace of 3 steps, read back with `jax.profiler.ProfileData`: GPU
kernel time and kernels per step, and the kernel time grouped by the HLO op's source path (from
XLA's optimized-HLO dump). Then the mask update alone (`masks.topk_masks`, the backend's selection and
the hinted one) on the searched scores. Traces (gzipped, when under 20 MB) and the HLO go to $OUT (default /tmp/out).
Run on an NVIDIA H200: docs/RESULTS.md, Speed, section 5. On a CPU there are no GPU kernels to
count, only the wall times.
"""
import collections
import glob
import os
import re
import sys
import time

os.environ.setdefault('XLA_FLAGS', '--xla_dump_to=/tmp/xla_dump --xla_dump_hlo_module_re=.*(jit_one|pmap|train_step).*')

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.getcwd())
from ljax import masks, selection
from ljax.models import get_model
from ljax.parallel import Parallel
from ljax.pretrain import DenseTraining
from ljax.search import Search, SearchOptions
from jax.profiler import ProfileData

OUT = os.environ.get('OUT', '/tmp/out')
os.makedirs(OUT, exist_ok=True)
T0 = time.time()


def log(*a):
    print(f'[{time.time() - T0:6.1f}s]', *a, flush=True)


def hlo_map(compiled_text):
    """instruction name -> op_name metadata."""
    out = {}
    for m in re.finditer(r'%?([\w.\-]+) = [^\n]*?metadata=\{[^}]*op_name="([^"]*)"', compiled_text):
        out[m.group(1)] = m.group(2)
    return out


def label(op_name):
    parts = op_name.split('/')
    # drop pmap/jit wrappers and transforms at the front, keep the path inside
    keep = [p for p in parts if not p.startswith(('pmap(', 'jvp(', 'transpose(', 'pjit'))]
    return '/'.join(keep[:4]) + ' :: ' + parts[-1] if keep else op_name


def timeit(f, *a, n=20):
    """ms per call of `f(*a)`, `n` calls dispatched back to back after one warm-up call."""
    r = f(*a)
    jax.block_until_ready(r)
    t = time.perf_counter()
    for _ in range(n):
        r = f(*a)
    jax.block_until_ready(r)
    return 1e3 * (time.perf_counter() - t) / n


def step_ms(par, state, x, y, steps=20, warmup=3):
    """(ms per training step of `par` over `steps` steps dispatched back to back after `warmup`
    steps, the state after them)."""
    for _ in range(warmup):
        state, m = par.train(state, x, y)
    jax.block_until_ready((state, m))
    t = time.perf_counter()
    for _ in range(steps):
        state, m = par.train(state, x, y)
    jax.block_until_ready((state, m))
    return 1e3 * (time.perf_counter() - t) / steps, state


def profile(name, par, state, x, y, steps=3, top=45):
    """Wall time of 10 steps, then a trace of `steps` steps: kernel time and count per step and
    the `top` source groups by kernel time. Returns (state, wall ms per step)."""
    since = time.time()  # the step compiles in the warm-up: its HLO is the largest dump after this
    wall, state = step_ms(par, state, x, y, steps=10, warmup=2)
    wall /= 1e3
    d = f'/tmp/trace_{name}'
    jax.profiler.start_trace(d)
    for _ in range(steps):
        state, m = par.train(state, x, y)
    jax.block_until_ready((state, m))
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f'{d}/**/*.xplane.pb', recursive=True))[-1]
    if os.path.getsize(path) < 20e6:
        os.system(f'gzip -c {path} > {OUT}/{name}.xplane.pb.gz')
    # HLO names -> source op names, from XLA's dump of the step just compiled (XLA_FLAGS: the
    # one-device step is jitted as `one`)
    dumps = sorted([f for f in glob.glob('/tmp/xla_dump/*after_optimizations.txt')
                    if os.path.getmtime(f) >= since], key=os.path.getsize)
    text = open(dumps[-1]).read() if dumps else ''
    log(f'HLO from {dumps[-1] if dumps else None}')
    os.system(f'gzip -c {dumps[-1]} > {OUT}/{name}.hlo.txt.gz' if dumps else 'true')
    names = hlo_map(text)
    pd = ProfileData.from_file(path)
    kernels, total, groups, ngroups = 0, 0.0, collections.Counter(), collections.Counter()
    to_host = 0  # device-to-host copies: each one a point where the device waits for the host
    streams = {}
    for plane in pd.planes:
        if not plane.name.startswith('/device:GPU'):
            continue
        for line in plane.lines:
            if 'stream' not in line.name.lower():
                continue
            for ev in line.events:
                st = dict(ev.stats)
                op = st.get('hlo_op', ev.name)
                to_host += 'MemcpyD2H' in ev.name
                kernels += 1
                total += ev.duration_ns
                g = label(names.get(op, str(st.get('tf_op', op))))
                groups[g] += ev.duration_ns
                ngroups[g] += 1
                streams[line.name] = streams.get(line.name, 0) + ev.duration_ns
    log(f'{name}: wall {1e3 * wall:.2f} ms/step; GPU kernel time {total / steps / 1e6:.2f} ms/step '
        f'in {kernels / steps:.0f} kernels/step, {to_host / steps:.0f} device-to-host copies/step; streams {[(k, round(v / steps / 1e6, 2)) for k, v in streams.items()]}')
    for g, ns in groups.most_common(top):
        print(f'   {ns / steps / 1e3:9.1f} us  x{ngroups[g] / steps:6.1f}  {g}')
    return state, 1e3 * wall


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    S = int(os.environ.get('SIZE', 224))
    shape = (S, S, 3)
    log(jax.devices(), jax.__version__)
    model = get_model('resnet50', 1000)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    variables = jax.device_get(model.init(jax.random.key(0), x[:1], train=False))
    search = Search.create(model, variables, x[:1], sparsity=0.9, total_steps=10**6,
                           options=SearchOptions(dtype='float32'))
    par = Parallel(search)
    xd, yd = par.put(x, y)
    state, _ = profile('search', par, par.replicate(search.init_state()), xd, yd)
    dense = DenseTraining(model, lr=0.1, weight_decay=1e-4, total_steps=10**6, dtype='float32')
    pard = Parallel(dense)
    profile('dense', pard, pard.replicate(dense.init_state(variables)), xd, yd)

    # the mask update alone, on the searched scores (drifted a few steps)
    s = par.unreplicate(state)
    scores = {n: jnp.asarray(s.scores[n]) for n in search.names}
    hints = {n: masks.extrapolate(s.thresholds[n], s.previous[n]) for n in search.names}
    kept = search.kept

    log(f'{len(scores)} prunable layers, {sum(v.size for v in scores.values())} weights')
    log(f'topk_masks, backend default ({masks.default_selection()}): '
        f'{timeit(masks.topk_masks, scores, kept, hints):.2f} ms')
    log(f'topk_masks hinted: {timeit(lambda a, b, c: masks.topk_masks(a, b, c, selection="hinted"), scores, kept, hints):.2f} ms')
    log('done')


if __name__ == '__main__':
    main()
