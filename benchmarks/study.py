"""The study: do the paper's claims hold here? Fashion-MNIST, two models, 90/95/98% sparsity.

    python benchmarks/study.py            # full study (about an hour on a 2-core CPU), resumable
    python benchmarks/study.py --quick    # tiny synthetic version (seconds), used by the tests
    python benchmarks/study.py --report-only   # tables, CSV and plots from the rows already done
    python benchmarks/study.py --part beyond   # 2:4, ERK, Wanda rows (issue 14)
    python benchmarks/study.py --part seeds    # the headline searches with 3 seeds (issue 15)
    python benchmarks/study.py --part distill --models resnet32 --sparsities 0.95
                                               # labels vs no labels (distilled), side by side

Wall time of each part on this 2-core CPU (rows plus pre-training, measured): paper, both models,
about an hour; beyond, MLP 856 s (on a CPU shared with a CI run) and ResNet-32 1408 s (idle,
291 s of it pre-training); seeds, MLP 649 s (shared). ResNet-32 seeds 447 s
(idle, 4 rows; seed 0's rows come from the beyond part).

Issue 15's conv net at the paper's budget is the model 'resnet32_budget' (28x28, all 60k images,
30 epochs): 43-62 minutes per search row on this CPU with oneDNN convolutions (measured at 95%:
2558 s idle, 3712 s beside a CI run; seed rows at 90%: 2780-3042 s, nearly idle, 3693 s beside test runs; 4618 and 4715 s
at 90% on XLA's kernels; 138 s on an NVIDIA H200); 4 rows at 90/95%,
2 more at a third of the epochs, 4 for the seeds, so it is meant for a lent GPU or a cached
many-hour run (`--methods` lets two processes take different rows):
    python benchmarks/study.py --models resnet32_budget --sparsities 0.9,0.95 --schedules '' \
        --extra-schedules ''                           # dense, one-shot, random / magnitude init
    python benchmarks/study.py --part seeds --models resnet32_budget

Models: the shipped BN-MLP 784-768-768-10 (`pretrained/fashion_mnist_mlp.npz`) on 28x28 inputs,
and a narrow ResNet-32 (stage widths 8/16/32, option-A shortcuts, the paper's CIFAR family) on
Fashion-MNIST averaged down to 14x14, pretrained here once and cached under benchmarks/out/.
Every row of a model uses the same pre-trained weights, the same seed, the same train batches in
the same order, and the full 10k test split. Rows per (model, sparsity):

  dense              the pre-trained model
  magnitude_oneshot  the global-magnitude mask, no search (dense BN statistics)
  magnitude_bn       the same mask with BN statistics re-estimated on 100 train batches (no search)
  random_init        search from Kaiming-uniform scores (edge-popup), plain top-k
  magnitude_init     search from the magnitude mask (the paper), plain top-k
  sr_<schedule>      magnitude_init with the short restriction under <schedule>

The search runs on `ljax.search.Search` / `Parallel` (the API `search_jackpot` is built on) with
the paper's CIFAR hyper-parameters (SGD 0.9, lr 0.1 cosine over the search, wd 5e-4, batch 256),
evaluating on the test split every 1/evals_per_epoch of an epoch and recording the train loss and
the mask flips of every step. Each finished row is written to OUT/rows/<key>.json (and its mask to
OUT/masks/<key>.npz); rerunning skips finished rows, so a killed study loses one row at most.

Then, per (model, sparsity): epochs until the test accuracy first reaches dense - 0.5 pt; overlap
of every searched mask with the masks of magnitude, random, SNIP (|dL/dw * w|, 4 batches), SynFlow
(one shot, data free) and the other searches, at the same per-layer counts; flips per epoch;
tables on stdout, CSV in --results-dir, PNG plots in --figures-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib

from ljax import masks
from ljax import sparsity as sparsity_lib
from ljax.models import get_model, onednn
from ljax.models.resnet_cifar import ResNetCifar
from ljax.loop import Loop, Periodic
from ljax.search import Parallel, Search, SearchOptions

TARGET_DROP = 0.005  # "reaches the dense accuracy": within 0.5 pt of it


@dataclasses.dataclass
class ModelSpec:
    name: str
    label: str
    build: Callable
    pool: int  # input downsampling (1: 28x28, 2: 14x14)
    batch: int
    epochs: int  # search epochs (passes over train_examples)
    evals_per_epoch: int
    train_examples: int | None  # None: all 60k
    pretrained: str | None  # shipped .npz, or None: pretrain and cache under OUT
    pretrain_epochs: int = 0
    pretrain_batch: int = 256
    pretrain_lr: float = 0.1
    pretrain_examples: int | None = None


def full_specs() -> dict[str, ModelSpec]:
    specs = {
        'mlp': ModelSpec(
            'mlp',
            'BN-MLP 784-768-768-10, 28x28, 60k train',
            lambda: get_model('mlp', 10, hidden=(768, 768)),
            pool=1,
            batch=256,
            epochs=10,
            evals_per_epoch=4,
            train_examples=None,
            pretrained=os.path.join(benchlib.ROOT, 'pretrained', 'fashion_mnist_mlp.npz'),
        ),
        'resnet32': ModelSpec(
            'resnet32',
            'ResNet-32 (widths 8/16/32), 14x14, 20k train',
            lambda: get_model('resnet32_cifar', 10, widths=(8, 16, 32)),
            pool=2,
            batch=256,
            epochs=6,
            evals_per_epoch=2,
            train_examples=20000,
            pretrained=None,
            pretrain_epochs=6,
            pretrain_batch=256,
        ),
    }
    # Issue 15: the paper's budget (30 epochs on every training image, full resolution). On this
    # 2-core CPU a search step at batch 256 takes 534 ms and a dense one 539 ms (`python
    # benchmarks/speed.py --parts step --steps 10`), so about 63 minutes of steps per search row
    # and 21 for the pre-training: meant for a lent GPU, or for a long run whose rows are cached
    # (rerunning the same command resumes at the first missing row).
    specs['resnet32_budget'] = dataclasses.replace(
        specs['resnet32'],
        name='resnet32_budget',
        label="ResNet-32 (widths 8/16/32), 28x28, 60k train, 30 epochs (the paper's budget)",
        pool=1,
        epochs=30,
        evals_per_epoch=1,
        train_examples=None,
        pretrain_epochs=10,
    )
    return specs


def quick_specs() -> dict[str, ModelSpec]:
    return {
        'mlp': ModelSpec(
            'mlp',
            'BN-MLP 784-32-32-10 (quick)',
            lambda: get_model('mlp', 10, hidden=(32, 32)),
            pool=1,
            batch=64,
            epochs=2,
            evals_per_epoch=2,
            train_examples=None,
            pretrained=None,
            pretrain_epochs=2,
            pretrain_batch=64,
        ),
        'resnet32': ModelSpec(
            'resnet32',
            'ResNet-8 (widths 4/4/8, quick)',
            lambda: ResNetCifar(depth=8, widths=(4, 4, 8), num_classes=10),
            pool=2,
            batch=64,
            epochs=1,
            evals_per_epoch=2,
            train_examples=None,
            pretrained=None,
            pretrain_epochs=1,
            pretrain_batch=64,
        ),
    }


@dataclasses.dataclass(frozen=True)
class Method:
    key: str
    label: str
    search: bool
    score_init: str = 'magnitude'
    restriction: str = 'none'
    budget: int = 1  # the search runs spec.epochs / budget epochs (its own cosine schedule)
    allocation: str = 'global_magnitude'
    nm: tuple | None = None  # N:M sparsity (then the row's sparsity is 1 - N/M)
    oneshot: str = 'magnitude'  # the mask of a one-shot row: 'magnitude' or 'wanda'
    seed: int = 0  # search seed and train order
    teacher: str | None = None  # 'dense': label-free, distilled from the dense model (KL)


CORE_SCHEDULES = ('cosine', 'poly4')
EXTRA_SCHEDULES = ('linear', 'constant:0.5')


def methods(schedules) -> list[Method]:
    out = [
        Method('dense', 'dense (pre-trained)', False),
        Method('magnitude_oneshot', 'one-shot magnitude, no search', False),
        Method('magnitude_bn', 'one-shot magnitude + BN re-estimated, no search', False),
        Method('random_init', 'search, random init (edge-popup)', True, 'random'),
        Method('magnitude_init', 'search, magnitude init (jackpot)', True, 'magnitude'),
        Method(
            'magnitude_third',
            'search, magnitude init, 1/3 of the epochs',
            True,
            'magnitude',
            budget=3,
        ),
    ]
    out += [
        Method(sr_key(s), f'search, magnitude init + SR {s}', True, 'magnitude', s)
        for s in schedules
    ]
    return out


NM = (2, 4)
NM_SPARSITY = 1 - NM[0] / NM[1]
SEEDS = (0, 1, 2)


def beyond_methods(sparsity: float) -> list[Method]:
    """Issue "Beyond the paper": 2:4 (at sparsity 0.5), ERK allocation, Wanda."""
    if sparsity == NM_SPARSITY:
        return [
            Method('nm24_magnitude_oneshot', '2:4 one-shot magnitude, no search', False, nm=NM),
            Method('nm24_magnitude_bn', '2:4 one-shot magnitude + BN re-estimated', False, nm=NM),
            Method('nm24_wanda_oneshot', '2:4 one-shot Wanda, no search', False, nm=NM, oneshot='wanda'),
            Method('nm24_wanda_bn', '2:4 one-shot Wanda + BN re-estimated', False, nm=NM, oneshot='wanda'),
            Method('nm24_magnitude_init', '2:4 jackpot (search, magnitude init)', True, nm=NM),
        ]
    out = [
        Method('magnitude_oneshot', 'one-shot magnitude (global), no search', False),
        Method('magnitude_bn', 'one-shot magnitude (global) + BN re-estimated', False),
        Method('magnitude_init', 'search, magnitude init, global allocation', True),
        Method('erk_magnitude_oneshot', 'one-shot magnitude (ERK), no search', False, allocation='erk'),
        Method('erk_magnitude_bn', 'one-shot magnitude (ERK) + BN re-estimated', False, allocation='erk'),
        Method('erk_magnitude_init', 'search, magnitude init, ERK allocation', True, allocation='erk'),
    ]
    if sparsity == 0.9:
        out += [
            Method('wanda_oneshot', 'one-shot Wanda (global counts), no search', False, oneshot='wanda'),
            Method('wanda_bn', 'one-shot Wanda + BN re-estimated', False, oneshot='wanda'),
            Method('random_init', 'search, random init (edge-popup)', True, 'random'),
            Method('wanda_init', 'search, Wanda init', True, 'wanda'),
        ]
    return out


def seed_methods() -> list[Method]:
    """Issue "The paper's claims at the paper's budget": the headline searches with 3 seeds."""
    out = []
    for seed in SEEDS:
        tail = f'_seed{seed}' if seed else ''
        out += [
            Method('magnitude_init' + tail, f'search, magnitude init, seed {seed}', True, seed=seed),
            Method('random_init' + tail, f'search, random init, seed {seed}', True, 'random', seed=seed),
        ]
    return out


def distill_methods() -> list[Method]:
    """Issue "Jackpots in a real pre-trained transformer", point 8: the search without labels
    (KL divergence to the dense model's logits) beside the labelled one, same budget and seed."""
    return [
        Method('dense', 'dense (pre-trained)', False),
        Method('magnitude_init', 'search, magnitude init (jackpot), labels', True),
        Method(
            'magnitude_init_distill',
            'search, magnitude init, no labels (KL to the dense logits)',
            True,
            teacher='dense',
        ),
    ]


def sr_key(schedule: str) -> str:
    return 'sr_' + schedule.replace(':', '')


def row_key(model: str, sparsity: float, method: str) -> str:
    return f'{model}_s{round(sparsity * 100)}_{method}'


# ------------------------------------------------------------------------------------- one row
class Study:
    def __init__(self, args):
        self.args = args
        self.specs = quick_specs() if args.quick else full_specs()
        self.out = args.out
        self._data, self._variables = {}, {}

    def log(self, msg):
        print(msg, flush=True)

    def data(self, spec: ModelSpec, seed: int = 0) -> benchlib.Data:
        """The model's data; `seed` sets the train order (the splits are the same for every seed)."""
        key = (spec.pool, spec.train_examples, seed)
        if key not in self._data:
            self._data[key] = benchlib.Data(
                pool=spec.pool,
                train_examples=spec.train_examples,
                synthetic=self.args.quick,
                seed=seed,
                synthetic_seed=0,
            )
        return self._data[key]

    def pretrain_data(self, spec: ModelSpec) -> benchlib.Data:
        key = (spec.pool, spec.pretrain_examples)
        if key not in self._data:
            self._data[key] = benchlib.Data(
                pool=spec.pool, train_examples=spec.pretrain_examples, synthetic=self.args.quick
            )
        return self._data[key]

    def variables(self, spec: ModelSpec) -> dict:
        """The pre-trained variables and their dense test accuracy (cached in OUT/dense_<model>.json)."""
        if spec.name in self._variables:
            return self._variables[spec.name]
        model = spec.build()
        seconds = 0.0
        if spec.pretrained:
            from ljax import convert

            variables = convert.load_variables_npz(spec.pretrained)
        else:
            path = os.path.join(self.out, f'pretrained_{spec.name}.npz')
            variables, seconds = benchlib.load_or_pretrain(
                path,
                model,
                self.pretrain_data(spec),
                log=self.log,
                epochs=spec.pretrain_epochs,
                batch=spec.pretrain_batch,
                lr=spec.pretrain_lr,
            )
        info_path = os.path.join(self.out, f'dense_{spec.name}.json')
        if os.path.exists(info_path) and not seconds:
            info = benchlib.read_json(info_path)
        else:
            data = self.data(spec)
            ev = benchlib.evaluate(model, variables, data.test_batches(1000))
            info = {
                'accuracy': ev['accuracy'],
                'loss': ev['loss'],
                'pretrain_seconds': seconds,
                'params': int(sum(np.size(a) for a in jax.tree.leaves(variables['params']))),
            }
            if seconds == 0.0 and os.path.exists(info_path):
                info['pretrain_seconds'] = benchlib.read_json(info_path).get(
                    'pretrain_seconds', 0.0
                )
            benchlib.write_json(info_path, info)
        self._variables[spec.name] = (variables, info)
        return self._variables[spec.name]

    def run_row(self, spec: ModelSpec, sparsity: float, method: Method) -> dict:
        path = os.path.join(self.out, 'rows', row_key(spec.name, sparsity, method.key) + '.json')
        if os.path.exists(path):
            return benchlib.read_json(path)
        variables, dense = self.variables(spec)
        data = self.data(spec, method.seed)
        test = data.test_batches(1000 if not self.args.quick else 128)
        t_start = time.time()
        row = {
            'model': spec.name,
            'model_label': spec.label,
            'sparsity': sparsity,
            'method': method.key,
            'label': method.label,
            'score_init': method.score_init if method.search else None,
            'restriction': method.restriction if method.search else None,
            'allocation': method.allocation,
            'nm': list(method.nm) if method.nm else None,
            'oneshot': None if method.search else method.oneshot,
            'seed': method.seed,
            'teacher': method.teacher,
            'dense_accuracy': dense['accuracy'],
            'batch': spec.batch,
            'train_examples': len(data.y_train),
            'test_examples': len(data.y_test),
            'load_average_start': benchlib.load_average(),
            # where the row ran, and (on a CPU) which kernels ran the convolutions
            # (ljax.models.onednn, or XLA's before it existed or where it is not installed): the
            # two agree up to float rounding
            'device': f'{jax.devices()[0].platform} {jax.devices()[0].device_kind}',
            'matmul_precision': str(jax.config.jax_default_matmul_precision or 'default'),
            'cpu_convolution': (
                ('onednn' if onednn.available() else 'xla') if jax.default_backend() == 'cpu' else None
            ),
            'ljax': benchlib.git_revision(),
        }
        if not method.search:
            row.update(self.baseline(spec, variables, data, test, sparsity, method))
        else:
            row.update(self.search(spec, variables, data, test, sparsity, method, path))
        row['wall_seconds'] = time.time() - t_start
        row['load_average_end'] = benchlib.load_average()
        benchlib.write_json(path, row)
        acc = row['final_accuracy']
        extra = (
            f', search {row["search_seconds"]:.0f} s + eval {row["eval_seconds"]:.0f} s'
            if method.search
            else ''
        )
        self.log(
            f'{row_key(spec.name, sparsity, method.key):<40} test {100 * acc:6.2f}%  '
            f'({row["wall_seconds"]:.0f} s{extra})'
        )
        return row

    def baseline(self, spec, variables, data, test, sparsity, method) -> dict:
        model = spec.build()
        if method.key == 'dense':
            ev = benchlib.evaluate(model, variables, test)
            return {'final_accuracy': ev['accuracy'], 'final_loss': ev['loss']}
        search = Search.create(
            model,
            variables,
            data.x_train[:1],
            sparsity=None if method.nm else sparsity,
            total_steps=1,
            options=SearchOptions(
                allocation=method.allocation, nm=method.nm, prunable=nm_prunable(model, variables, data, method)
            ),
            calibration=data.train_batches(0, spec.batch) if method.oneshot == 'wanda' else None,
        )
        if method.oneshot == 'wanda' and search.wanda is None:
            raise SystemExit(f'error: {method.key}: no Wanda mask ({search.wanda_skipped})')
        mask = search.wanda if method.oneshot == 'wanda' else search.magnitude
        variables_m = search.jackpot_variables(mask, variables.get('batch_stats'))
        if method.key.endswith('_bn'):
            par = Parallel(search, jax.local_devices()[:1])
            batches = (b for e in range(10**6) for b in data.train_batches(e, spec.batch))
            variables_m = dict(
                variables_m,
                batch_stats=par.reestimate_batch_stats(
                    batches,
                    mask,
                    variables['batch_stats'],
                    steps=100 if not self.args.quick else 4,
                ),
            )
        ev = benchlib.evaluate(model, variables_m, test)
        return {
            'final_accuracy': ev['accuracy'],
            'final_loss': ev['loss'],
            'prunable': sum(int(np.size(search.magnitude[n])) for n in search.names),
            'kept': sum(int(np.sum(mask[n])) for n in search.names),
        }

    def search(self, spec, variables, data, test, sparsity, method, path) -> dict:
        model = spec.build()
        spe = data.steps_per_epoch(spec.batch)
        epochs = max(1, round(spec.epochs / method.budget))
        total = epochs * spe
        search = Search.create(
            model,
            variables,
            data.x_train[:1],
            sparsity=None if method.nm else sparsity,
            total_steps=total,
            options=SearchOptions(
                score_init=method.score_init,
                restriction=method.restriction,
                seed=method.seed,
                allocation=method.allocation,
                nm=method.nm,
                prunable=nm_prunable(model, variables, data, method),
                teacher=method.teacher,
            ),
            calibration=data.train_batches(0, spec.batch) if method.score_init == 'wanda' else None,
        )
        par = Parallel(search)
        state0 = search.init_state()
        initial_mask = {n: np.asarray(state0.mask[n]) for n in search.names}
        state = par.replicate(state0)
        within = {
            max(1, round(spe * i / spec.evals_per_epoch))
            for i in range(1, spec.evals_per_epoch + 1)
        }
        eval_steps = {e * spe + s for e in range(epochs) for s in within}

        def evaluate(step, state):
            ev = par.evaluate_state(test, state)
            return {
                'epoch': step / spe,
                'step': step,
                'accuracy': ev['accuracy'],
                'loss': ev['loss'],
            }

        curve = [evaluate(0, state)]  # the initial mask (magnitude init: one-shot magnitude)
        losses, accs, flips, eval_seconds = [], [], [], 0.0

        def on_metrics(values):
            for m in values:
                losses.append(float(m['loss']))
                accs.append(float(m['accuracy']))
                flips.append(int(m['flips']))

        def timed_eval(step, state):
            nonlocal eval_seconds
            t_eval = time.time()
            curve.append(evaluate(step, state))
            eval_seconds += time.time() - t_eval
            # progress: a row can take an hour (the paper-budget conv net)
            self.log(
                f'  {row_key(spec.name, sparsity, method.key)}: epoch {step / spe:.2f}/{epochs}, '
                f'test {100 * curve[-1]["accuracy"]:.2f}% ({time.time() - t0:.0f} s)'
            )

        loop = Loop(
            par,
            epochs,
            spe,
            spec.batch,
            log_every=spe,
            on_metrics=on_metrics,
            on_epoch=lambda epoch, state, row: timed_eval(epoch * spe, state),
            periodic=[Periodic(None, timed_eval, frozenset(eval_steps))],
            progress=False,
        )
        t0 = time.time()
        state, _ = loop.run(state, lambda epoch, _: data.train_batches(epoch, spec.batch))
        search_seconds = time.time() - t0 - eval_seconds
        final = par.unreplicate(state)
        mask = {n: np.asarray(final.mask[n]) for n in search.names}
        save_mask(self.mask_path(spec.name, sparsity, method.key), mask)
        kept = sum(int(m.sum()) for m in mask.values())
        if {n: int(m.sum()) for n, m in mask.items()} != search.kept:  # never record a bad mask
            raise SystemExit(f'error: {method.key}: the final mask does not keep {search.kept}')
        hamming = sum(int(np.sum(mask[n] != initial_mask[n])) for n in search.names)
        return {
            'epochs': epochs,
            'steps_per_epoch': spe,
            'evals_per_epoch': spec.evals_per_epoch,
            'curve': curve,
            'train_loss': losses,
            'train_accuracy': accs,
            'flips': flips,
            'final_accuracy': curve[-1]['accuracy'],
            'final_loss': curve[-1]['loss'],
            'best_accuracy': max(c['accuracy'] for c in curve),
            'prunable': sum(int(m.size) for m in mask.values()),
            'kept': kept,
            'kept_per_layer': {n: int(m.sum()) for n, m in mask.items()},
            'total_flips': int(sum(flips)),
            'hamming_initial_final': hamming,
            'overlap_with_initial': sum(int(np.sum(mask[n] & initial_mask[n])) for n in mask)
            / kept,
            'search_seconds': search_seconds,
            'eval_seconds': eval_seconds,
            'ms_per_step': 1e3 * search_seconds / max(total, 1),
        }

    def mask_path(self, model: str, sparsity: float, method: str) -> str:
        return mask_path_for(self.out, model, sparsity, method)


def mask_path_for(out: str, model: str, sparsity: float, method: str) -> str:
    return os.path.join(out, 'masks', row_key(model, sparsity, method) + '.npz')


def nm_prunable(model, variables, data, method):
    """For an N:M row, the default prunable kernels whose input axis divides by M (a stem conv on
    one grey channel cannot be N:M); None (the default) otherwise."""
    if not method.nm:
        return None
    from ljax.modelfn import model_fn

    x = data.x_train[:1]
    default = sparsity_lib.default_prunable(model_fn(model, variables, x), x)
    m = method.nm[1]
    return lambda path, leaf: default(path, leaf) and np.ndim(leaf) >= 2 and np.shape(leaf)[-2] % m == 0


def save_mask(path: str, mask: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[:-4] + '.tmp.npz'
    np.savez_compressed(
        tmp, **{n.replace('/', '|'): np.packbits(m.reshape(-1)) for n, m in mask.items()}
    )
    os.replace(tmp, path)


def load_mask(path: str, shapes: dict) -> dict:
    with np.load(path) as f:
        return {
            n: np.unpackbits(f[n.replace('/', '|')], count=int(np.prod(s))).astype(bool).reshape(s)
            for n, s in shapes.items()
        }


# ------------------------------------------------------------------------------- other criteria
def snip_scores(
    model, variables, data: benchlib.Data, batch: int, names, n_batches: int = 4
) -> dict:
    """SNIP: |dL/dw * w| of the dense model, the gradient summed over `n_batches` train batches."""

    @jax.jit
    def grad(params, x, y):
        def loss_fn(p):
            logits, _ = model.apply(
                {'params': p, 'batch_stats': variables['batch_stats']},
                x,
                train=True,
                mutable=['batch_stats'],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return jax.grad(loss_fn)(params)

    total = None
    for i, (x, y) in enumerate(data.train_batches(0, batch)):
        if i == n_batches:
            break
        g = grad(variables['params'], x, y)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    g, w = sparsity_lib.flatten(jax.device_get(total)), sparsity_lib.flatten(variables['params'])
    return {n: np.abs(np.asarray(g[n]) * np.asarray(w[n])) for n in names}


def synflow_scores(model, variables, shape, names) -> dict:
    """SynFlow (Tanaka et al. 2020), one shot: |dR/dw * w| with R the summed output of the network
    with |w| everywhere, zero biases, identity BN statistics, on an all-ones input. Each kernel is
    divided by fan_in * mean|w| (a per-layer factor, which does not change any within-layer
    ranking) so that 32 layers of products stay inside float32."""
    flat = {}
    for path, w in sparsity_lib.flatten(variables['params']).items():
        a = np.abs(np.asarray(w, np.float32))
        if path.endswith('bias'):
            a = np.zeros_like(a)
        elif path.endswith('kernel'):
            a = a / max(float(a.mean()) * sparsity_lib.fan_in(a.shape), 1e-30)
        flat[path] = a
    params = sparsity_lib.unflatten(flat)
    stats = sparsity_lib.unflatten(
        {
            p: (np.ones_like(v) if p.endswith('var') else np.zeros_like(v))
            for p, v in sparsity_lib.flatten(variables['batch_stats']).items()
        }
    )

    def r(p):
        return jnp.sum(
            model.apply(
                {'params': p, 'batch_stats': stats}, jnp.ones((1,) + tuple(shape)), train=False
            )
        )

    g = sparsity_lib.flatten(jax.device_get(jax.grad(r)(params)))
    return {n: np.abs(np.asarray(g[n]) * flat[n]) for n in names}


def per_layer_topk(scores: dict, kept: dict) -> dict:
    return {
        n: np.asarray(masks.topk_mask(jnp.asarray(scores[n], jnp.float32), kept[n])) for n in kept
    }


def random_masks(shapes: dict, kept: dict, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return per_layer_topk({n: rng.random(s).astype(np.float32) for n, s in shapes.items()}, kept)


def overlap(a: dict, b: dict) -> float:
    """Fraction of the kept positions of `a` that `b` keeps too (`ljax.report.overlap`)."""
    from ljax import report

    return report.overlap(a, b)


# ------------------------------------------------------------------------------------- analysis
def epochs_to_target(row: dict, target: float):
    for point in row.get('curve', []):
        if point['accuracy'] >= target:
            return point['epoch']
    return None


def fmt_epochs(e, row) -> str:
    if e is None:
        return f'not in {row["epochs"]}'
    return f'{e:.2f}'.rstrip('0').rstrip('.') if e else '0'


def wobble(row: dict) -> float:
    """Oscillation of the test accuracy in the second half of the search: the sum of its drops
    between consecutive evaluations (0 for a curve that never goes down; a rising trend adds
    nothing, unlike a standard deviation)."""
    acc = [p['accuracy'] for p in row['curve'] if p['epoch'] >= row['epochs'] / 2]
    return float(np.sum(np.maximum(0.0, -np.diff(acc)))) if len(acc) > 1 else 0.0


def windows(values, size):
    """Consecutive means (or sums) of `values` in windows of `size` steps."""
    v = np.asarray(values, np.float64)
    n = len(v) // size
    return v[: n * size].reshape(n, size)


def analyse(
    study: Study, rows: dict, models, sparsities, schedules, extras, results_dir, figures_dir
):
    """Tables (stdout, OUT/tables.md), CSV and PNGs from the finished rows."""
    lines = []

    def emit(text=''):
        print(text, flush=True)
        lines.append(text)

    summary, curves_csv, overlap_rows = [], [], []
    all_schedules = list(schedules) + [s for s in extras if s not in schedules]
    for model_name in models:
        spec = study.specs[model_name]
        variables, dense = study.variables(spec)
        data = study.data(spec)
        target = dense['accuracy'] - TARGET_DROP
        emit(f'\n### {spec.label}\n')
        emit(
            f'dense test accuracy {100 * dense["accuracy"]:.2f}%, target (dense - 0.5 pt) '
            f'{100 * target:.2f}%; {spec.epochs} search epochs of {len(data.y_train):,} examples, '
            f'batch {spec.batch}, test every 1/{spec.evals_per_epoch} epoch on {len(data.y_test):,}\n'
        )
        header = [
            'sparsity',
            'method',
            'test top-1 (%)',
            'best (%)',
            'epochs to dense-0.5',
            'overlap w/ magnitude',
            'flips, last epoch (% of kept)',
            'search s',
            's/epoch',
        ]
        table = []
        model = spec.build()
        snip = synflow = None
        for s in sparsities:
            search = Search.create(model, variables, data.x_train[:1], sparsity=s, total_steps=1)
            shapes = {n: tuple(search.magnitude[n].shape) for n in search.names}
            magnitude = {n: np.asarray(search.magnitude[n]) for n in search.names}
            if snip is None:
                snip = snip_scores(model, variables, data, spec.batch, search.names)
                synflow = synflow_scores(model, variables, data.shape, search.names)
            criteria = {
                'magnitude': magnitude,
                'random': random_masks(shapes, search.kept),
                'SNIP': per_layer_topk(snip, search.kept),
                'SynFlow': per_layer_topk(synflow, search.kept),
            }
            searched = {}
            for m in methods(all_schedules):
                key = row_key(model_name, s, m.key)
                if key not in rows:
                    continue
                r = rows[key]
                e = epochs_to_target(r, target) if m.search else None
                ov = ''
                flips_last = ''
                if m.search:
                    mask = load_mask(study.mask_path(model_name, s, m.key), shapes)
                    searched[m.key] = mask
                    ov = overlap(mask, magnitude)
                    last = r['flips'][-r['steps_per_epoch'] :]
                    flips_last = 100 * sum(last) / r['kept']
                elif m.key != 'dense':
                    ov = 1.0
                table.append(
                    [
                        f'{100 * s:g}%',
                        m.label,
                        f'{100 * r["final_accuracy"]:.2f}',
                        f'{100 * r["best_accuracy"]:.2f}' if m.search else '',
                        fmt_epochs(e, r) if m.search else '',
                        f'{100 * ov:.1f}%' if ov != '' else '',
                        f'{flips_last:.2f}' if flips_last != '' else '',
                        f'{r["search_seconds"]:.0f}' if m.search else '',
                        f'{r["search_seconds"] / r["epochs"]:.1f}' if m.search else '',
                    ]
                )
                summary.append(
                    {
                        'model': model_name,
                        'sparsity': s,
                        'method': m.key,
                        'dense_accuracy': dense['accuracy'],
                        'test_accuracy': r['final_accuracy'],
                        'best_accuracy': r.get('best_accuracy', ''),
                        'epochs_to_dense_minus_0.5': '' if e is None else e,
                        'reached': (e is not None) if m.search else '',
                        'search_epochs': r.get('epochs', ''),
                        'overlap_with_magnitude': ov,
                        'total_flips': r.get('total_flips', ''),
                        'test_wobble_second_half': wobble(r) if m.search else '',
                        'flips_last_epoch_frac_of_kept': ''
                        if flips_last == ''
                        else flips_last / 100,
                        'hamming_initial_final': r.get('hamming_initial_final', ''),
                        'search_seconds': r.get('search_seconds', ''),
                        'eval_seconds': r.get('eval_seconds', ''),
                        'ms_per_step': r.get('ms_per_step', ''),
                        'wall_seconds': r['wall_seconds'],
                        'train_examples': r['train_examples'],
                        'test_examples': r['test_examples'],
                    }
                )
                if m.search:
                    size = r['steps_per_epoch'] // r['evals_per_epoch']
                    loss_w = windows(r['train_loss'], size).mean(1)
                    flips_w = windows(r['flips'], size).sum(1)
                    for i, point in enumerate(r['curve']):
                        curves_csv.append(
                            {
                                'model': model_name,
                                'sparsity': s,
                                'method': m.key,
                                'epoch': point['epoch'],
                                'step': point['step'],
                                'test_accuracy': point['accuracy'],
                                'test_loss': point['loss'],
                                'train_loss_window': loss_w[i - 1] if 0 < i <= len(loss_w) else '',
                                'flips_window': int(flips_w[i - 1])
                                if 0 < i <= len(flips_w)
                                else '',
                            }
                        )
            for key, mask in searched.items():
                row = {'model': model_name, 'sparsity': s, 'searched_mask': key}
                for name, other in criteria.items():
                    row[name] = overlap(mask, other)
                for other_key in ('random_init', 'magnitude_init'):
                    if other_key != key and other_key in searched:
                        row[f'{other_key} jackpot'] = overlap(mask, searched[other_key])
                overlap_rows.append(row)
        emit(benchlib.markdown_table(header, table))
        # search cost (claim 1)
        emit(f'\nEpochs to reach {100 * target:.2f}% (dense - 0.5 pt):\n')
        cost = []
        for s in sparsities:
            got = {
                m: rows.get(row_key(model_name, s, m))
                for m in ['random_init', 'magnitude_init'] + [sr_key(x) for x in all_schedules]
            }
            e = {m: (epochs_to_target(r, target) if r else None) for m, r in got.items()}
            if not got['random_init'] or not got['magnitude_init']:
                continue
            er, em = e['random_init'], e['magnitude_init']
            if em is not None and er is not None:
                ratio = f'{er / em:.1f}x' if em > 0 else 'inf'
            elif em is not None:
                ratio = f'> {got["random_init"]["epochs"] / em:.1f}x (random never reached it)'
            elif er is not None:
                ratio = (
                    f'< {er / got["magnitude_init"]["epochs"]:.2f}x (magnitude never reached it)'
                )
            else:
                ratio = 'neither reached it'
            best_r = 100 * got['random_init']['best_accuracy']
            best_m = 100 * got['magnitude_init']['best_accuracy']
            third = rows.get(row_key(model_name, s, 'magnitude_third'))
            third_cell = (
                f'{100 * third["final_accuracy"]:.2f} in {third["epochs"]} vs '
                f'{100 * got["random_init"]["final_accuracy"]:.2f} in {got["random_init"]["epochs"]}'
                if third
                else ''
            )
            sr = ', '.join(
                f'{x}: {fmt_epochs(e[sr_key(x)], got[sr_key(x)])}'
                for x in all_schedules
                if got.get(sr_key(x))
            )
            # when the dense target is out of reach: how soon magnitude init matches random init's end
            final_r = got['random_init']['final_accuracy']
            em_r = epochs_to_target(got['magnitude_init'], final_r)
            match = (
                f'{fmt_epochs(em_r, got["magnitude_init"])} ({got["random_init"]["epochs"] / em_r:.1f}x)'
                if em_r
                else fmt_epochs(em_r, got['magnitude_init'])
            )
            cost.append(
                [
                    f'{100 * s:g}%',
                    fmt_epochs(er, got['random_init']),
                    f'{best_r:.2f}',
                    fmt_epochs(em, got['magnitude_init']),
                    f'{best_m:.2f}',
                    ratio,
                    match,
                    third_cell,
                    sr,
                ]
            )
        emit(
            benchlib.markdown_table(
                [
                    'sparsity',
                    'random init: epochs',
                    'random best (%)',
                    'magnitude init: epochs',
                    'magnitude best (%)',
                    'ratio',
                    "magnitude init: epochs to random init's final (speed-up)",
                    'final (%): magnitude init, 1/3 budget vs random init, full',
                    'magnitude + SR: epochs',
                ],
                cost,
            )
        )
        # overlap (claim 3)
        emit(
            '\nOverlap of each searched mask with other masks (fraction of its kept positions also '
            'kept by the other; same per-layer counts):\n'
        )
        ov_table = []
        for row in [r for r in overlap_rows if r['model'] == model_name]:
            others = [k for k in row if k not in ('model', 'sparsity', 'searched_mask')]
            ov_table.append(
                [f'{100 * row["sparsity"]:g}%', row['searched_mask']]
                + [', '.join(f'{k} {100 * row[k]:.1f}%' for k in others)]
            )
        emit(benchlib.markdown_table(['sparsity', 'searched mask', 'overlap with'], ov_table))
        # short restriction (claim 4)
        emit('\nShort restriction: flips and oscillation (magnitude init):\n')
        sr_table = []
        for s in sparsities:
            for key in ['magnitude_init'] + [sr_key(x) for x in all_schedules]:
                r = rows.get(row_key(model_name, s, key))
                if not r:
                    continue
                spe = r['steps_per_epoch']
                per_epoch = windows(r['flips'], spe).sum(1)
                loss_last = r['train_loss'][-spe:]
                e = epochs_to_target(r, target)
                sr_table.append(
                    [
                        f'{100 * s:g}%',
                        r['restriction'],
                        f'{100 * r["final_accuracy"]:.2f}',
                        fmt_epochs(e, r),
                        f'{100 * wobble(r):.2f}',
                        f'{r["total_flips"]:,}',
                        ' / '.join(f'{100 * f / r["kept"]:.1f}' for f in per_epoch),
                        f'{r["hamming_initial_final"]:,}',
                        f'{r["total_flips"] / max(r["hamming_initial_final"], 1):.1f}',
                        f'{np.mean(loss_last):.4f}',
                    ]
                )
        emit(
            benchlib.markdown_table(
                [
                    'sparsity',
                    'restriction',
                    'test top-1 (%)',
                    'epochs to dense-0.5',
                    'test-acc drops, 2nd half (pt)',
                    'total flips',
                    'flips per epoch (% of kept)',
                    'net change (init->final)',
                    'flips / net change',
                    'train loss, last epoch',
                ],
                sr_table,
            )
        )
        plot_model(spec, dense, rows, model_name, sparsities, all_schedules, figures_dir)
    benchlib.merge_csv(os.path.join(results_dir, 'study_summary.csv'), summary, models)
    benchlib.merge_csv(os.path.join(results_dir, 'study_curves.csv'), curves_csv, models)
    benchlib.merge_csv(os.path.join(results_dir, 'study_overlap.csv'), overlap_rows, models)
    with open(os.path.join(study.out, 'tables.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


COLORS = {
    'random_init': 'tab:red',
    'magnitude_init': 'tab:blue',
    'magnitude_third': 'tab:cyan',
    'sr_cosine': 'tab:green',
    'sr_poly4': 'tab:orange',
    'sr_linear': 'tab:purple',
    'sr_constant0.5': 'tab:brown',
}


def plot_model(spec, dense, rows, model_name, sparsities, schedules, figures_dir):
    plt = benchlib.pyplot()
    os.makedirs(figures_dir, exist_ok=True)
    keys = ['random_init', 'magnitude_init'] + [sr_key(s) for s in schedules]
    labels = {'random_init': 'random init', 'magnitude_init': 'magnitude init'}
    labels.update({sr_key(s): f'magnitude + SR {s}' for s in schedules})
    d = 100 * dense['accuracy']
    n = len(sparsities)

    labels['magnitude_third'] = 'magnitude init, 1/3 of the epochs'
    # accuracy vs epoch
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, s in zip(axes[0], sparsities):
        late = [d - 1]  # accuracies after the first epoch set the lower y limit
        for k in keys[:2] + ['magnitude_third'] + keys[2:]:
            r = rows.get(row_key(model_name, s, k))
            if r:
                late += [100 * p['accuracy'] for p in r['curve'] if p['epoch'] >= 1]
                ax.plot(
                    [p['epoch'] for p in r['curve']],
                    [100 * p['accuracy'] for p in r['curve']],
                    '.--' if k == 'magnitude_third' else '.-',
                    ms=3,
                    lw=1.2,
                    color=COLORS.get(k),
                    label=labels[k],
                )
        for k, mk in (('magnitude_oneshot', 'x'), ('magnitude_bn', 'o')):
            r = rows.get(row_key(model_name, s, k))
            if r:
                ax.plot(
                    [0],
                    [100 * r['final_accuracy']],
                    mk,
                    color='k',
                    ms=6,
                    label='one-shot magnitude' + (' + BN re-est.' if k == 'magnitude_bn' else ''),
                )
        ax.axhline(d, color='k', lw=0.8, ls='--', label='dense')
        ax.axhline(d - 100 * TARGET_DROP, color='gray', lw=0.8, ls=':', label='dense - 0.5 pt')
        ax.set_ylim(max(d - 30, min(late) - 1), d + 1)
        ax.set_title(f'{100 * s:g}% sparsity')
        ax.set_xlabel('search epoch')
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('test top-1 (%)')
    axes[0][-1].legend(fontsize=7, loc='lower right')
    fig.suptitle(
        f'{spec.label}\ntest accuracy during the search (lower values clipped)', fontsize=9
    )
    fig.tight_layout()
    fig.savefig(os.path.join(figures_dir, f'study_accuracy_{model_name}.png'), dpi=90)
    plt.close(fig)

    # flips per epoch and train loss, with and without SR
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 5.6), squeeze=False)
    for j, s in enumerate(sparsities):
        for k in keys:
            r = rows.get(row_key(model_name, s, k))
            if not r:
                continue
            size = r['steps_per_epoch'] // r['evals_per_epoch']
            x = (np.arange(len(r['flips']) // size) + 1) * size / r['steps_per_epoch']
            flips = windows(r['flips'], size).sum(1) * r['evals_per_epoch'] / r['kept'] * 100
            axes[0][j].plot(
                x, np.maximum(flips, 1e-3), '.-', ms=3, lw=1.2, color=COLORS.get(k), label=labels[k]
            )
            loss = windows(r['train_loss'], size).mean(1)
            axes[1][j].plot(x, loss, '.-', ms=3, lw=1.2, color=COLORS.get(k), label=labels[k])
        axes[0][j].set_yscale('log')
        axes[0][j].set_title(f'{100 * s:g}% sparsity')
        axes[0][j].grid(alpha=0.3)
        axes[1][j].grid(alpha=0.3)
        axes[1][j].set_xlabel('search epoch')
        axes[1][j].set_yscale('log')
    axes[0][0].set_ylabel('mask flips per epoch\n(% of kept weights)')
    axes[1][0].set_ylabel('train loss (window mean)')
    if axes[0][-1].get_legend_handles_labels()[0]:  # no search row done yet: nothing to label
        axes[0][-1].legend(fontsize=7)
    fig.suptitle(
        f'{spec.label}\nmask flips (0 drawn at 1e-3) and train loss, with and without the short '
        'restriction',
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(os.path.join(figures_dir, f'study_flips_loss_{model_name}.png'), dpi=90)
    plt.close(fig)


def _epochs(row, target):
    e = epochs_to_target(row, target)
    return '' if e is None else e


def analyse_beyond(study: Study, rows: dict, models, sparsities, results_dir) -> list[dict]:
    """Issue "Beyond the paper": one table per model, CSV study_beyond.csv."""
    out = []
    for model_name in models:
        spec = study.specs[model_name]
        _, dense = study.variables(spec)
        target = dense['accuracy'] - TARGET_DROP
        print(f'\n### {spec.label}: 2:4, ERK, Wanda\n')
        print(f'dense {100 * dense["accuracy"]:.2f}%, target (dense - 0.5 pt) {100 * target:.2f}%\n')
        print('| sparsity | method | test top-1 (%) | best (%) | epochs to dense-0.5 | kept | search s |')
        print('|---|---|---|---|---|---|---|')
        for s in [NM_SPARSITY] + list(sparsities):
            for m in beyond_methods(s):
                r = rows.get(row_key(model_name, s, m.key))
                if r is None:
                    continue
                e = _epochs(r, target) if m.search else ''
                cells = [
                    '2:4' if m.nm else f'{100 * s:g}%',
                    m.label,
                    f'{100 * r["final_accuracy"]:.2f}',
                    f'{100 * r["best_accuracy"]:.2f}' if m.search else '',
                    fmt_epochs(e if e != '' else None, r) if m.search else '',
                    str(r.get('kept', '')),
                    f'{r["search_seconds"]:.0f}' if m.search else '',
                ]
                print('| ' + ' | '.join(cells) + ' |')
                out.append(
                    {
                        'model': model_name,
                        'sparsity': s,
                        'nm': '2:4' if m.nm else '',
                        'allocation': m.allocation,
                        'method': m.key,
                        'dense_accuracy': dense['accuracy'],
                        'test_accuracy': r['final_accuracy'],
                        'best_accuracy': r.get('best_accuracy', ''),
                        'epochs_to_dense_minus_0.5': e,
                        'search_epochs': r.get('epochs', ''),
                        'kept': r.get('kept', ''),
                        'search_seconds': r.get('search_seconds', ''),
                        'wall_seconds': r['wall_seconds'],
                    }
                )
    benchlib.merge_csv(os.path.join(results_dir, 'study_beyond.csv'), out, models)
    return out


def analyse_distill(study: Study, rows: dict, models, sparsities, results_dir) -> list[dict]:
    """The search with labels beside the search without them (KL to the dense logits): test
    top-1, its gap to dense, and the search's time and step cost; CSV study_distill.csv."""
    out = []
    for model_name in models:
        spec = study.specs[model_name]
        for s in sparsities:
            got = [(m, rows.get(row_key(model_name, s, m.key))) for m in distill_methods()]
            got = [(m, r) for m, r in got if r is not None]
            if not got:
                continue
            print(f'\n### {spec.label}, {100 * s:g}% sparsity: labels vs no labels\n')
            print('| row | test top-1 (%) | vs dense (pt) | search (s) | ms / step |')
            print('|---|---|---|---|---|')
            for m, r in got:
                gap = 100 * (r['final_accuracy'] - r['dense_accuracy'])
                secs, ms = r.get('search_seconds'), r.get('ms_per_step')
                print(
                    f'| {m.label} | {100 * r["final_accuracy"]:.2f} | {gap:+.2f} | '
                    f'{"" if secs is None else f"{secs:.0f}"} | {"" if ms is None else f"{ms:.0f}"} |'
                )
                out.append(
                    {
                        'model': model_name,
                        'sparsity': s,
                        'method': m.key,
                        'labels': (m.teacher is None) if m.search else '',
                        'dense_accuracy': r['dense_accuracy'],
                        'test_accuracy': r['final_accuracy'],
                        'search_epochs': r.get('epochs', ''),
                        'search_seconds': '' if secs is None else secs,
                        'ms_per_step': '' if ms is None else ms,
                        'train_examples': r['train_examples'],
                        'test_examples': r['test_examples'],
                    }
                )
    if out:
        benchlib.write_csv(os.path.join(results_dir, 'study_distill.csv'), out)
    return out


def analyse_seeds(study: Study, rows: dict, models, results_dir) -> list[dict]:
    """Issue "The paper's claims at the paper's budget": mean +- std over seeds, epochs to
    dense - 0.5 and - 1 pt per seed, and the random / magnitude ratio; CSV study_seeds.csv."""
    out = []
    for model_name in models:
        spec = study.specs[model_name]
        _, dense = study.variables(spec)
        print(f'\n### {spec.label}: seeds {", ".join(map(str, SEEDS))} (search seed and train order), 90%\n')
        print('| init | test top-1 per seed (%) | mean +- std (%) | epochs to dense-0.5 per seed | epochs to dense-1 per seed |')
        print('|---|---|---|---|---|')
        by_init = {
            init: {
                sd: rows.get(row_key(model_name, 0.9, f'{init}_init' + (f'_seed{sd}' if sd else '')))
                for sd in SEEDS
            }
            for init in ('magnitude', 'random')
        }
        # claim 2 per seed, where random init never reaches the dense targets: the epoch at which
        # magnitude init first reaches the final accuracy of random init with the same seed
        to_random = {
            sd: epochs_to_target(m, by_init['random'][sd]['final_accuracy'])
            for sd, m in by_init['magnitude'].items()
            if m is not None and by_init['random'][sd] is not None
        }
        for init in ('magnitude', 'random'):
            got = [r for r in by_init[init].values() if r is not None]
            if not got:
                continue
            acc = np.array([r['final_accuracy'] for r in got])
            reach = {
                drop: [epochs_to_target(r, dense['accuracy'] - drop) for r in got]
                for drop in (0.005, 0.01)
            }
            fmt = lambda es, rs: ', '.join(fmt_epochs(e, r) for e, r in zip(es, rs))
            print(
                f'| {init} | {", ".join(f"{100 * a:.2f}" for a in acc)} | '
                f'{100 * acc.mean():.2f} +- {100 * acc.std(ddof=1) if len(acc) > 1 else 0:.2f} | '
                f'{fmt(reach[0.005], got)} | {fmt(reach[0.01], got)} |'
            )
            for r, a, e5, e10 in zip(got, acc, reach[0.005], reach[0.01]):
                out.append(
                    {
                        'model': model_name,
                        'sparsity': 0.9,
                        'init': init,
                        'seed': r['seed'],
                        'dense_accuracy': dense['accuracy'],
                        'test_accuracy': a,
                        'epochs_to_dense_minus_0.5': '' if e5 is None else e5,
                        'epochs_to_dense_minus_1': '' if e10 is None else e10,
                        'search_epochs': r['epochs'],
                        'search_seconds': r['search_seconds'],
                        'epochs_to_random_final': (
                            '' if init != 'magnitude' or to_random.get(r['seed']) is None
                            else to_random[r['seed']]
                        ),
                    }
                )
        if to_random:
            saving = {
                sd: by_init['random'][sd]['epochs'] / e if e else None for sd, e in to_random.items()
            }
            print(
                '\nClaim 2 per seed: magnitude init first reaches the final accuracy of random init '
                '(same seed) at epoch '
                + ', '.join(
                    f'{fmt_epochs(e, by_init["magnitude"][sd])} (seed {sd}'
                    + (f', {saving[sd]:.2f}x fewer epochs)' if saving[sd] else ')')
                    for sd, e in to_random.items()
                )
            )
    benchlib.merge_csv(os.path.join(results_dir, 'study_seeds.csv'), out, models)
    return out


# ----------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument(
        '--quick', action='store_true', help='tiny synthetic sizes (seconds), for the tests'
    )
    ap.add_argument('--out', default=None, help='row cache (default benchmarks/out/study[_quick])')
    ap.add_argument('--results-dir', default=None, help='CSV (default docs/results; quick: OUT)')
    ap.add_argument('--figures-dir', default=None, help='PNG (default docs/figures; quick: OUT)')
    ap.add_argument('--models', default='mlp,resnet32')
    ap.add_argument('--sparsities', default=None, help='default 0.9,0.95,0.98 (quick: 0.9)')
    ap.add_argument(
        '--schedules',
        default=','.join(CORE_SCHEDULES),
        help='short-restriction schedules run at every sparsity',
    )
    ap.add_argument(
        '--extra-schedules',
        default=','.join(EXTRA_SCHEDULES),
        help='more schedules, run last and only at --extra-sparsity',
    )
    ap.add_argument('--extra-sparsity', type=float, default=0.9)
    ap.add_argument('--report-only', action='store_true', help='no new rows: analyse those done')
    ap.add_argument(
        '--methods',
        default=None,
        help='run only these row methods (comma-separated keys, e.g. random_init), so that two '
        'processes can each take a row; the report still reads every finished row',
    )
    ap.add_argument(
        '--part',
        default='paper',
        choices=('paper', 'beyond', 'seeds', 'distill'),
        help="paper: the paper's claims (tables.md, study_*.csv); beyond: 2:4, ERK and Wanda "
        '(study_beyond.csv); seeds: the headline searches with 3 seeds (study_seeds.csv); '
        'distill: the search with labels and without (KL to the dense model; study_distill.csv)',
    )
    args = ap.parse_args(argv)
    name = 'study_quick' if args.quick else 'study'
    args.out = args.out or os.path.join(benchlib.HERE, 'out', name)
    results_dir = args.results_dir or (
        args.out if args.quick else os.path.join(benchlib.ROOT, 'docs', 'results')
    )
    figures_dir = args.figures_dir or (
        args.out if args.quick else os.path.join(benchlib.ROOT, 'docs', 'figures')
    )
    models = [m for m in args.models.split(',') if m]
    sparsities = [
        float(s) for s in (args.sparsities or ('0.9' if args.quick else '0.9,0.95,0.98')).split(',')
    ]
    schedules = [s for s in args.schedules.split(',') if s]
    extras = [s for s in args.extra_schedules.split(',') if s and s not in schedules]
    os.makedirs(args.out, exist_ok=True)

    study = Study(args)
    t0 = time.time()
    print(
        f'machine: {benchlib.machine()}; load average {benchlib.load_average()}; '
        f'ljax {benchlib.git_revision()}',
        flush=True,
    )
    unknown = [m for m in models if m not in study.specs]
    if unknown:
        raise SystemExit(
            f'error: --models: unknown {unknown}; expected some of {sorted(study.specs)}'
        )
    if args.part == 'beyond':
        plan = [
            (m, s, meth)
            for m in models
            for s in [NM_SPARSITY] + sparsities
            for meth in [Method('dense', 'dense (pre-trained)', False)] + beyond_methods(s)
        ]
    elif args.part == 'seeds':
        plan = [(m, 0.9, meth) for m in models for meth in seed_methods()]
    elif args.part == 'distill':
        plan = [(m, s, meth) for m in models for s in sparsities for meth in distill_methods()]
    else:
        plan = [(m, s, meth) for m in models for s in sparsities for meth in methods(schedules)]
        plan += [
            (m, args.extra_sparsity, meth)
            for m in models
            for meth in methods(extras)
            if meth.key.startswith('sr_')
        ]
    only = [m for m in (args.methods or '').split(',') if m]
    known = {meth.key for _, _, meth in plan}
    if set(only) - known:
        raise SystemExit(
            f'error: --methods: unknown {sorted(set(only) - known)}; expected some of {sorted(known)}'
        )
    rows = {}
    for model_name, s, meth in plan:
        path = os.path.join(args.out, 'rows', row_key(model_name, s, meth.key) + '.json')
        if (args.report_only or (only and meth.key not in only)) and not os.path.exists(path):
            continue
        rows[row_key(model_name, s, meth.key)] = study.run_row(study.specs[model_name], s, meth)
    ran = time.time() - t0
    if args.part == 'beyond':
        analyse_beyond(study, rows, models, sparsities, results_dir)
    elif args.part == 'seeds':
        analyse_seeds(study, rows, models, results_dir)
    elif args.part == 'distill':
        analyse_distill(study, rows, models, sparsities, results_dir)
    else:
        analyse(study, rows, models, sparsities, schedules, extras, results_dir, figures_dir)
    runs_path = os.path.join(args.out, 'runs.json')
    runs = benchlib.read_json(runs_path) if os.path.exists(runs_path) else []
    runs.append(
        {
            'started': t0,
            'seconds': time.time() - t0,
            'rows_seconds': ran,
            'machine': benchlib.machine(),
            'load_average_end': benchlib.load_average(),
        }
    )
    benchlib.write_json(runs_path, runs)
    row_total = sum(r['wall_seconds'] for r in rows.values())
    pretrain = sum(
        benchlib.read_json(os.path.join(args.out, f'dense_{m}.json')).get('pretrain_seconds', 0.0)
        for m in models
        if os.path.exists(os.path.join(args.out, f'dense_{m}.json'))
    )
    print(
        f'\nrows: {len(rows)}, their wall time {row_total:.0f} s + pretraining {pretrain:.0f} s; '
        f'this invocation {time.time() - t0:.0f} s; results in {results_dir}, figures in {figures_dir}',
        flush=True,
    )
    return rows


if __name__ == '__main__':
    main()
