"""Which kernels are prunable, how many weights each keeps, and the initial scores.

Layers are named by their path in `params` joined with '/', e.g. 'Conv_0/kernel'. Sparsity is the
fraction of prunable weights *removed* (0.9 keeps 10%).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from ljax import masks, nm as nm_lib
from ljax.modelfn import ModelFn, model_fn

PrunablePredicate = Callable[[tuple, Any], bool]
_LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.ConvLocal)


def flatten(params) -> dict[str, Any]:
    """{'a/b/kernel': leaf} in the flattening order of the pytree (sorted keys)."""
    return traverse_util.flatten_dict(unfreeze(params), sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep='/')


def called_layers(model: nn.Module, variables, x) -> list[str]:
    """Paths ('block/Dense_0') of the flax.linen Dense/Conv modules in the order the model calls
    them (a linen-only utility for benchmarks; detection uses `find_kernels`)."""
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


# ---------------------------------------------------------------- kernels, from the computation
# Ops that only move, cast or select a weight's values: a kernel reshaped to (kh*kw*in, out) for a
# patches + matmul convolution is still that kernel.
_VIEW_OPS = frozenset(
    {
        'reshape', 'transpose', 'convert_element_type', 'broadcast_in_dim', 'squeeze',
        'expand_dims', 'slice', 'dynamic_slice', 'gather', 'rev', 'copy', 'copy_p', 'concatenate',
        'pad', 'reduce_precision', 'sharding_constraint', 'device_put', 'optimization_barrier',
    }
)  # fmt: skip
_PRODUCTS = frozenset({'dot_general', 'conv_general_dilated'})
_NONE: frozenset = frozenset()


def _union(sets) -> frozenset:
    return frozenset().union(*sets)


class _Trace:
    """Follows parameters through a jaxpr. Per variable: `view`, the params it is a shape-only
    view of; `last`, the params of the weight products it depends on with no other weight product
    in between. A weight product (dot_general / conv with a param view as an operand) marks those
    params as kernels."""

    def __init__(self):
        self.kernels: set[str] = set()

    def run(self, jaxpr, inputs):
        jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)  # ClosedJaxpr -> Jaxpr; consts hold no params
        env = dict(zip(jaxpr.invars, inputs))

        def read(v):
            return env.get(v, (_NONE, _NONE)) if isinstance(v, jex.Var) else (_NONE, _NONE)

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self._eqn(eqn, ins)
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, ins):
        n = len(eqn.outvars)
        views, lasts = [i[0] for i in ins], [i[1] for i in ins]
        name, p = eqn.primitive.name, eqn.params
        if name in _PRODUCTS and any(views):
            self.kernels |= _union(views)
            return [(_NONE, _union(views))] * n
        if name in _VIEW_OPS:
            return [(_union(views), _union(lasts))] * n
        if 'branches' in p:  # cond: the index, then the operands of every branch
            runs = [self.run(b, ins[1:]) for b in p['branches']]
            return [tuple(_union(r[i][j] for r in runs) for j in (0, 1)) for i in range(n)]
        if name == 'scan':
            consts, k = p['num_consts'], p['num_carry']
            return self._loop(p['jaxpr'], ins[:consts], ins[consts : consts + k], ins[consts + k :])
        if name == 'while':
            c = p['cond_nconsts']
            body = ins[c : c + p['body_nconsts']]
            return self._loop(p['body_jaxpr'], body, ins[c + p['body_nconsts'] :], [])
        for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):  # jit, remat, custom_jvp/vjp, call
            sub = p.get(key)
            sub_jaxpr = getattr(sub, 'jaxpr', sub)
            if isinstance(sub_jaxpr, jex.Jaxpr) and len(sub_jaxpr.invars) == len(ins):
                return self.run(sub, ins)
        return [(_NONE, _union(lasts))] * n  # anything else computes: views end here

    def _loop(self, body, consts, carry, xs):
        """A loop body run to a fixed point: the carry that comes out goes back in."""
        while True:
            outs = self.run(body, list(consts) + list(carry) + list(xs))
            new = [(a[0] | b[0], a[1] | b[1]) for a, b in zip(carry, outs)]
            if new == list(carry):
                return outs
            carry = new


def find_kernels(fn, sample_x) -> tuple[list[str], frozenset[str]]:
    """(kernels, output kernels) of a `ModelFn` on input `sample_x`, traced abstractly.

    kernels: params (tree order) that reach a `dot_general` or `conv_general_dilated` operand
    through shape-only ops, also inside jit / remat / custom_jvp / custom_vjp / cond / scan.
    output kernels: those whose product the logits depend on with no other weight product in
    between (one name for a model with a single classifier).
    """
    params, stats = fn.variables['params'], fn.variables.get('batch_stats', {})
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in leaves]

    def logits(p):
        return fn.apply({'params': p, 'batch_stats': stats}, sample_x, train=False, rng=None)[0]

    closed = jax.make_jaxpr(logits)(params)
    trace = _Trace()
    outs = trace.run(closed, [(frozenset({n}), _NONE) for n in names])
    order = [n for n in flatten(params) if n in trace.kernels]
    return order, _union(o[1] for o in outs)


def classifier_name(fn, sample_x) -> str:
    """The kernel whose product feeds the logits of a `ModelFn`; ValueError naming `prunable=`
    when that is not exactly one parameter (never a guess)."""
    return _classifier(*find_kernels(fn, sample_x))


def _classifier(kernels, out) -> str:
    if len(out) == 1:
        return next(iter(out))
    why = (
        f'the products of {sorted(out)} all feed the output directly'
        if out
        else 'no matmul or convolution with a parameter operand feeds the output (kernels '
        f'found: {kernels[:6]})'
    )
    raise ValueError(
        f'prunable: cannot tell which kernel is the classifier: {why}; pass prunable=, a '
        'predicate (path tuple, leaf) -> bool that is true for the kernels to prune'
    )


def default_prunable(fn, *args) -> PrunablePredicate:
    """Every kernel (weight operand of a matmul or convolution) except the classifier.

    `default_prunable(fn: ModelFn, sample_x)`; `default_prunable(model, variables, sample_x)` for
    a linen module is the same through `model_fn`. Found from the computation, so pytree order,
    layer types and names do not matter (keys flatten as strings: 'Dense_11' < 'Dense_9').
    """
    if not isinstance(fn, ModelFn):
        variables, *args = args
        fn = model_fn(fn, variables)
    (sample_x,) = args
    kernels, out = find_kernels(fn, sample_x)
    chosen = frozenset(kernels) - {_classifier(kernels, out)}
    return lambda path, leaf: '/'.join(map(str, path)) in chosen


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


def erk_densities(shapes: Mapping[str, tuple], sparsity: float) -> dict[str, float]:
    """RigL's Erdos-Renyi-Kernel densities: d_l = min(1, eps * sum(shape_l) / prod(shape_l)),
    with eps such that sum_l d_l n_l = round((1-s) N).

    Found as jaxpruner's `sparsity_distributions.erk` does: solve eps over the layers not yet
    dense; if the largest density exceeds 1, make the layers with the largest ratio dense and
    solve again (eps only grows, so a layer made dense stays dense).
    """
    sizes = {n: int(np.prod(s)) for n, s in shapes.items()}
    ratio = {n: float(np.sum(s)) / sizes[n] for n, s in shapes.items()}
    budget = num_kept(sum(sizes.values()), sparsity)
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(sizes):
        rest = [n for n in sizes if n not in dense]
        eps = (budget - sum(sizes[n] for n in dense)) / sum(ratio[n] * sizes[n] for n in rest)
        top = max(ratio[n] for n in rest)
        if eps * top <= 1.0:
            break
        dense |= {n for n in rest if ratio[n] == top}
    return {n: 1.0 if n in dense else eps * ratio[n] for n in sizes}


def erk_kept(shapes: Mapping[str, tuple], sparsity: float) -> dict[str, int]:
    """Integer k_l of the ERK allocation summing to exactly round((1-s) N): floor of d_l n_l, the
    remaining units to the largest fractional parts (ties: earlier layer), as `uniform_kept`."""
    names = list(shapes)
    sizes = [int(np.prod(shapes[n])) for n in names]
    d = erk_densities(shapes, sparsity)
    exact = [min(d[n] * s, float(s)) for n, s in zip(names, sizes)]
    kept = [min(math.floor(e), s) for e, s in zip(exact, sizes)]
    extra = num_kept(sum(sizes), sparsity) - sum(kept)
    room = [i for i in range(len(names)) if kept[i] < sizes[i]]
    # float error may leave |extra| > #layers' fractions; cycle so the total is always exact
    order = sorted(room, key=lambda i: (-(exact[i] - kept[i]), i))
    while extra > 0 and order:
        for i in order[:extra]:
            kept[i] += 1
        extra = num_kept(sum(sizes), sparsity) - sum(kept)
        order = [i for i in order if kept[i] < sizes[i]]
    return dict(zip(names, kept))


def magnitude_masks(
    weights: Mapping[str, jax.Array], sparsity: float, allocation: str = 'global_magnitude'
) -> dict[str, jax.Array]:
    """Exact magnitude masks: `global_magnitude` (one threshold on |w| over all layers together,
    ties by tree order then row-major index), `uniform` or `erk` (k_l from `uniform_kept` or
    `erk_kept`, then the top-|w| within each layer)."""
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
    if allocation in ('uniform', 'erk'):
        if allocation == 'uniform':
            kept = uniform_kept({n: int(np.size(weights[n])) for n in names}, sparsity)
        else:
            kept = erk_kept({n: np.shape(weights[n]) for n in names}, sparsity)
        return {
            n: masks.topk_mask(jnp.abs(jnp.asarray(weights[n], jnp.float32)), kept[n])
            for n in names
        }
    raise ValueError(
        f"allocation: expected 'global_magnitude', 'uniform' or 'erk', got {allocation!r}"
    )


# ------------------------------------------------------------------------------------- Wanda
def wanda_scores(
    weights: Mapping[str, jax.Array], norms: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
    """Wanda's |w_ij| * ||X_i||_2 (float32), the input norm broadcast along axis -2 of each kernel
    (`ljax.calibration.input_norms`). For a conv (kh, kw, in, out) every (kh, kw) offset of input
    channel i gets that channel's norm over batch and spatial positions."""
    out = {}
    for n, w in weights.items():
        norm = jnp.asarray(norms[n], jnp.float32)
        if np.ndim(w) < 2 or norm.shape != (np.shape(w)[-2],):
            raise ValueError(
                f'wanda: kernel {n} of shape {np.shape(w)} needs input norms of shape '
                f'({np.shape(w)[-2] if np.ndim(w) > 1 else "?"},), got {norm.shape}'
            )
        out[n] = jnp.abs(jnp.asarray(w, jnp.float32)) * norm[:, None]
    return out


def column_kept(k: int, columns: int) -> np.ndarray:
    """Layer count k spread over the output columns: k // columns each, one more for the first
    k % columns columns (exactly k in all)."""
    q, r = divmod(int(k), int(columns))
    return np.array([q + 1] * r + [q] * (columns - r), np.int32)


def wanda_masks(
    weights: Mapping[str, jax.Array],
    norms: Mapping[str, jax.Array],
    kept: Mapping[str, int] | None = None,
    nm: tuple[int, int] | None = None,
) -> dict[str, jax.Array]:
    """The one-shot Wanda mask, compared within each output neuron (column j of a kernel
    (..., in, out): all its (..., i) entries). With `kept` (k_l of any allocation), column j keeps
    `column_kept(k_l, out)[j]` highest-scored entries (ties to the lower index), exactly k_l per
    layer; with `nm` = (N, M), the N:M form (groups along the input axis of each column)."""
    if (kept is None) == (nm is None):
        raise ValueError('wanda: pass exactly one of kept= (per-layer counts) and nm= (N, M)')
    scores = wanda_scores(weights, norms)
    if nm is not None:
        nm_lib.check_nm(nm, {n: np.shape(w) for n, w in weights.items()})
        return {n: nm_lib.nm_mask(s, nm[0], nm[1]) for n, s in scores.items()}
    out = {}
    for n, s in scores.items():
        if not 0 <= kept[n] <= s.size:
            raise ValueError(f'wanda: kept[{n!r}] = {kept[n]} outside [0, {s.size}]')
        cols = s.reshape(-1, s.shape[-1])
        cols = jnp.where(cols == 0, 0.0, cols)  # -0.0 ranks as +0.0
        order = jnp.argsort(-cols, axis=0, stable=True)  # stable: ties to the lower index
        rank = jnp.argsort(order, axis=0)
        want = jnp.asarray(column_kept(kept[n], cols.shape[1]))
        out[n] = (rank < want[None, :]).reshape(s.shape)
    return out


def mask_scores(mask: Mapping[str, jax.Array], margin: float = 0.01) -> dict[str, jax.Array]:
    """float32 scores 1.0 on `mask` and 1.0 - margin elsewhere: their layer-wise top-k (k = the
    mask's count) and their N:M top (for an N:M mask) are exactly `mask`."""
    return {n: jnp.where(m, 1.0, 1.0 - margin).astype(jnp.float32) for n, m in mask.items()}


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
    - 'wanda': the same form on the Wanda mask, passed as `magnitude` (`wanda_masks`);
    - 'random': Kaiming-uniform U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as edge-popup's
      `kaiming_uniform_(a=sqrt(5))`.
    """
    if kind in ('magnitude', 'wanda'):
        return mask_scores({n: magnitude[n] for n in weights}, margin)
    if kind == 'random':
        keys = jax.random.split(rng, len(weights))
        return {
            n: jax.random.uniform(key, np.shape(w), jnp.float32, -1.0, 1.0)
            / math.sqrt(fan_in(np.shape(w)))
            for key, (n, w) in zip(keys, weights.items())
        }
    raise ValueError(f"score_init: expected 'magnitude', 'wanda' or 'random', got {kind!r}")
