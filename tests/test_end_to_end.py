"""End-to-end on real data (Fashion-MNIST from Debian's dataset-fashion-mnist): marked slow.

Run alone with `python -m pytest -m slow`; CI runs them with the rest.
"""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from ljax import data, search_jackpot
from ljax.search import Search

pytestmark = pytest.mark.slow


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = x.reshape(x.shape[0], -1)
        for _ in range(2):
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(256)(x)))
        return nn.Dense(10)(x)


def accuracy(model, variables, x, y):
    return float(np.mean(np.argmax(model.apply(variables, x, train=False), -1) == y))


@pytest.fixture(scope='module')
def fashion():
    raw = data.load_fashion_mnist_idx()
    norm = lambda a: (a.astype(np.float32) / 255 - 0.2860) / 0.3530
    (xtr, ytr), (xte, yte) = raw['train'], raw['test']
    return (
        norm(xtr[:12800]),
        ytr[:12800].astype(np.int32),
        norm(xte[:5000]),
        yte[:5000].astype(np.int32),
    )


def test_a_90_percent_jackpot_beats_magnitude_pruning_and_nears_dense(fashion):
    xtr, ytr, xte, yte = fashion
    model = MLP()
    variables = model.init(jax.random.key(0), xtr[:1], train=False)
    tx = optax.adam(1e-3)
    params, stats, opt = variables['params'], variables['batch_stats'], tx.init(variables['params'])

    @jax.jit
    def step(params, stats, opt, x, y):
        def loss_fn(p):
            logits, upd = model.apply(
                {'params': p, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd[
                'batch_stats'
            ]

        (_, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), stats, opt

    batches = [(xtr[i : i + 128], ytr[i : i + 128]) for i in range(0, len(ytr), 128)]
    for _ in range(5):
        for x, y in batches:
            params, stats, opt = step(params, stats, opt, x, y)
    dense = {'params': params, 'batch_stats': stats}
    dense_acc = accuracy(model, dense, xte, yte)

    # one-shot magnitude pruning (the search's step-0 mask), with the pre-trained BN statistics
    search = Search.create(model, dense, xtr[:1], sparsity=0.9, total_steps=1)
    magnitude_acc = accuracy(model, search.jackpot_variables(search.magnitude, stats), xte, yte)
    jackpot = search_jackpot(model, dense, batches, sparsity=0.9, epochs=4)
    jackpot_acc = accuracy(model, jackpot.variables, xte, yte)
    print(f'dense {dense_acc:.4f} magnitude {magnitude_acc:.4f} jackpot {jackpot_acc:.4f}')
    assert jackpot.sparsity == pytest.approx(0.9, abs=1e-6)
    assert jackpot_acc > magnitude_acc + 0.2
    assert jackpot_acc > dense_acc - 0.02
    for layer in ('Dense_0', 'Dense_1'):
        m = jackpot.mask[layer]['kernel']
        np.testing.assert_array_equal(
            np.asarray(jackpot.variables['params'][layer]['kernel'])[m],
            np.asarray(params[layer]['kernel'])[m],
        )
