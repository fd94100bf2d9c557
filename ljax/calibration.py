"""Activation statistics on calibration data: for Wanda, the L2 norm of each kernel's input
features (`input_norms`); for SparseGPT, the Gram matrix X^T X of each kernel's input
(`input_grams`) and the order in which the model uses its kernels (`product_groups`).

`input_norms` evaluates the model's jaxpr in eval mode on real batches with a small interpreter
(jitted per input shape) and, at every `dot_general` / `conv_general_dilated` whose weight operand
is a shape-only view of a kernel (the views `ljax.sparsity.find_kernels` follows), takes the other
operand X. Which kernel input index (axis -2) each weight-operand entry comes from is found by
pushing an index array through the same view ops, so a kernel reshaped or transposed before its
product (a convolution written as patches + matmul) maps back to its input axis exactly.

Definition. For one product, let S_c be the sum of X^2 over every dimension of X except the
contracted (feature) ones, for each contracted position c, and i(c) the kernel input index that c
multiplies. The product adds mean_{c : i(c) = i} S_c to bin i; the norm is the square root of the
total over products and batches (float32 throughout):
- Dense: exactly ||X_i||_2 over all samples (and positions, for inputs with more axes);
- Conv (conv_general_dilated): the norm of input channel i over batch and spatial positions of the
  unpadded input (the lhs), the same for every (kh, kw) offset. Wanda's reference code prunes only
  linear layers; this per-channel norm is the natural extension (see `sparsity.wanda_scores`).
  A convolution staged per platform (`lax.platform_dependent`, as `ljax.models.layers` does) is
  measured on its default branch, the plain convolution;
- Conv written as patches + dot: the mean over the kh*kw offsets of the norms of the patch
  features, which equals the per-channel norm up to padding and stride at the borders.
A kernel used by several products (weight sharing) gets the sum of their statistics.
Not supported (ValueError naming the kernel): grouped/depthwise convolutions, a kernel whose axis
-2 is not the contracted axis of its product (an (out, in) matrix), a kernel used inside
scan / while / cond, and a kernel no product uses.

Gram matrices (`input_grams`, definition there) come from the same interpreter: the index pushed
through the views is the kernel's flat row over its axes before the last (the axis -2 index is
that row modulo shape[-2], so the norms are computed exactly as before), and each product adds
the Gram of its X, columns mapped to kernel rows. Convolutions are supported through their
patches: rows (kh, kw, in), F = kh*kw*in.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

from ljax.modelfn import ModelFn

_IDENTITY = frozenset(
    {'convert_element_type', 'copy', 'copy_p', 'reduce_precision', 'sharding_constraint',
     'device_put', 'optimization_barrier'}
)  # fmt: skip
_RESHAPE = frozenset(
    {'reshape', 'transpose', 'broadcast_in_dim', 'squeeze', 'expand_dims', 'slice',
     'dynamic_slice', 'gather', 'rev'}
)  # fmt: skip
# Primitives that call one jaxpr once on their operands (inlined); a call-like primitive not
# listed is inlined too when its 'jaxpr' / 'call_jaxpr' / 'fun_jaxpr' takes exactly its operands,
# except those that map or loop (_NOT_CALLS).
_CALLS = frozenset(
    {'jit', 'pjit', 'closed_call', 'core_call', 'remat', 'remat2', 'checkpoint',
     'custom_jvp_call', 'custom_vjp_call', 'custom_vjp_call_jaxpr'}
)  # fmt: skip
_NOT_CALLS = frozenset({'scan', 'while', 'cond', 'shard_map', 'xla_pmap', 'pmap'})


# What to do about a kernel whose inputs cannot be collected, per caller (error messages).
_HINT = {
    'input_norms': "use score_init='magnitude' or leave it out with prunable=",
    'input_grams': 'leave it out with prunable=',
    'product_groups': 'leave it out with prunable=',
}
_LAYOUT = {'input_norms': 'Wanda scores', 'input_grams': 'SparseGPT Hessians'}


def _name(path) -> str:
    return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _sub_jaxprs(params) -> list:
    out = []
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(getattr(x, 'jaxpr', x), jex.Jaxpr):
                out.append(x)
    return out


class _Interpreter:
    """Evaluates a jaxpr; `views` maps a variable to (kernel name, int32 array of the kernel's
    flat row index of each entry, -1 where no kernel entry). The flat row of entry
    (..., i, o) of a kernel of shape (..., in, out) is its row-major index over shape[:-1]
    (for a Dense kernel, i itself); the axis -2 index is row % in.

    At every product whose weight operand is a view of one kernel, records (kernel, the other
    operand) in `uses` (call order) and, for kernels in `norms`, the input norm statistics
    (`sums`), for kernels in `grams`, the Gram matrix of the input (`grams_out`); `consistent`
    says per used kernel whether its rows map to the contracted axis alone."""

    def __init__(
        self,
        shapes: dict[str, tuple],
        norms: frozenset = frozenset(),
        grams: frozenset = frozenset(),
        who: str = 'input_norms',
    ):
        self.sizes = {n: int(s[-2]) for n, s in shapes.items()}
        self.rows = {n: math.prod(s[:-1]) for n, s in shapes.items()}
        self.norms, self.grams, self.who = norms, grams, who
        self.sums: dict[str, jax.Array] = {}
        self.grams_out: dict[str, jax.Array] = {}
        self.consistent: dict[str, jax.Array] = {}
        self.uses: list[tuple[str, Any]] = []

    def run(self, jaxpr, consts, args, views):
        jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
        env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
        view_env = {v: w for v, w in zip(jaxpr.invars, views) if w is not None}

        def read(v):
            return v.val if isinstance(v, jex.Literal) else env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            in_views = [view_env.get(v) if isinstance(v, jex.Var) else None for v in eqn.invars]
            outs, out_views = self._eqn(eqn, ins, in_views)
            env.update(zip(eqn.outvars, outs))
            view_env.update({v: w for v, w in zip(eqn.outvars, out_views) if w is not None})
        return [read(v) for v in jaxpr.outvars], [
            view_env.get(v) if isinstance(v, jex.Var) else None for v in jaxpr.outvars
        ]

    def _eqn(self, eqn, ins, views):
        name, p, n_out = eqn.primitive.name, eqn.params, len(eqn.outvars)
        if name == 'cond' and p.get('branches_platforms'):
            # `lax.platform_dependent` (ljax.models.layers: oneDNN or im2col on CPU, XLA's
            # convolution elsewhere): the branches compute the same function, so follow the
            # default one (the plain convolution), whatever platform this runs on.
            platforms = p['branches_platforms']
            i = next((k for k, pl in enumerate(platforms) if pl is None), None)
            if i is None:
                i = next(
                    (k for k, pl in enumerate(platforms) if jax.default_backend() in pl), 0
                )
            branch = p['branches'][i]
            return self.run(branch.jaxpr, branch.consts, ins[1:], views[1:])
        sub = next((p[k] for k in ('jaxpr', 'call_jaxpr', 'fun_jaxpr') if k in p), None)
        inner = getattr(sub, 'jaxpr', sub)
        if name in _CALLS or (
            name not in _NOT_CALLS
            and isinstance(inner, jex.Jaxpr)
            and len(inner.invars) == len(ins)
        ):
            return self.run(sub, getattr(sub, 'consts', []), ins, views)
        outs = eqn.primitive.bind(*ins, **p)
        outs = list(outs) if eqn.primitive.multiple_results else [outs]
        if not any(views):
            return outs, [None] * n_out
        kernels = {v[0] for v in views if v is not None}
        if name in ('dot_general', 'conv_general_dilated'):
            if len(kernels) == 1 and sum(v is not None for v in views) == 1:
                self._record(name, p, ins, views)
            return outs, [None] * n_out
        if name in _IDENTITY:
            return outs, list(views[:n_out])
        if name in _RESHAPE and views[0] is not None and len(kernels) == 1:
            idx = eqn.primitive.bind(views[0][1], *ins[1:], **p)
            return outs, [(views[0][0], idx)]
        if name == 'pad' and views[0] is not None:
            return outs, [(views[0][0], eqn.primitive.bind(views[0][1], jnp.int32(-1), **p))]
        if name == 'concatenate' and len(kernels) == 1:
            blank = [jnp.full(np.shape(a), -1, jnp.int32) for a in ins]
            parts = [v[1] if v else b for v, b in zip(views, blank)]
            return outs, [(next(iter(kernels)), eqn.primitive.bind(*parts, **p))]
        if _sub_jaxprs(p):
            raise ValueError(
                f'{self.who}: kernel {sorted(kernels)[0]} is used inside {name}; its input '
                f'statistics are not collected there ({_HINT[self.who]})'
            )
        return outs, [None] * n_out  # anything else computes: the view ends

    def _record(self, name, p, ins, views):
        k = 0 if views[0] is not None else 1
        kernel, rows = views[k]
        x = ins[1 - k]
        if name == 'dot_general':
            (lc, rc), (lb, rb) = p['dimension_numbers']
            (xc, kc), (xb, kb) = ((rc, lc), (rb, lb)) if k == 0 else ((lc, rc), (lb, rb))
        else:
            lhs, rhs, _ = p['dimension_numbers']
            if k == 0 or p['feature_group_count'] != 1 or p['batch_group_count'] != 1:
                raise ValueError(
                    f'{self.who}: kernel {kernel} is a grouped (depthwise) convolution or the '
                    f'input of one; not supported ({_HINT[self.who]})'
                )
            (xc, kc), (xb, kb) = ((lhs[1],), (rhs[1],)), ((), ())
        self.uses.append((kernel, x))
        same = True
        if kernel in self.norms:
            # axis -2 index of each entry (-1 stays -1): the statistics below are unchanged
            # from those computed on an axis -2 index view
            idx = jnp.where(rows >= 0, rows % self.sizes[kernel], -1)
            same = self._norm(kernel, x, idx, xc, kc, xb, kb)
        if kernel in self.grams:
            same = same & self._gram(kernel, name, p, x, rows, xc, kc, xb, kb)
        self.consistent[kernel] = self.consistent.get(kernel, True) & same

    def _norm(self, kernel, x, idx, xc, kc, xb, kb):
        x = jnp.asarray(x, jnp.float32) ** 2
        keep = tuple(xb) + tuple(xc)
        free = tuple(d for d in range(x.ndim) if d not in keep)
        s = jnp.sum(jnp.transpose(x, keep + free), axis=tuple(range(len(keep), x.ndim)))
        kkeep = tuple(kb) + tuple(kc)
        kfree = tuple(d for d in range(idx.ndim) if d not in kkeep)
        idx = jnp.transpose(idx, kkeep + kfree)
        first = idx[(Ellipsis,) + (0,) * len(kfree)]
        same = jnp.all(idx == first.reshape(first.shape + (1,) * len(kfree)))
        seg = jnp.where(first >= 0, first, self.sizes[kernel]).reshape(-1)
        n = self.sizes[kernel] + 1  # the last bin takes entries from no kernel (padding)
        sums = jax.ops.segment_sum(s.reshape(-1), seg, n)[:-1]
        counts = jax.ops.segment_sum(jnp.ones_like(s).reshape(-1), seg, n)[:-1]
        contrib = sums / jnp.maximum(counts, 1.0)
        self.sums[kernel] = self.sums.get(kernel, 0.0) + contrib
        return same

    def _gram(self, kernel, name, p, x, rows, xc, kc, xb, kb):
        """Adds X^T X over this product's input to `grams_out[kernel]` (F, F), F the kernel's
        flat rows. X has one column per contracted position c (for a convolution: per patch
        feature, channel x filter offset) and one row per everything else (samples, positions);
        with batch dimensions, one X per batch index. Column c multiplies kernel row r(c), so
        the product equals X_eff W_rows with X_eff[:, r] = sum_{c: r(c) = r} X[:, c], whose Gram
        P^T (X^T X) P is the scatter-add of X^T X into (r(c), r(c')) (exact for any map r,
        positions of no kernel entry, r = -1, dropped)."""
        x = jnp.asarray(x, jnp.float32)
        hi = lax.Precision.HIGHEST  # no reduced-precision passes (TF32 on GPUs) for a Hessian
        if name == 'conv_general_dilated':
            lhs, rhs, _ = p['dimension_numbers']
            patches = lax.conv_general_dilated_patches(
                jnp.transpose(x, lhs),  # (N, C, *spatial): features come out (C, *filter)
                [rows.shape[d] for d in rhs[2:]],
                p['window_strides'],
                p['padding'],
                p['lhs_dilation'],
                p['rhs_dilation'],
                precision=hi,
            )
            x3 = jnp.moveaxis(patches, 1, -1).reshape(1, -1, patches.shape[1])
            kb, kc = (), (rhs[1],) + tuple(rhs[2:])  # rows: (in, *filter), as the patches
        else:
            free = tuple(d for d in range(x.ndim) if d not in tuple(xb) + tuple(xc))
            b = math.prod(x.shape[d] for d in xb)
            c = math.prod(x.shape[d] for d in xc)
            x3 = jnp.transpose(x, tuple(xb) + free + tuple(xc)).reshape(b, -1, c)
        kkeep = tuple(kb) + tuple(kc)
        kfree = tuple(d for d in range(rows.ndim) if d not in kkeep)
        rows = jnp.transpose(rows, kkeep + kfree)
        first = rows[(Ellipsis,) + (0,) * len(kfree)]
        same = jnp.all(rows == first.reshape(first.shape + (1,) * len(kfree)))
        f = self.rows[kernel]
        seg = jnp.where(first >= 0, first, f).reshape(x3.shape[0], x3.shape[2])
        g = jnp.einsum('brc,brd->bcd', x3, x3, precision=hi)
        # scatter rows, then columns: two segment sums of whole rows (not C^2 scalar updates)
        by_col = jax.vmap(lambda gb, sb: jax.ops.segment_sum(gb.T, sb, f + 1).T)(g, seg)
        h = jax.ops.segment_sum(by_col.reshape(-1, f + 1), seg.reshape(-1), f + 1)
        self.grams_out[kernel] = self.grams_out.get(kernel, 0.0) + h[:f, :f]
        return same


def _x(batch) -> Any:
    if isinstance(batch, Mapping):
        return batch.get('image', batch.get('x'))
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _kernels(variables: Mapping, names, who: str) -> tuple[list[str], dict[str, tuple]]:
    """(every params leaf's name in flattening order, {requested name: shape}); ValueError for
    a name that is no parameter or no kernel (..., in, out)."""
    leaves = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
    leaf_names = [_name(path) for path, _ in leaves]
    shapes = {n: tuple(np.shape(w)) for n, (_, w) in zip(leaf_names, leaves)}
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(f'{who}: no parameter {missing[0]!r}; params hold {leaf_names[:6]}')
    flat = [n for n in names if len(shapes[n]) < 2]
    if flat:
        raise ValueError(
            f'{who}: {flat[0]} of shape {shapes[flat[0]]} is not a kernel (..., in, out)'
        )
    return leaf_names, {n: shapes[n] for n in names}


def _row_indices(shapes) -> dict[str, jax.Array]:
    """{kernel: int32 array of its shape without the last axis, each entry its flat row}."""
    return {
        n: jnp.arange(math.prod(s[:-1]), dtype=jnp.int32).reshape(s[:-1])
        for n, s in shapes.items()
    }


def _interpret(fn: ModelFn, leaf_names, shapes, p, b, x, rows=None, **kinds) -> _Interpreter:
    """Runs the model's eval-mode jaxpr on (params p, batch_stats b, x) through `_Interpreter`
    with views of the kernels in `shapes`; `kinds`: its norms= / grams= / who=. `rows`
    (`_row_indices(shapes)`) is best passed in as an argument of a jitted caller: built inside,
    every index computation is a constant that XLA folds at compile time, a 784x768 kernel's
    taking over a second of the compilation."""

    def logits(p, b, x):
        return fn.apply({'params': p, 'batch_stats': b}, x, train=False, rng=None)[0]

    closed = jax.make_jaxpr(logits)(p, b, x)
    rows = _row_indices(shapes) if rows is None else rows
    views = []
    for n in leaf_names:
        if n in shapes:
            views.append((n, jnp.broadcast_to(rows[n][..., None], shapes[n])))
        else:
            views.append(None)
    views += [None] * (len(closed.jaxpr.invars) - len(views))
    interp = _Interpreter(shapes, **kinds)
    interp.run(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves((p, b, x)), views)
    return interp


def _collect(fn, variables, batches, names, *, norms: bool, grams: bool, who: str):
    """({name: summed norm statistics}, {name: summed Gram}) over `batches`, one jitted
    interpreter step per batch shape."""
    params, stats = variables['params'], variables.get('batch_stats') or {}
    leaf_names, shapes = _kernels(variables, names, who)
    kinds = {
        'norms': frozenset(names) if norms else frozenset(),
        'grams': frozenset(names) if grams else frozenset(),
        'who': who,
    }

    def statistics(p, b, x, rows):
        interp = _interpret(fn, leaf_names, shapes, p, b, x, rows, **kinds)
        return interp.sums, interp.grams_out, interp.consistent

    step = jax.jit(statistics)
    rows = _row_indices(shapes)
    sums_total: dict[str, jax.Array] = {}
    grams_total: dict[str, jax.Array] = {}
    seen = False
    for batch in batches:
        sums, gram, consistent = step(params, stats, jnp.asarray(_x(batch)), rows)
        unused = [n for n in names if n not in consistent]
        if unused:
            raise ValueError(
                f'{who}: {unused[0]} is not the weight operand of any matmul or convolution '
                'of the model in eval mode'
            )
        bad = [n for n in names if not bool(consistent[n])]
        if bad:
            raise ValueError(
                f'{who}: kernel {bad[0]}: its axis -2 is not the contracted (input) axis '
                f'of its product; {_LAYOUT[who]} assume flax layout (..., in, out)'
            )
        if norms:
            sums_total = {n: sums_total.get(n, 0.0) + sums[n] for n in names}
        if grams:
            grams_total = {n: grams_total.get(n, 0.0) + gram[n] for n in names}
        seen = True
    if not seen:
        raise ValueError(f'{who}: no calibration batches')
    return sums_total, grams_total


def input_norms(
    fn: ModelFn, variables: Mapping, batches: Iterable, names: list[str]
) -> dict[str, jax.Array]:
    """{name: float32 (kernel.shape[-2],)}: the L2 norm of each kernel's input features over all
    `batches` (x arrays, (x, y, ...) tuples or {'image'/'x': ...} dicts), the model in eval mode
    (module docstring for the definition and what is not supported)."""
    total, _ = _collect(fn, variables, batches, names, norms=True, grams=False, who='input_norms')
    return {n: jnp.sqrt(total[n]).astype(jnp.float32) for n in names}


def input_grams(
    fn: ModelFn, variables: Mapping, batches: Iterable, names: list[str]
) -> dict[str, jax.Array]:
    """{name: float32 (F, F)}: the Gram matrix X^T X of each kernel's input over all `batches`
    (as `input_norms`), the model in eval mode; SparseGPT's layer Hessian (up to a factor 2).

    F = prod(kernel.shape[:-1]), the kernel's rows in row-major order of its axes before the
    last: a Dense (in, out) kernel has F = in and X = its input with every sample and position a
    row; a Conv (kh, kw, in, out) kernel has F = kh*kw*in (rows ordered (kh, kw, in), as
    kernel.reshape(F, out)) and X = the input's patches (strides, padding and dilations of the
    convolution), so that the product is X @ kernel.reshape(F, out). A kernel reshaped or
    transposed before its product (patches + matmul) maps back the same way; a kernel used by
    several products gets the sum of their Grams; a product with batch dimensions (a stacked
    kernel) contributes one Gram per batch index, on that index's rows. Memory: one (F, F)
    float32 array per requested kernel. Not supported (ValueError naming the kernel), as for
    `input_norms`: grouped/depthwise convolutions, a kernel whose axis -2 is not the contracted
    axis (an (out, in) matrix), a kernel used inside scan / while / cond, and a kernel no product
    uses."""
    _, total = _collect(fn, variables, batches, names, norms=False, grams=True, who='input_grams')
    return {n: jnp.asarray(total[n], jnp.float32) for n in names}


def product_groups(
    fn: ModelFn, variables: Mapping, sample_x, names: list[str]
) -> list[list[str]]:
    """The kernels `names` in the order the model first uses them (eval mode, order of the
    products in the traced jaxpr), grouped: a kernel whose first product reads the very same
    input array as an earlier group's first kernel (query / key / value on one activation, a
    shortcut convolution on its block's input) joins that group. Traced abstractly on
    `sample_x` (an x array or a batch in any form `input_norms` takes); a kernel no product uses
    is a ValueError, as for `input_grams`."""
    leaf_names, shapes = _kernels(variables, names, 'product_groups')
    groups: list[list[str]] = []

    def trace(p, b, x):
        interp = _interpret(fn, leaf_names, shapes, p, b, x, who='product_groups')
        inputs: list = []  # the input operand of each group's first kernel (kept alive: `is`)
        placed: set[str] = set()
        for kernel, operand in interp.uses:
            if kernel in placed:
                continue
            placed.add(kernel)
            i = next((j for j, o in enumerate(inputs) if o is operand), None)
            if i is None:
                inputs.append(operand)
                groups.append([kernel])
            else:
                groups[i].append(kernel)
        return jnp.zeros(())

    jax.eval_shape(
        trace, variables['params'], variables.get('batch_stats') or {}, jnp.asarray(_x(sample_x))
    )
    unused = [n for n in names if not any(n in g for g in groups)]
    if unused:
        raise ValueError(
            f'product_groups: {unused[0]} is not the weight operand of any matmul or convolution '
            'of the model in eval mode'
        )
    return groups
