"""How far a pruned sentence encoder's embeddings are from the dense model's (label-free metrics).

Every function takes float embeddings (n, d) with rows in the same order for both models:
- `mean_cosine(a, b)`: the mean over rows of the cosine of a_i and b_i;
- `nn_agreement(a, b, k)`: for each query i, the fraction of its k nearest neighbours (cosine
  similarity, i itself excluded) under `a` that are also among its k nearest under `b`, averaged
  over queries (1.0: the same neighbourhoods);
- `Probe`: a multinomial logistic regression (softmax over classes, L2 penalty) fitted by full-batch
  Adam in JAX on one model's embeddings; `probe.accuracy(x, labels)` scores any model's
  embeddings with it unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_pair(a, b) -> None:
    if np.ndim(a) != 2 or np.shape(a) != np.shape(b):
        raise ValueError(
            f'embeddings: expected two (n, d) arrays of the same shape, got {np.shape(a)} and '
            f'{np.shape(b)}'
        )


def mean_cosine(a, b) -> float:
    """Mean over rows of cos(a_i, b_i); a zero row counts as cosine 0."""
    _check_pair(a, b)
    return float(np.mean(np.sum(_unit(a) * _unit(b), axis=1)))


def nearest(x, k: int) -> np.ndarray:
    """int (n, k): each row's k nearest other rows by cosine similarity, nearest first (ties to
    the lower index); the row itself is never among them."""
    n = np.shape(x)[0]
    if not 1 <= k < n:
        raise ValueError(f'k: expected 1 <= k < {n} (the number of rows), got {k}')
    u = _unit(x)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    # A stable sort of -sim ranks equal similarities by index; argpartition first keeps it cheap.
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    cut = np.take_along_axis(sim, part, axis=1).min(axis=1, keepdims=True)
    out = np.empty((n, k), np.int64)
    for i in range(n):  # rows whose k-th similarity is tied need every candidate at the cut
        candidates = np.flatnonzero(sim[i] >= cut[i])
        order = np.argsort(-sim[i, candidates], kind='stable')
        out[i] = candidates[order[:k]]
    return out


def nn_agreement(a, b, k: int = 10) -> float:
    """Mean over queries of |NN_k(a) & NN_k(b)| / k (cosine neighbours, the query excluded)."""
    _check_pair(a, b)
    na, nb = nearest(a, k), nearest(b, k)
    shared = [len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(na, nb)]
    return float(np.mean(shared) / k)


@dataclasses.dataclass(frozen=True)
class Probe:
    """A linear softmax classifier: logits = x @ w + b."""

    w: np.ndarray  # (d, classes)
    b: np.ndarray  # (classes,)

    @classmethod
    def fit(
        cls,
        x,
        labels,
        num_classes: int,
        *,
        l2: float = 1e-4,
        steps: int = 500,
        lr: float = 0.05,
    ) -> 'Probe':
        """Fit on embeddings x (n, d) and integer labels in [0, num_classes): minimise the mean
        cross-entropy + l2 * ||w||^2 by `steps` full-batch Adam steps from zero (deterministic)."""
        x = jnp.asarray(x, jnp.float32)
        labels = np.asarray(labels)
        if x.ndim != 2 or labels.shape != (x.shape[0],):
            raise ValueError(
                f'probe: expected x (n, d) and labels (n,), got {x.shape} and {labels.shape}'
            )
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f'probe: labels outside [0, {num_classes})')
        y = jnp.asarray(labels, jnp.int32)
        params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
        opt = optax.adam(lr)

        def loss(p):
            logits = x @ p[0] + p[1]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + l2 * jnp.sum(p[0] ** 2)

        @jax.jit
        def run(params):
            def step(carry, _):
                p, s = carry
                g = jax.grad(loss)(p)
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), None

            (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
            return p

        w, b = run(params)
        return cls(np.asarray(w), np.asarray(b))

    def predict(self, x) -> np.ndarray:
        return np.argmax(np.asarray(x, np.float32) @ self.w + self.b, axis=1)

    def accuracy(self, x, labels) -> float:
        return float(np.mean(self.predict(x) == np.asarray(labels)))
