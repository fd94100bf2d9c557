"""ljax's search step against the authors' released PyTorch search step, side by side on this CPU.

    git clone https://github.com/zyxxmu/lottery-jackpots /tmp/lottery-jackpots   # commit 1b802ea
    python benchmarks/cpu_vs_torch.py [--authors /tmp/lottery-jackpots] [--rounds 5]
        [--cases vgg19:64 vgg19:128 resnet32:64 resnet32:128 resnet50:8] [--torch-threads 2]

ljax ships none of the authors' code: this script imports it from --authors (their models,
`PretrainConv` with its `set_prune_rate` / `final_pop_up`, `freeze_model_weights`) and exits 2
with one line when that path does not hold it.

Four steps per case, on the same random batch (90% sparsity, 10 or 1000 classes):
  authors search - their search iteration as in cifar.py / imagenet.py: zero_grad, forward,
                   cross-entropy, backward, SGD (momentum 0.9, weight decay 5e-4) on the scores,
                   then `final_pop_up(1)` on every PretrainConv (what `adjust_rate` gives);
                   per-layer prune rates from one global magnitude threshold (their `l1`);
  torch dense    - the same model with plain nn.Conv2d, all weights trained by the same SGD;
  ljax search    - `ljax_search_step` below (the public API: Search, Parallel.train);
  ljax dense     - a jitted SGD step on every weight, train-mode BatchNorm.
With --xla-baseline, a fifth step: ljax dense with flax's plain nn.Conv (XLA's convolution
everywhere, ljax before `ljax.models.layers`), for the speed-up of ljax's own dense step.
Every round runs each step once, interleaved, so machine noise hits all alike; the table gives
the median over --rounds rounds after 2 warm-up rounds (which include compilation).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib

from ljax.models import get_model
from ljax.pretrain import DenseTraining
from ljax.search import Parallel, Search

# case name -> (label, ljax model name, ljax kwargs, authors' constructor, classes, image size)
MODELS = {
    'vgg19': ('VGG-19 CIFAR', 'vgg19_cifar', {}, 'vgg19_cifar10', 10, 32),
    'resnet32': (
        'ResNet-32 (32/64/128)', 'resnet32_cifar', {'widths': (32, 64, 128)},
        'resnet32_cifar10', 10, 32,
    ),
    'resnet50': ('ResNet-50 224x224', 'resnet50', {}, 'resnet50', 1000, 224),
}
SPARSITY = 0.9


def ljax_search_step(model, variables, x, y, total_steps=10**6):
    """A callable running one ljax search step (plain top-k, rate 1) and blocking on its result.

    The only place this benchmark touches ljax's search API.
    """
    search = Search.create(model, variables, x[:1], sparsity=SPARSITY, total_steps=total_steps)
    par = Parallel(search)
    state = par.replicate(search.init_state())

    def step():
        nonlocal state
        state, metrics = par.train(state, x, y)
        return jax.block_until_ready(metrics)

    return step


def ljax_dense_step(model, variables, x, y):
    """A callable running one dense training step on the same machinery as the search
    (`ljax.pretrain.DenseTraining` through `Parallel`: SGD momentum, weight decay, train-mode BN)."""
    task = DenseTraining(model, lr=0.1, weight_decay=5e-4, total_steps=10**6)
    par = Parallel(task)
    state = par.replicate(task.init_state(variables))

    def step():
        nonlocal state
        state, metrics = par.train(state, x, y)
        return jax.block_until_ready(metrics)

    return step


@contextlib.contextmanager
def plain_flax_conv():
    """Builds the shipped models with flax's nn.Conv (XLA's convolution) inside the block."""
    import flax.linen as nn

    from ljax.models import resnet50, resnet_cifar, vgg

    saved = [(m, m.Conv) for m in (resnet50, resnet_cifar, vgg)]
    try:
        for m, _ in saved:
            m.Conv = nn.Conv
        yield
    finally:
        for m, conv in saved:
            m.Conv = conv


def import_authors(path):
    """Their `models` and `utils` packages, imported from a checkout at `path`."""
    needed = ('models/__init__.py', 'utils/conv_type.py', 'utils/common.py', 'configs')
    if not all(os.path.exists(os.path.join(path, p)) for p in needed):
        print(
            f"cpu_vs_torch: the authors' code (zyxxmu/lottery-jackpots) is not at {path!r}; "
            'clone it there or pass --authors PATH'
        )
        sys.exit(2)
    sys.path.insert(0, path)
    argv = sys.argv
    # Their utils.options parses sys.argv and reads a YAML config at import time.
    config = os.path.join(path, 'configs/vgg19_cifar10/90sparsity30epoch.yaml')
    sys.argv = ['authors', '--config', config]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import models as authors_models
            import utils.common as authors_common
            from utils.options import args as authors_args
    finally:
        sys.argv = argv
    return authors_models, authors_common, authors_args


def torch_steps(authors, constructor, x, y):
    """(search step, dense step) callables of the authors' model on the batch (NCHW tensors)."""
    import torch

    models, common, args = authors
    loss_fn = torch.nn.CrossEntropyLoss()

    def build(conv_type):
        args.conv_type = conv_type
        with contextlib.redirect_stdout(io.StringIO()):
            return getattr(models, constructor)()

    def sgd(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)

    # Search: PretrainConv everywhere, rates from one global |w| threshold, classifier dense.
    net = build('PretrainConv').train()
    convs = [m for m in net.modules() if hasattr(m, 'set_prune_rate')]
    weights = [m.weight.detach().abs().flatten() for m in convs[:-1]]
    everything = torch.cat(weights)
    keep = int(everything.numel() * (1 - SPARSITY))
    threshold = torch.topk(everything, keep).values[-1]
    rates = [float((w < threshold).float().mean()) for w in weights] + [0.0]
    with contextlib.redirect_stdout(io.StringIO()):
        for m, r in zip(convs, rates):
            m.set_prune_rate(r)
        common.freeze_model_weights(net)
    opt = sgd([p for p in net.parameters() if p.requires_grad])

    def search():
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        for m in convs:
            m.final_pop_up(1)
        return loss.item()

    dense_net = build('DenseConv').train()
    dense_opt = sgd(dense_net.parameters())

    def dense():
        dense_opt.zero_grad()
        loss = loss_fn(dense_net(x), y)
        loss.backward()
        dense_opt.step()
        return loss.item()

    return search, dense


def run_case(authors, key, batch, rounds, xla_baseline=False):
    import torch

    label, name, kwargs, constructor, classes, size = MODELS[key]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    y = rng.integers(0, classes, batch).astype(np.int32)
    model = get_model(name, classes, **kwargs)
    variables = jax.device_get(model.init(jax.random.key(0), x[:1], train=False))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y.astype(np.int64))
    a_search, a_dense = torch_steps(authors, constructor, xt, yt)
    steps = {
        'authors search': a_search,
        'torch dense': a_dense,
        'ljax search': ljax_search_step(model, variables, x, y),
        'ljax dense': ljax_dense_step(model, variables, x, y),
    }
    if xla_baseline:
        plain = get_model(name, classes, **kwargs)  # traced (and so built) inside the block
        with plain_flax_conv():
            steps['ljax dense, XLA conv'] = ljax_dense_step(plain, variables, x, y)
            steps['ljax dense, XLA conv']()  # compile while nn.Conv is in place
    times = {k: [] for k in steps}
    for r in range(rounds + 2):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            if r >= 2:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        'model': label,
        'batch': batch,
        'authors_search_img_s': batch / med['authors search'],
        'ljax_search_img_s': batch / med['ljax search'],
        'search_ratio': med['authors search'] / med['ljax search'],
        'torch_dense_ms': 1e3 * med['torch dense'],
        'ljax_dense_ms': 1e3 * med['ljax dense'],
        'dense_ratio': med['ljax dense'] / med['torch dense'],
        'ljax_dense_xla_conv_ms': 1e3 * med.get('ljax dense, XLA conv', float('nan')),
        'rounds': rounds,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--authors', default='/tmp/lottery-jackpots',
                    help="a checkout of zyxxmu/lottery-jackpots (imported, never copied)")
    ap.add_argument('--cases', nargs='*',
                    default=['vgg19:64', 'vgg19:128', 'resnet32:64', 'resnet32:128', 'resnet50:8'])
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--torch-threads', type=int, default=2)
    ap.add_argument('--csv', help='also write the rows to this CSV file (replacing those cases)')
    ap.add_argument('--xla-baseline', action='store_true',
                    help="also time ljax's dense step with flax's plain nn.Conv")
    args = ap.parse_args()
    cases = []
    for c in args.cases:
        key, _, batch = c.partition(':')
        if key not in MODELS or not batch.isdigit():
            ap.error(f'--cases: expected MODEL:BATCH with MODEL in {sorted(MODELS)}, got {c!r}')
        cases.append((key, int(batch)))
    authors = import_authors(args.authors)
    import torch

    torch.set_num_threads(args.torch_threads)
    print(f'{benchlib.machine()}; torch {torch.__version__} with {args.torch_threads} threads; '
          f'load {benchlib.load_average()}; git {benchlib.git_revision()}; '
          f'median of {args.rounds} interleaved rounds')
    rows = []
    for key, batch in cases:
        row = run_case(authors, key, batch, args.rounds, args.xla_baseline)
        rows.append(row)
        print(f"{row['model']}, batch {batch}: search img/s authors "
              f"{row['authors_search_img_s']:.1f}"
              f" ljax {row['ljax_search_img_s']:.1f} ({row['search_ratio']:.2f}x); dense ms torch "
              f"{row['torch_dense_ms']:.0f} ljax {row['ljax_dense_ms']:.0f} "
              f"({row['dense_ratio']:.2f}x); ljax dense with XLA conv "
              f"{row['ljax_dense_xla_conv_ms']:.0f} ms", flush=True)
    header = ['model, batch', 'authors search img/s', 'ljax search img/s', 'ljax / authors',
              'torch dense ms', 'ljax dense ms', 'ljax / torch dense']
    print(benchlib.markdown_table(header, [
        [f"{r['model']}, {r['batch']}", f"{r['authors_search_img_s']:.1f}",
         f"{r['ljax_search_img_s']:.1f}", f"{r['search_ratio']:.2f}", f"{r['torch_dense_ms']:.0f}",
         f"{r['ljax_dense_ms']:.0f}", f"{r['dense_ratio']:.2f}"] for r in rows]))
    if args.csv:  # the cases run replace their rows; the others stay
        benchlib.merge_csv(args.csv, rows, [(r['model'], r['batch']) for r in rows],
                           key=('model', 'batch'))


if __name__ == '__main__':
    main()
