"""N:M structured masks: in every group of M consecutive weights along a kernel's INPUT axes
exactly N are kept, the input axes of each kernel as found from the computation
(`ljax.sparsity.input_axes`: the axes its matmul contracts, flattened row-major; a convolution's
input channels). Dense (in, out): axis 0; Conv (kh, kw, in, out): axis 2, groups per (kh, kw, out);
attention's query/key/value (in, heads, head_dim): axis 0; its out projection
(heads, head_dim, out): the flattened (heads, head_dim). Without axes, axis -2 (flax's Dense and
Conv layout). This is the layout of NVIDIA's 2:4 sparse tensor cores: as torch's (out, in) weight
(or (out, in, kh, kw) for a conv, grouped along in, as apex ASP does) every 4 consecutive inputs
hold 2 nonzeros.

Ranking within a group as in `ljax.masks`: higher score first, ties to the lower index along the
flattened input axes, +0.0 and -0.0 equal (NaN ranks as -inf). Selection is by pairwise
comparisons inside each group (M^2 comparisons per group, no sort), one fixed-cost vectorised
computation; everything here is pure and jit-able, `rate` may be traced.

Short restriction within groups (`nm_restrict`): T = nm_mask(scores), revive candidates T \\ mask,
prune candidates mask \\ T (c of each; per group they are equally many, as both hold N). With
r = ceil(rate * c) (as `ljax.restriction.num_swaps`), the r highest-ranked revive candidates of the
whole layer come in (exactly the revive side of the unstructured restriction, ties to the lower
row-major index of the kernel); in each group, as many prune candidates as came in there leave,
the lowest-ranked first. Equivalently: in each group pair the j-th best revive candidate with the
j-th worst prune candidate, and perform the r pairs whose revive candidate ranks highest across
the layer. Every group keeps exactly N; rate=1 gives nm_mask(scores), rate=0 the mask unchanged.

In a search: `sparsity.input_axes` and check_nm before anything; every layer keeps
k_l = size_l * N / M (sparsity 1 - N/M); the initial mask is nm_mask of the initial scores
(magnitude init: `nm_magnitude_masks`, then `sparsity.mask_scores` of it, whose nm_mask is that mask
again); each step calls `nm_restrict_all` where the unstructured search calls
`restriction.restrict_masks` (no threshold hints here).
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ljax import loop, masks
from ljax.reductions import count

Axes = tuple[int, ...]  # a kernel's input axes: sorted, distinct ints in [0, ndim)


def _input_axes(shape: tuple, axes, name: str = '') -> tuple[int, ...]:
    """`axes` checked against a kernel shape; None: (ndim - 2,), flax's Dense / Conv input axis."""
    if axes is None:
        return (len(shape) - 2,)
    axes = tuple(axes)
    ints = all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes)
    ok = bool(axes) and ints and list(axes) == sorted(set(axes))
    if not ok or not 0 <= axes[0] <= axes[-1] < len(shape):
        raise ValueError(
            f'nm: kernel {name or "?"} of shape {tuple(shape)}: expected its input axes as sorted '
            f'distinct ints in [0, {len(shape)}), got {axes!r}'
        )
    return tuple(int(a) for a in axes)


def _label(axes) -> str:
    if axes is None:
        return 'axis -2'
    return f'axis {axes[0]}' if len(axes) == 1 else f'axes {tuple(axes)} flattened'


def check_nm(nm, shapes: Mapping[str, tuple], axes: Mapping[str, Axes] | None = None) -> None:
    """ValueError unless nm = (N, M) are ints with 0 < N < M and every kernel in `shapes` has
    input axes (`axes[name]`, sorted; None: axis -2 of every kernel) whose flattened length
    divides by M."""
    ok = isinstance(nm, (tuple, list)) and len(nm) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in nm)
    if not ok or not 0 < nm[0] < nm[1]:
        raise ValueError(
            f'nm: expected a pair of ints (N, M) with 0 < N < M such as (2, 4), got {nm!r}'
        )
    m = nm[1]
    for name, shape in shapes.items():
        shape = tuple(shape)
        given = None if axes is None else axes[name]
        if given is None and len(shape) < 2:
            raise ValueError(
                f'nm: kernel {name} of shape {shape} has no input axis (-2) to group by {m}; '
                'leave it out with prunable='
            )
        size = math.prod(shape[a] for a in _input_axes(shape, given, name))
        if size % m:
            raise ValueError(
                f'nm: kernel {name} of shape {shape} has {size} inputs ({_label(given)}), '
                f'which do not divide into groups of {m}; leave it out with prunable='
            )


def _layout(shape: tuple, axes: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(perm, (..., in, out)): the transpose of a kernel of `shape` that brings its input axes
    together before its last other axis, and the shape that then flattens them into `in`. The
    other axes keep their order; for input axes (ndim - 2,) the transpose is the identity."""
    rest = [a for a in range(len(shape)) if a not in axes]
    lead, last = rest[:-1], rest[-1:]
    perm = tuple(lead) + tuple(axes) + tuple(last)
    flat = (math.prod(shape[a] for a in axes), shape[last[0]] if last else 1)
    return perm, tuple(shape[a] for a in lead) + flat


def _to_in_out(x: jax.Array, axes: Axes) -> jax.Array:
    """A kernel-shaped array as (..., in, out), its input axes flattened (row-major) into in."""
    perm, shape = _layout(x.shape, axes)
    return jnp.transpose(x, perm).reshape(shape)


def _from_in_out(y: jax.Array, shape: tuple, axes: Axes) -> jax.Array:
    """The inverse of `_to_in_out` for a kernel of `shape`."""
    perm, _ = _layout(shape, axes)
    return jnp.transpose(y.reshape(tuple(shape[a] for a in perm)), tuple(np.argsort(perm)))


def _grouped(x: jax.Array, m: int) -> jax.Array:
    """(..., in, out) -> (..., in // m, m, out)."""
    return x.reshape(x.shape[:-2] + (x.shape[-2] // m, m, x.shape[-1]))


def _beats(s: jax.Array) -> jax.Array:
    """b[..., a, b, :]: element b of the group ranks above element a (axis -2 of s is the group)."""
    s = jnp.where(jnp.isnan(s), -jnp.inf, jnp.asarray(s, jnp.float32))
    sa, sb = s[..., :, None, :], s[..., None, :, :]
    m = s.shape[-2]
    lower = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[:, :, None]  # b < a
    return (sb > sa) | ((sb == sa) & lower)


def _group_rank(s: jax.Array) -> jax.Array:
    """Rank (0 = best) of every element within its group; a permutation of 0..M-1 per group."""
    return jnp.sum(_beats(s), axis=-2, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=('n', 'm', 'axes'))
def nm_mask(scores: jax.Array, n: int, m: int, axes: Axes | None = None) -> jax.Array:
    """Bool mask, shape of `scores` (a kernel's): the n highest-ranked of every m consecutive
    entries along the input axes `axes` (sorted; flattened row-major; None: axis -2), for each
    index of the other axes; exactly n per group whatever ties."""
    axes = _input_axes(scores.shape, axes)
    top = _group_rank(_grouped(_to_in_out(scores, axes), m)) < n
    return _from_in_out(top, scores.shape, axes)


def nm_magnitude_masks(
    weights: Mapping[str, jax.Array], n: int, m: int, axes: Mapping[str, Axes] | None = None
) -> dict[str, jax.Array]:
    """The one-shot N:M magnitude mask (top-|w| within each group) of every layer, grouped along
    `axes[name]` (None: axis -2 of every kernel)."""
    return {
        k: nm_mask(jnp.abs(jnp.asarray(w, jnp.float32)), n, m, None if axes is None else axes[k])
        for k, w in weights.items()
    }


def num_swaps(rate, candidates):
    """r = ceil(rate * c) in float32, clipped to [0, c]: the rounding of `restriction.num_swaps`."""
    r = jnp.ceil(jnp.asarray(rate, jnp.float32) * candidates.astype(jnp.float32)).astype(jnp.int32)
    return jnp.clip(r, 0, candidates)


@functools.partial(jax.jit, static_argnames=('n', 'm', 'axes'))
def nm_restrict(
    mask: jax.Array, scores: jax.Array, n: int, m: int, rate, axes: Axes | None = None
) -> jax.Array:
    """New N:M mask (shape of `scores`) after at most ceil(rate * c) swaps (module docstring),
    groups along the input axes `axes` as `nm_mask`; `mask` must hold exactly n per group."""
    shape, axes = scores.shape, _input_axes(scores.shape, axes)
    mask = mask.astype(bool)
    top = nm_mask(scores, n, m, axes)
    revive, prune = top & ~mask, mask & ~top
    c = count(revive)
    r = num_swaps(rate, c)

    def restricted():
        come_in = masks.topk_mask(scores, r, valid=revive)  # in the kernel's own layout
        grouped = lambda a: _grouped(_to_in_out(a, axes), m)
        arriving = jnp.sum(grouped(come_in), axis=-2, keepdims=True, dtype=jnp.int32)
        # rank of each prune candidate among the group's prune candidates, counted from the worst
        g_prune = grouped(prune)
        below = _beats(grouped(scores)).swapaxes(-2, -3)  # [a, b]: b ranks below a
        from_worst = jnp.sum(below & g_prune[..., None, :, :], axis=-2, dtype=jnp.int32)
        leave = g_prune & (from_worst < arriving)
        leave = _from_in_out(leave.reshape(_layout(shape, axes)[1]), shape, axes)
        return (mask & ~leave) | come_in

    if loop.default_guard() == 'select':  # GPU, TPU: a conditional would wait on the host
        return jnp.where(r == c, top, restricted())
    return lax.cond(r == c, lambda: top, restricted)


def nm_restrict_all(
    mask: dict, scores: dict, n: int, m: int, rate, axes: Mapping[str, Axes] | None = None
) -> dict:
    """`nm_restrict` of every layer, grouped along `axes[name]` (None: axis -2 of every kernel)."""
    return {
        k: nm_restrict(mask[k], scores[k], n, m, rate, None if axes is None else axes[k])
        for k in mask
    }
