"""Activation statistics for Wanda: the L2 norm of each kernel's input features on calibration data.

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
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

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
    axis -2 index of each entry, -1 where no kernel entry)."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.sums: dict[str, jax.Array] = {}
        self.consistent: dict[str, jax.Array] = {}

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
                f'input_norms: kernel {sorted(kernels)[0]} is used inside {name}; its input '
                "statistics are not collected there (use score_init='magnitude' or leave it out "
                'with prunable=)'
            )
        return outs, [None] * n_out  # anything else computes: the view ends

    def _record(self, name, p, ins, views):
        k = 0 if views[0] is not None else 1
        kernel, idx = views[k]
        x = jnp.asarray(ins[1 - k], jnp.float32) ** 2
        if name == 'dot_general':
            (lc, rc), (lb, rb) = p['dimension_numbers']
            (xc, kc), (xb, kb) = ((rc, lc), (rb, lb)) if k == 0 else ((lc, rc), (lb, rb))
        else:
            lhs, rhs, _ = p['dimension_numbers']
            if k == 0 or p['feature_group_count'] != 1 or p['batch_group_count'] != 1:
                raise ValueError(
                    f'input_norms: kernel {kernel} is a grouped (depthwise) convolution or the '
                    "input of one; not supported (use score_init='magnitude' or leave it out "
                    'with prunable=)'
                )
            (xc, kc), (xb, kb) = ((lhs[1],), (rhs[1],)), ((), ())
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
        self.consistent[kernel] = self.consistent.get(kernel, True) & same


def _x(batch) -> Any:
    if isinstance(batch, Mapping):
        return batch.get('image', batch.get('x'))
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def input_norms(
    fn: ModelFn, variables: Mapping, batches: Iterable, names: list[str]
) -> dict[str, jax.Array]:
    """{name: float32 (kernel.shape[-2],)}: the L2 norm of each kernel's input features over all
    `batches` (x arrays, (x, y, ...) tuples or {'image'/'x': ...} dicts), the model in eval mode
    (module docstring for the definition and what is not supported)."""
    params, stats = variables['params'], variables.get('batch_stats') or {}
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    leaf_names = [_name(path) for path, _ in leaves]
    shapes = {n: np.shape(w) for n, (_, w) in zip(leaf_names, leaves)}
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(f'input_norms: no parameter {missing[0]!r}; params hold {leaf_names[:6]}')
    flat = [n for n in names if len(shapes[n]) < 2]
    if flat:
        raise ValueError(
            f'input_norms: {flat[0]} of shape {shapes[flat[0]]} is not a kernel (..., in, out)'
        )
    sizes = {n: int(shapes[n][-2]) for n in names}

    def logits(p, b, x):
        return fn.apply({'params': p, 'batch_stats': b}, x, train=False, rng=None)[0]

    def statistics(p, b, x):
        closed = jax.make_jaxpr(logits)(p, b, x)
        views = []
        for n in leaf_names:
            if n in sizes:
                shape = shapes[n]
                ax = jnp.arange(shape[-2], dtype=jnp.int32)[:, None]
                views.append((n, jnp.broadcast_to(ax, shape[:-2] + (shape[-2], shape[-1]))))
            else:
                views.append(None)
        views += [None] * (len(closed.jaxpr.invars) - len(views))
        interp = _Interpreter(sizes)
        args = jax.tree_util.tree_leaves((p, b, x))
        interp.run(closed.jaxpr, closed.consts, args, views)
        return interp.sums, interp.consistent

    step = jax.jit(statistics)
    total: dict[str, jax.Array] = {}
    for batch in batches:
        sums, consistent = step(params, stats, jnp.asarray(_x(batch)))
        unused = [n for n in names if n not in sums]
        if unused:
            raise ValueError(
                f'input_norms: {unused[0]} is not the weight operand of any matmul or convolution '
                'of the model in eval mode'
            )
        bad = [n for n in names if not bool(consistent[n])]
        if bad:
            raise ValueError(
                f'input_norms: kernel {bad[0]}: its axis -2 is not the contracted (input) axis '
                'of its product; Wanda scores assume flax layout (..., in, out)'
            )
        total = {n: total.get(n, 0.0) + sums[n] for n in names}
    if not total:
        raise ValueError('input_norms: no calibration batches')
    return {n: jnp.sqrt(total[n]).astype(jnp.float32) for n in names}
