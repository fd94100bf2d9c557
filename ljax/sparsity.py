"""Which kernels are prunable, how many weights each keeps, and the initial scores.

Layers are named by their path in `params` joined with '/', e.g. 'Conv_0/kernel'. Sparsity is the
fraction of prunable weights *removed* (0.9 keeps 10%).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from ljax import masks

PrunablePredicate = Callable[[tuple, Any], bool]
_LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.ConvLocal)


def flatten(params) -> dict[str, Any]:
    """{'a/b/kernel': leaf} in the flattening order of the pytree (sorted keys)."""
    return traverse_util.flatten_dict(unfreeze(params), sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep='/')


def called_layers(model: nn.Module, variables, x) -> list[str]:
    """Paths ('block/Dense_0') of the Dense/Conv modules in the order the model calls them.

    Runs `model.apply` abstractly (`jax.eval_shape`) under `nn.intercept_methods`: costs no compute.
    """
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == '__call__' and isinstance(context.module, _LAYER_TYPES):
            path = '/'.join(context.module.path)
            if path not in order:
                order.append(path)
        return next_fun(*args, **kwargs)

    def run(v, x):
        with nn.intercept_methods(record):
            return model.apply(v, x, train=False)

    jax.eval_shape(run, variables, x)
    return order


def default_prunable(model: nn.Module, variables, x) -> PrunablePredicate:
    """Every conv/dense kernel except the classifier: the last such layer the model *calls*.

    Pytree order is not call order (keys flatten as strings: 'Dense_11' < 'Dense_9', 'conv_init'
    after 'head'), so the call order is recorded. Falls back to the last kernel in tree order when
    no flax Dense/Conv module is called (hand-written `self.param` kernels).
    """
    kernels = [
        p
        for p, w in flatten(variables['params']).items()
        if p.endswith('kernel') and np.ndim(w) >= 2
    ]
    calls = called_layers(model, variables, x)
    classifier = f'{calls[-1]}/kernel' if calls else (kernels[-1] if kernels else None)
    chosen = frozenset(p for p in kernels if p != classifier)
    return lambda path, leaf: '/'.join(path) in chosen


def prunable_names(params, predicate: PrunablePredicate) -> list[str]:
    return [name for name, w in flatten(params).items() if predicate(tuple(name.split('/')), w)]


def num_kept(n: int, sparsity: float) -> int:
    """round((1 - s) * n), the number of weights kept out of n."""
    return int(round((1.0 - sparsity) * n))


def uniform_kept(sizes: Mapping[str, int], sparsity: float) -> dict[str, int]:
    """k_l close to (1-s) n_l in every layer, summing to exactly round((1-s) N).

    Largest-remainder rounding: each k_l is floor or ceil of (1-s) n_l; the ceil go to the layers
    with the largest fractional parts (ties: earlier layer).
    """
    names = list(sizes)
    exact = [(1.0 - sparsity) * sizes[n] for n in names]
    kept = [math.floor(e) for e in exact]
    extra = num_kept(sum(sizes.values()), sparsity) - sum(kept)
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - kept[i]), i))
    for i in order[: max(extra, 0)]:
        kept[i] += 1
    return {n: min(k, sizes[n]) for n, k in zip(names, kept)}


def magnitude_masks(
    weights: Mapping[str, jax.Array], sparsity: float, allocation: str = 'global_magnitude'
) -> dict[str, jax.Array]:
    """Exact magnitude masks: `global_magnitude` (one threshold on |w| over all layers together,
    ties by tree order then row-major index) or `uniform` (top-|w| within each layer)."""
    names = list(weights)
    if allocation == 'global_magnitude':
        flat = jnp.concatenate(
            [jnp.abs(jnp.asarray(weights[n], jnp.float32)).reshape(-1) for n in names]
        )
        keep = masks.topk_mask(flat, num_kept(flat.size, sparsity))
        bounds = np.cumsum([0] + [int(np.size(weights[n])) for n in names])
        return {
            n: keep[bounds[i] : bounds[i + 1]].reshape(np.shape(weights[n]))
            for i, n in enumerate(names)
        }
    if allocation == 'uniform':
        kept = uniform_kept({n: int(np.size(weights[n])) for n in names}, sparsity)
        return {
            n: masks.topk_mask(jnp.abs(jnp.asarray(weights[n], jnp.float32)), kept[n])
            for n in names
        }
    raise ValueError(f"allocation: expected 'global_magnitude' or 'uniform', got {allocation!r}")


def fan_in(kernel_shape) -> int:
    """Flax kernels put the output features last: fan-in is the product of the others."""
    return int(np.prod(kernel_shape[:-1])) if len(kernel_shape) > 1 else int(kernel_shape[0])


def init_scores(
    weights: Mapping[str, jax.Array],
    magnitude: Mapping[str, jax.Array],
    kind: str,
    rng: jax.Array,
    margin: float = 0.01,
) -> dict[str, jax.Array]:
    """float32 scores per layer.

    - 'magnitude': 1.0 on the magnitude mask and 1.0 - margin elsewhere (the authors' 1.00 / 0.99),
      so the initial top-k is exactly the magnitude mask;
    - 'random': Kaiming-uniform U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as edge-popup's
      `kaiming_uniform_(a=sqrt(5))`.
    """
    if kind == 'magnitude':
        return {n: jnp.where(magnitude[n], 1.0, 1.0 - margin).astype(jnp.float32) for n in weights}
    if kind == 'random':
        keys = jax.random.split(rng, len(weights))
        return {
            n: jax.random.uniform(key, np.shape(w), jnp.float32, -1.0, 1.0)
            / math.sqrt(fan_in(np.shape(w)))
            for key, (n, w) in zip(keys, weights.items())
        }
    raise ValueError(f"score_init: expected 'magnitude' or 'random', got {kind!r}")
