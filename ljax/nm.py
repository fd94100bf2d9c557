"""N:M structured masks: in every group of M consecutive weights along a kernel's INPUT axis
(axis -2 of a flax kernel: Dense (in, out), Conv (kh, kw, in, out)) exactly N are kept. This is
the layout of NVIDIA's 2:4 sparse tensor cores: as torch's (out, in) weight (or (out, in, kh, kw)
for a conv, grouped along in, as apex ASP does) every 4 consecutive inputs hold 2 nonzeros.

Ranking within a group as in `ljax.masks`: higher score first, ties to the lower index, +0.0 and
-0.0 equal (NaN ranks as -inf). Selection is by pairwise comparisons inside each group (M^2
comparisons per group, no sort), one fixed-cost vectorised computation; everything here is pure
and jit-able, `rate` may be traced.

Short restriction within groups (`nm_restrict`): T = nm_mask(scores), revive candidates T \\ mask,
prune candidates mask \\ T (c of each; per group they are equally many, as both hold N). With
r = ceil(rate * c) (as `ljax.restriction.num_swaps`), the r highest-ranked revive candidates of the
whole layer come in (exactly the revive side of the unstructured restriction); in each group, as
many prune candidates as came in there leave, the lowest-ranked first. Equivalently: in each group
pair the j-th best revive candidate with the j-th worst prune candidate, and perform the r pairs
whose revive candidate ranks highest across the layer. Every group keeps exactly N; rate=1 gives
nm_mask(scores), rate=0 the mask unchanged.

In a search: check_nm before anything; every layer keeps k_l = size_l * N / M (sparsity 1 - N/M);
the initial mask is nm_mask of the initial scores (magnitude init: `nm_magnitude_masks`, then
`sparsity.mask_scores` of it, whose nm_mask is that mask again); each step calls `nm_restrict_all`
where the unstructured search calls `restriction.restrict_masks` (no threshold hints here).
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from ljax import masks
from ljax.reductions import count


def check_nm(nm, shapes: Mapping[str, tuple]) -> None:
    """ValueError unless nm = (N, M) are ints with 0 < N < M and every kernel in `shapes` has an
    input axis (-2) whose length divides by M."""
    ok = isinstance(nm, (tuple, list)) and len(nm) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in nm)
    if not ok or not 0 < nm[0] < nm[1]:
        raise ValueError(
            f'nm: expected a pair of ints (N, M) with 0 < N < M such as (2, 4), got {nm!r}'
        )
    m = nm[1]
    for name, shape in shapes.items():
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(
                f'nm: kernel {name} of shape {shape} has no input axis (-2) to group by {m}; '
                'leave it out with prunable='
            )
        if shape[-2] % m:
            raise ValueError(
                f'nm: kernel {name} of shape {shape} has {shape[-2]} inputs (axis -2), which do '
                f'not divide into groups of {m}; leave it out with prunable='
            )


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


@functools.partial(jax.jit, static_argnums=(1, 2))
def nm_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    """Bool mask, shape of `scores` (..., in, out): the n highest-ranked of every m consecutive
    entries along axis -2, exactly n per group whatever ties."""
    shape = scores.shape
    return (_group_rank(_grouped(scores, m)) < n).reshape(shape)


def nm_magnitude_masks(weights: Mapping[str, jax.Array], n: int, m: int) -> dict[str, jax.Array]:
    """The one-shot N:M magnitude mask (top-|w| within each group) of every layer."""
    return {k: nm_mask(jnp.abs(jnp.asarray(w, jnp.float32)), n, m) for k, w in weights.items()}


def num_swaps(rate, candidates):
    """r = ceil(rate * c) in float32, clipped to [0, c]: the rounding of `restriction.num_swaps`."""
    r = jnp.ceil(jnp.asarray(rate, jnp.float32) * candidates.astype(jnp.float32)).astype(jnp.int32)
    return jnp.clip(r, 0, candidates)


@functools.partial(jax.jit, static_argnums=(2, 3))
def nm_restrict(mask: jax.Array, scores: jax.Array, n: int, m: int, rate) -> jax.Array:
    """New N:M mask after at most ceil(rate * c) swaps (module docstring); `mask` must hold
    exactly n per group."""
    shape = scores.shape
    mask = mask.astype(bool)
    top = nm_mask(scores, n, m)
    revive, prune = top & ~mask, mask & ~top
    c = count(revive)
    r = num_swaps(rate, c)

    def restricted():
        come_in = masks.topk_mask(scores, r, valid=revive)
        arriving = jnp.sum(_grouped(come_in, m), axis=-2, keepdims=True, dtype=jnp.int32)
        # rank of each prune candidate among the group's prune candidates, counted from the worst
        g_prune = _grouped(prune, m)
        below = _beats(_grouped(scores, m)).swapaxes(-2, -3)  # [a, b]: b ranks below a
        from_worst = jnp.sum(below & g_prune[..., None, :, :], axis=-2, dtype=jnp.int32)
        leave = (g_prune & (from_worst < arriving)).reshape(shape)
        return (mask & ~leave) | come_in

    return lax.cond(r == c, lambda: top, restricted)


def nm_restrict_all(mask: dict, scores: dict, n: int, m: int, rate) -> dict:
    """`nm_restrict` of every layer."""
    return {k: nm_restrict(mask[k], scores[k], n, m, rate) for k in mask}
