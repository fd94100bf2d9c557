"""Which kernels are prunable, how many weights each keeps, and the initial scores.

Layers are named by their path in `params` joined with '/', e.g. 'Conv_0/kernel'. Sparsity is the
fraction of prunable weights *removed* (0.9 keeps 10%).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from ljax import masks, nm as nm_lib
from ljax.modelfn import ModelFn, model_fn

PrunablePredicate = Callable[[tuple, Any], bool]


def flatten(params) -> dict[str, Any]:
    """{'a/b/kernel': leaf} in the flattening order of the pytree (sorted keys)."""
    return traverse_util.flatten_dict(unfreeze(params), sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep='/')


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
# View ops whose output has its (data) operand's dimensions, one for one.
_SAME_DIMS = frozenset(
    {'convert_element_type', 'copy', 'copy_p', 'reduce_precision', 'sharding_constraint',
     'device_put', 'optimization_barrier', 'slice', 'dynamic_slice', 'rev', 'pad', 'concatenate'}
)  # fmt: skip


def _union(sets) -> frozenset:
    return frozenset().union(*sets)


def _names(views) -> frozenset:
    """The params of views, sets of (param, layout) (`_Trace`)."""
    return frozenset(name for view in views for name, _ in view)


def _reshaped(layout: tuple, src: tuple, dst: tuple) -> tuple:
    """A layout carried through the row-major reshape src -> dst. Dims fall into the smallest
    runs of equal size on both sides (cut at the strides both shapes share); every dst dim of a
    run gets the kernel axes of all the run's src dims, and a dim of size 1 none."""
    strides = lambda s: {math.prod(s[k:]) for k in range(len(s) + 1)}
    cuts = sorted(strides(src) & strides(dst))
    run = lambda s, k: int(np.searchsorted(cuts, math.prod(s[k + 1 :]), side='right'))
    axes: dict[int, frozenset] = {}
    for k, a in enumerate(layout):
        if src[k] != 1:
            axes[run(src, k)] = axes.get(run(src, k), _NONE) | a
    return tuple(axes.get(run(dst, k), _NONE) if dst[k] != 1 else _NONE for k in range(len(dst)))


def _carried(eqn, i: int, layout, out: int = 0):
    """Operand i's layout carried through view op `eqn` to output `out`: per dimension, the
    kernel axes along which the entries vary; a str (the op) where that is lost."""
    name, p = eqn.primitive.name, eqn.params
    src, dst = eqn.invars[i].aval.shape, eqn.outvars[out].aval.shape
    if isinstance(layout, str):
        return layout
    if 0 in src or 0 in dst or not (i == out or name == 'concatenate'):
        return name  # a kernel as an index or shape operand (or empty): its axes are lost
    if name == 'transpose':
        return tuple(layout[d] for d in p['permutation'])
    if name == 'reshape':
        order = p.get('dimensions') or range(len(src))  # reshape's own transpose, first
        src, layout = tuple(src[d] for d in order), tuple(layout[d] for d in order)
        return _reshaped(layout, src, dst)
    if name == 'broadcast_in_dim':
        new = [_NONE] * len(dst)
        for d, a in zip(p['broadcast_dimensions'], layout):
            new[d] = a
        return tuple(new)
    if name == 'squeeze':
        return tuple(a for d, a in enumerate(layout) if d not in p['dimensions'])
    if name in _SAME_DIMS and len(src) == len(dst):
        return layout
    return name  # gather: the axes are mixed


def _carry(eqn, i: int, view: frozenset, out: int = 0) -> frozenset:
    """Operand i's view carried through view op `eqn` to output `out`."""
    return frozenset((q, _carried(eqn, i, layout, out)) for q, layout in view)


def _scan_operands(p, ins) -> tuple[list, list, list]:
    """(consts, carry, xs) of a scan's operands `ins`: jax 0.10 counts them (num_consts,
    num_carry), jax 0.12 groups them in a FlatTree (ft_in)."""
    if 'num_consts' in p:
        c, k = p['num_consts'], p['num_carry']
        return list(ins[:c]), list(ins[c : c + k]), list(ins[c + k :])
    return tuple(list(group) for group in p['ft_in'].update(list(ins)).unpack())


class _Trace:
    """Follows parameters through a jaxpr. Per variable: `view`, the params it is a shape-only
    view of, as (param, layout) pairs; `last`, the params of the weight products it depends on
    with no other weight product in between. A weight product (dot_general / conv with a param
    view as an operand) marks those params as kernels.

    A layout has, per dimension of the view, the frozenset of the param's axes along which its
    entries vary there (a str naming the op after which that is unknown). At each product,
    `inputs[param]` collects the param axes the product contracts (`_contracted`)."""

    def __init__(self, shapes: Mapping[str, tuple]):
        self.shapes = shapes
        self.kernels: set[str] = set()
        self.inputs: dict[str, set] = {}
        self.record = True  # False inside the non-default branches of `lax.platform_dependent`

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
            self.kernels |= _names(views)
            if self.record:
                for k, view in enumerate(views):
                    for param, layout in view:
                        self.inputs.setdefault(param, set()).add(
                            self._contracted(eqn, k, param, layout)
                        )
            return [(_NONE, _names(views))] * n
        if name in _VIEW_OPS:
            if name in ('device_put', 'optimization_barrier'):  # output i is operand i
                return [(_carry(eqn, i, views[i], i), _union(lasts)) for i in range(n)]
            return [(_union(_carry(eqn, i, v) for i, v in enumerate(views)), _union(lasts))] * n
        if 'branches' in p:  # cond: the index, then the operands of every branch
            default, record, runs = _default_branch(p), self.record, []
            for i, branch in enumerate(p['branches']):
                # the branches of `lax.platform_dependent` compute one function: its inputs are
                # those of the default (XLA's convolution), not of a CPU rewrite that contracts the
                # filter window too (im2col)
                self.record = record and default in (None, i)
                runs.append(self.run(branch, ins[1:]))
            self.record = record
            return [tuple(_union(r[i][j] for r in runs) for j in (0, 1)) for i in range(n)]
        if name == 'scan':  # xs and ys: the body sees one slice of the leading axis
            consts, carry, xs = _scan_operands(p, ins)
            xs = [(_shifted(v, -1), last) for v, last in xs]
            outs = self._loop(p['jaxpr'], consts, carry, xs)
            k = len(carry)
            return outs[:k] + [(_shifted(v, 1), last) for v, last in outs[k:]]
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

    def _contracted(self, eqn, k: int, param: str, layout):
        """The axes of `param` (sorted) that operand k of product `eqn` contracts, or a str
        saying why they cannot be told. A convolution's filter contracts its input-feature
        dimension: the window dimensions are the taps, along which N:M groups do not run."""
        name, p = eqn.primitive.name, eqn.params
        if isinstance(layout, str):
            return f'it reaches a {name} through {layout}, which mixes its axes'
        if len(layout) != len(eqn.invars[k].aval.shape):
            return f'its dimensions at a {name} are not its own (a mapped call)'
        if name == 'dot_general':
            dims = p['dimension_numbers'][0][k]
        elif k == 1:
            dims = (p['dimension_numbers'][1][1],)  # rhs_spec: (out, in, *window)
        else:
            return 'it is the input, not the filter, of a convolution'
        ins = _union(layout[d] for d in dims)
        rest = _union(a for d, a in enumerate(layout) if d not in dims)
        split = sorted(a for a in ins & rest if self.shapes[param][a] != 1)
        if split:
            return f'a {name} contracts part of its axis {split[0]} and keeps the rest'
        if not ins:
            return f'a {name} contracts none of its axes'
        return tuple(sorted(ins))


def _shifted(view: frozenset, by: int) -> frozenset:
    """A view with the leading dim of its layouts dropped (by=-1: a scan's slice of xs) or a new
    one, along no param axis, put in front (by=1: a scan's stacked ys)."""

    def move(layout):
        if isinstance(layout, str):
            return layout
        return layout[1:] if by < 0 else (_NONE,) + layout

    return frozenset((q, move(layout)) for q, layout in view)


def _default_branch(p) -> int | None:
    """The branch of a `lax.platform_dependent` cond that names no platform (None otherwise)."""
    platforms = p.get('branches_platforms') or ()
    return next((i for i, pl in enumerate(platforms) if pl is None), None)


class Traced:
    """One abstract trace of a model's logits (`trace_logits`): the logits' shapes (`output`, a
    pytree of ShapeDtypeStruct) and, followed through the jaxpr on first use, what
    `find_kernels`, `input_axes` and `default_prunable` read; a set-up traces the model once for
    all of them."""

    def __init__(self, closed, shapes: dict, params, output):
        self.closed, self.shapes, self.params, self.output = closed, shapes, params, output

    @functools.cached_property
    def _followed(self) -> tuple[_Trace, list]:
        trace = _Trace(self.shapes)
        own = {n: tuple(frozenset({a}) for a in range(len(s))) for n, s in self.shapes.items()}
        outs = trace.run(self.closed, [(frozenset({(n, own[n])}), _NONE) for n in self.shapes])
        return trace, outs

    @property
    def trace(self) -> _Trace:
        return self._followed[0]

    @property
    def outs(self) -> list:
        """(view, last) of each output leaf."""
        return self._followed[1]


def trace_logits(fn, sample_x) -> Traced:
    """The logits of a `ModelFn` on input `sample_x` (eval mode), traced abstractly once."""
    params, stats = fn.variables['params'], fn.variables.get('batch_stats', {})
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in leaves]
    shapes = {n: tuple(np.shape(w)) for n, (_, w) in zip(names, leaves)}

    def logits(p):
        return fn.apply({'params': p, 'batch_stats': stats}, sample_x, train=False, rng=None)[0]

    closed, output = jax.make_jaxpr(logits, return_shape=True)(params)
    return Traced(closed, shapes, params, output)


def find_kernels(fn, sample_x, traced: Traced | None = None) -> tuple[list[str], frozenset[str]]:
    """(kernels, output kernels) of a `ModelFn` on input `sample_x`, traced abstractly.

    kernels: params (tree order) that reach a `dot_general` or `conv_general_dilated` operand
    through shape-only ops, also inside jit / remat / custom_jvp / custom_vjp / cond / scan.
    output kernels: those whose product the logits depend on with no other weight product in
    between (one name for a model with a single classifier).
    """
    traced = traced or trace_logits(fn, sample_x)
    trace, params, outs = traced.trace, traced.params, traced.outs
    order = [n for n in flatten(params) if n in trace.kernels]
    return order, _union(o[1] for o in outs)


def input_axes(fn, sample_x, names, traced: Traced | None = None) -> dict[str, tuple[int, ...]]:
    """{name: the kernel's input axes, sorted}: the axes of each kernel in `names` that its
    products contract, found by tracing a `ModelFn` on `sample_x` as `find_kernels` does and
    mapping the contracted dimensions back through the shape-only ops to the kernel's axes.

    Dense (in, out): (0,); DenseGeneral / LinearGeneral query (in, heads, head_dim): (0,); their
    out projection (heads, head_dim, out): (0, 1); Conv (kh, kw, in, out): (2,), the input
    channels only (the window is the convolution's taps), also for ljax's platform-dependent
    convolutions (their default branch). ValueError naming the kernel and `prunable=` where that
    cannot be told: products that contract different axes of it, an op that mixes its axes
    (gather), a product that contracts part of an axis, a kernel no product uses.
    """
    inputs = (traced or trace_logits(fn, sample_x)).trace.inputs
    out = {}
    for n in names:
        found = inputs.get(n, set())
        why = next((f for f in found if isinstance(f, str)), None)
        if why is None and not found:
            why = 'it is the operand of no matmul or convolution of the model in eval mode'
        if why is None and len(found) > 1:
            why = f'its products contract different axes: {sorted(found)}'
        if why is not None:
            raise ValueError(
                f'nm: cannot tell the input axes of kernel {n}: {why}; leave it out with prunable='
            )
        out[n] = next(iter(found))
    return out


def classifier(kernels, out) -> str:
    """The kernel whose product feeds the logits, from `find_kernels`' (kernels, output kernels);
    ValueError naming `prunable=` when that is not exactly one parameter (never a guess)."""
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


def default_prunable(
    fn, *args, has_classifier: bool = True, traced: Traced | None = None
) -> PrunablePredicate:
    """Every kernel (weight operand of a matmul or convolution) except the classifier.

    `default_prunable(fn: ModelFn, sample_x)`; `default_prunable(model, variables, sample_x)` for
    a linen module is the same through `model_fn`. Found from the computation, so pytree order,
    layer types and names do not matter (keys flatten as strings: 'Dense_11' < 'Dense_9').
    has_classifier=False: the model has none (an embedding model): every kernel.
    """
    if not isinstance(fn, ModelFn):
        variables, *args = args
        fn = model_fn(fn, variables)
    (sample_x,) = args
    kernels, out = find_kernels(fn, sample_x, traced)
    chosen = frozenset(kernels) - ({classifier(kernels, out)} if has_classifier else set())
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
) -> dict[str, np.ndarray]:
    """Exact magnitude masks (NumPy bool, computed on the host: `masks.host_topk_mask`):
    `global_magnitude` (one threshold on |w| over all layers together, ties by tree order then
    row-major index), `uniform` or `erk` (k_l from `uniform_kept` or `erk_kept`, then the top-|w|
    within each layer)."""
    names = list(weights)
    mags = {n: np.abs(np.asarray(weights[n], np.float32)) for n in names}
    if allocation == 'global_magnitude':
        flat = np.concatenate([mags[n].reshape(-1) for n in names])
        keep = masks.host_topk_mask(flat, num_kept(flat.size, sparsity))
        bounds = np.cumsum([0] + [mags[n].size for n in names])
        return {
            n: keep[bounds[i] : bounds[i + 1]].reshape(mags[n].shape) for i, n in enumerate(names)
        }
    if allocation in ('uniform', 'erk'):
        if allocation == 'uniform':
            kept = uniform_kept({n: mags[n].size for n in names}, sparsity)
        else:
            kept = erk_kept({n: mags[n].shape for n in names}, sparsity)
        return {n: masks.host_topk_mask(mags[n], kept[n]) for n in names}
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
    axes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, jax.Array]:
    """The one-shot Wanda mask, compared within each output neuron (column j of a kernel
    (..., in, out): all its (..., i) entries). With `kept` (k_l of any allocation), column j keeps
    `column_kept(k_l, out)[j]` highest-scored entries (ties to the lower index), exactly k_l per
    layer; with `nm` = (N, M), the N:M form: groups along each kernel's input axes `axes[name]`
    (`input_axes`; None: axis -2), so each group lies within one output neuron. The scores need
    input norms along axis -2 (`wanda_scores`), so calibration refuses a kernel whose axis -2 is
    not its contracted axis (attention's (in, heads, head_dim) projections among them)."""
    if (kept is None) == (nm is None):
        raise ValueError('wanda: pass exactly one of kept= (per-layer counts) and nm= (N, M)')
    scores = wanda_scores(weights, norms)
    if nm is not None:
        nm_lib.check_nm(nm, {n: np.shape(w) for n, w in weights.items()}, axes)
        return {
            n: nm_lib.nm_mask(s, nm[0], nm[1], None if axes is None else axes[n])
            for n, s in scores.items()
        }
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


def mask_scores(mask: Mapping[str, jax.Array], margin: float = 0.01) -> dict[str, np.ndarray]:
    """float32 scores 1.0 on `mask` and 1.0 - margin elsewhere, made on the host: their
    layer-wise top-k (k = the mask's count) and their N:M top (for an N:M mask) are exactly
    `mask`."""
    low = np.float32(1.0 - margin)
    return {n: np.where(np.asarray(m, bool), np.float32(1.0), low) for n, m in mask.items()}


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
    The mask inits are NumPy (`mask_scores`), the random one is drawn with `rng`.
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
