"""Where a step's convolution time goes, per layer shape and direction: XLA, im2col, oneDNN, torch.

    python benchmarks/conv_profile.py          # every shipped model at issue 11's batch sizes
    python benchmarks/conv_profile.py --models resnet32 --rounds 3

For every distinct convolution of a model (found by running the model under
`flax.linen.intercept_methods`, so the shapes are the model's own), times three directions,
each a separate jitted function on one CPU device: forward (y = conv(x, w)), input gradient
(dL/dx from dL/dy) and weight gradient (dL/dw from dL/dy), with
  xla    - `lax.conv_general_dilated`, what `nn.Conv` runs,
  im2col - `ljax.models.layers.im2col_conv` (strided slices + one matmul; gradients by autodiff),
  onednn - `ljax.models.onednn.conv` (oneDNN's kernels through XLA's FFI; left out when
           `onednn.available()` is False),
  torch  - `torch.nn.functional.conv2d` and `aten.convolution_backward` (NCHW, float32), the kernels
           that PyTorch's autograd calls, with --torch-threads threads (default 2).
Rounds are interleaved (every layer and method once per round) and the median is reported.
Prints a per-layer table (ms, summed over the layers of that shape) and a per-model summary.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib

from ljax.models import get_model
from ljax.models import layers
from ljax.models import onednn

# (label, model name, kwargs, input HxW, batches)
MODELS = {
    'vgg19': ('VGG-19 CIFAR', 'vgg19_cifar', {}, 32, (64, 128)),
    'resnet32': ('ResNet-32 32/64/128', 'resnet32_cifar', {'widths': (32, 64, 128)}, 32, (64, 128)),
    'resnet32n': ('ResNet-32 16/32/64', 'resnet32_cifar', {'widths': (16, 32, 64)}, 32, (64, 128)),
    'resnet50': ('ResNet-50 224x224', 'resnet50', {}, 224, (8,)),
}
DN = ('NHWC', 'HWIO', 'NHWC')


def conv_shapes(name, kwargs, hw):
    """Counter of (H, W, Cin, kernel, Cout, stride, padding) over the model's convolutions."""
    model = get_model(name, 10 if 'cifar' in name else 1000, **kwargs)
    seen = collections.Counter()

    def record(next_fun, args, kw, context):
        mod = context.module
        if isinstance(mod, nn.Conv) and context.method_name == '__call__':
            x = args[0]
            pad = mod.padding
            if not isinstance(pad, str):
                pad = tuple(tuple(p) for p in pad)
            strides = mod.strides or 1
            stride = strides if isinstance(strides, int) else strides[0]
            seen[(x.shape[1], x.shape[2], x.shape[3], mod.kernel_size[0], mod.features,
                  stride, pad)] += 1
        return next_fun(*args, **kw)

    x = jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return seen


def jax_fns(conv):
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return fwd, dx, dw


def make_cases(batch, shape, torch):
    h, w_, cin, k, cout, s, pad = shape
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, h, w_, cin)).astype(np.float32)
    w = (rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    conv_x = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=DN)
    conv_i = lambda x, w: layers.im2col_conv(x, w, (s, s), pad, dimension_numbers=DN)
    y_shape = jax.eval_shape(conv_x, x, w).shape
    g = rng.normal(size=y_shape).astype(np.float32)
    xj, wj, gj = jax.device_put((x, w, g))
    cases = {}
    convs = [('xla', conv_x), ('im2col', conv_i)]
    if onednn.available():
        pads = lax.padtype_to_pads((h, w_), (k, k), (s, s), pad) if isinstance(pad, str) else pad
        convs.append(('onednn', lambda x, w: onednn.conv(x, w, (s, s), pads)))
    for method, conv in convs:
        fwd, dx, dw = jax_fns(conv)
        cases[(method, 'fwd')] = lambda f=fwd: f(xj, wj)
        cases[(method, 'dx')] = lambda f=dx: f(xj, wj, gj)
        cases[(method, 'dw')] = lambda f=dw: f(xj, wj, gj)
    if torch is not None:
        pads = lax.padtype_to_pads((h, w_), (k, k), (s, s), pad) if isinstance(pad, str) else pad
        (pt, pb), (pl, pr) = pads
        assert pt == pb and pl == pr, 'torch pads symmetrically'
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
        conv = torch.nn.functional.conv2d
        back = torch.ops.aten.convolution_backward
        args = ([s, s], [pt, pl], [1, 1], False, [0, 0], 1)
        cases[('torch', 'fwd')] = lambda: conv(xt, wt, None, s, (pt, pl))
        cases[('torch', 'dx')] = lambda: back(gt, xt, wt, None, *args, [True, False, False])[0]
        cases[('torch', 'dw')] = lambda: back(gt, xt, wt, None, *args, [False, True, False])[1]
    return cases


def timed(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--models', nargs='*', default=list(MODELS), choices=list(MODELS))
    ap.add_argument('--batches', nargs='*', type=int, help='override every model\'s batch sizes')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--torch-threads', type=int, default=2)
    ap.add_argument('--no-torch', action='store_true')
    args = ap.parse_args()
    torch = None
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.torch_threads)
    print(f'{benchlib.machine()}; torch threads {args.torch_threads}; '
          f'load {benchlib.load_average()}; '
          f'median of {args.rounds} interleaved rounds; git {benchlib.git_revision()}')
    methods = ('xla', 'im2col') + (('onednn',) if onednn.available() else ())
    methods += ('torch',) if torch else ()
    for key in args.models:
        label, name, kwargs, hw, batches = MODELS[key]
        shapes = conv_shapes(name, kwargs, hw)
        for batch in args.batches or batches:
            cases = {shape: make_cases(batch, shape, torch) for shape in shapes}
            for c in cases.values():  # compile and warm up
                for fn in c.values():
                    timed(fn)
            times = {(shape, k): [] for shape, c in cases.items() for k in c}
            for _ in range(args.rounds):
                for shape, c in cases.items():
                    for k, fn in c.items():
                        times[(shape, k)].append(timed(fn))
            med = {key_: 1e3 * statistics.median(v) for key_, v in times.items()}
            print(f'\n### {label}, batch {batch} (ms per step: summed over the layers of a shape)')
            header = ['HxW', 'Cin->Cout', 'k/s', 'n']
            header += [f'{m} {d}' for d in ('fwd', 'dx', 'dw') for m in methods]
            rows = []
            total = collections.Counter()
            for shape in shapes:
                h, w_, cin, k, cout, s, _ = shape
                n = shapes[shape]
                row = [f'{h}x{w_}', f'{cin}->{cout}', f'{k}/{s}', n]
                for d in ('fwd', 'dx', 'dw'):
                    for m in methods:
                        t = n * med[(shape, (m, d))]
                        total[(m, d)] += t
                        row.append(f'{t:.1f}')
                rows.append(row)
            rows.append(['total', '', '', sum(shapes.values())]
                        + [f'{total[(m, d)]:.0f}' for d in ('fwd', 'dx', 'dw') for m in methods])
            print(benchlib.markdown_table(header, rows))
            summary = {m: sum(total[(m, d)] for d in ('fwd', 'dx', 'dw')) for m in methods}
            print('fwd+dx+dw total ms: ' + ', '.join(f'{m} {t:.0f}' for m, t in summary.items()))
            sys.stdout.flush()


if __name__ == '__main__':
    main()
