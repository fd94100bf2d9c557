"""Exact top-k masks and the straight-through estimator.

Ranking used everywhere in ljax: element i ranks above element j when its score is larger, or when
the scores are equal and i < j (row-major index). `topk_mask(scores, k)` keeps the k highest-ranked
elements, so it keeps exactly k whatever ties exist; `+0.0` and `-0.0` rank equal.

The selection avoids sorting: floats are mapped to an order-preserving uint32 image and the k-th
largest key is found by bisection over its 32 bits (one counting pass per bit, all inside one jit;
`k` may be traced). With a `hint` (the previous step's threshold key) only a window of 2**16 keys
around it is bisected, which takes 18 passes instead of 32 when the threshold moved little, and
falls back to the full 32 passes otherwise. Ties at the threshold are resolved by a cumulative sum,
which is skipped when the threshold is unique.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_WINDOW_BITS = 16


def order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with key(a) < key(b) iff a < b for floats (NaN aside); float32 input."""
    bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    # -0.0 ranks as +0.0 (done on the bits: XLA folds `x + 0.0` into `x` under jit)
    bits = jnp.where(bits == jnp.uint32(0x80000000), jnp.uint32(0), bits)
    return jnp.where(bits >> 31, ~bits, bits | jnp.uint32(0x80000000))


def _count_ge(keys, t):
    return jnp.sum(keys >= t, dtype=jnp.int32)


def _bisect(keys, k, base, nbits):
    """Largest t in [base, base + 2**nbits) with count(keys >= t) >= k, given that base qualifies.

    `nbits` may be traced (a while loop of nbits counting passes)."""
    nbits = jnp.asarray(nbits, jnp.uint32)

    def body(i, offset):
        cand = offset | (jnp.uint32(1) << (nbits - 1 - i).astype(jnp.uint32))
        return jnp.where(_count_ge(keys, base + cand) >= k, cand, offset)

    return base + lax.fori_loop(jnp.uint32(0), nbits, body, jnp.uint32(0))


def kth_largest_key(keys: jax.Array, k, hint=None) -> jax.Array:
    """The k-th largest key (1 <= k <= keys.size); for k = 0 returns the maximum uint32."""
    k = jnp.asarray(k, jnp.int32)
    if hint is None:
        return jnp.where(k > 0, _bisect(keys, k, jnp.uint32(0), 32), jnp.uint32(0xFFFFFFFF))
    width = jnp.uint32(1 << _WINDOW_BITS)
    hint = jnp.asarray(hint, jnp.uint32)
    lo = jnp.clip(hint, width // 2, jnp.uint32(0xFFFFFFFF) - width) - width // 2
    inside = (_count_ge(keys, lo) >= k) & (_count_ge(keys, lo + width) < k) & (k > 0)
    # One loop either way (no lax.cond, which would copy `keys` into its branches).
    found = _bisect(
        keys, k, jnp.where(inside, lo, jnp.uint32(0)), jnp.where(inside, _WINDOW_BITS, 32)
    )
    return jnp.where(k > 0, found, jnp.uint32(0xFFFFFFFF))


def _select(keys, k, threshold):
    above = keys > threshold
    n_above = jnp.sum(above, dtype=jnp.int32)
    at = keys == threshold
    unique = n_above + jnp.sum(at, dtype=jnp.int32) == k
    # Ties at the threshold: the lowest indices win, exactly k in all.
    return lax.cond(
        unique,
        lambda: above | at,
        lambda: above | (at & (jnp.cumsum(at, dtype=jnp.int32) <= k - n_above)),
    )


@jax.jit
def topk_mask_with_threshold(scores: jax.Array, k, valid=None, hint=None):
    """Like `topk_mask`, also returning the threshold key (a `hint` for the next call)."""
    shape = scores.shape
    keys = order_keys(scores).reshape(-1)
    if valid is not None:
        # Key 0 is the image of a NaN only: invalid elements rank below every real score.
        keys = jnp.where(valid.reshape(-1), keys, jnp.uint32(0))
    threshold = kth_largest_key(keys, k, hint)
    return _select(keys, jnp.asarray(k, jnp.int32), threshold).reshape(shape), threshold


def topk_mask(scores: jax.Array, k, valid=None, hint=None) -> jax.Array:
    """Bool mask of the `k` highest-ranked entries of `scores` (any shape), exactly k of them.

    `valid` (bool, same shape) restricts the choice to valid entries; then k <= valid.sum().
    `k` may be a Python int or a traced int32 scalar.
    """
    return topk_mask_with_threshold(scores, k, valid, hint)[0]


@jax.custom_vjp
def ste(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Straight-through estimator: returns `mask` as scores' dtype; the gradient goes to `scores` unchanged."""
    return mask.astype(scores.dtype)


def _ste_fwd(scores, mask):
    return mask.astype(scores.dtype), None


def _ste_bwd(_, g):
    return g, None


ste.defvjp(_ste_fwd, _ste_bwd)


@jax.jit
def topk_ste(scores: jax.Array, k) -> jax.Array:
    """Forward: the binary top-k mask of `scores` (as scores' dtype); backward: identity to `scores`."""
    return ste(scores, lax.stop_gradient(topk_mask(scores, k)))


def topk_masks(scores: dict, kept: dict, hints: dict | None = None) -> tuple[dict, dict]:
    """`topk_mask_with_threshold` of every layer: ({name: mask}, {name: threshold key})."""
    out = {
        n: topk_mask_with_threshold(scores[n], kept[n], hint=None if hints is None else hints[n])
        for n in scores
    }
    return {n: m for n, (m, _) in out.items()}, {n: t for n, (_, t) in out.items()}
