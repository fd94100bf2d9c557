"""Reductions of a whole array to a scalar, written so that XLA:CPU runs them at memory speed.

XLA:CPU rewrites a reduction over more than 32 elements into a chain of reduce-windows over a
materialised copy of its input (its tree-reduction rewrite), so `jnp.sum(a != b)` over 25.2M
elements first writes 25.2M int32 and then reads them back: 48.7 ms on a 2-core machine, against
8.6 ms here (`python benchmarks/cpu_reductions.py`). A reduction over rows of at most 32 elements
keeps the elementwise work fused into one parallel loop. Here every full reduction is two: one over rows of `_ROW` elements, then one over
the row results, with an optimization barrier between them so that XLA does not merge them back
into one reduction. On GPU and TPU the barrier costs one small intermediate (1/32 of the input).
Arrays under `_LARGE` elements keep one reduction: their copy is small, and the barrier's extra
operations measured slower there (the selections count many small rows per pass).
The train steps' finite check (`tree_all_finite`) runs on ljax's C++ kernel on CPU where it is
built: one call per large gradient, at memory speed.
Measured in docs/RESULTS.md, Speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_ROW = 32
_LARGE = 1 << 18


def total(x: jax.Array, fn=jnp.sum) -> jax.Array:
    """`fn(x)` over every element, for an associative `fn(array, axis=None)` such as jnp.sum,
    jnp.max or jnp.all, as a reduction over rows of 32 and one over their results."""
    x = x.reshape(-1)
    if x.size < _LARGE:
        return fn(x)
    n = x.size - x.size % _ROW
    rows = lax.optimization_barrier(fn(x[:n].reshape(-1, _ROW), axis=1))
    if n < x.size:
        rows = jnp.concatenate([rows, fn(x[n:])[None]])
    return fn(rows)


def count(pred: jax.Array) -> jax.Array:
    """Number of True entries of a bool array (int32)."""
    pred = pred.reshape(-1)
    if pred.size < _LARGE and pred.size % 64 == 0 and pred.size >= 128:
        # XLA:CPU vectorises row sums but not a flat sum to a scalar
        return jnp.sum(jnp.sum(pred.reshape(-1, 64).astype(jnp.int32), axis=1))
    return total(pred.astype(jnp.int32))


def all_finite(x: jax.Array) -> jax.Array:
    """Whether every element of `x` is finite (bool scalar)."""
    return total(jnp.isfinite(x), jnp.all)


def native_all_finite(arrays) -> jax.Array:
    """Whether every element of some float32 arrays is finite (bool scalar), from one call of
    ljax's C++ kernel (XLA:CPU only, `ljax/csrc/all_finite.cc`): at memory speed, where XLA's
    reductions here run at a third of it."""
    return jax.ffi.ffi_call(
        'ljax_all_finite', jax.ShapeDtypeStruct((), jnp.bool_), vmap_method='sequential'
    )(*arrays)


def tree_all_finite(tree) -> jax.Array:
    """Whether every element of every array of `tree` is finite (bool scalar): on CPU, where
    ljax's C++ kernels are built, the float32 arrays of at least `_LARGE` elements are checked by
    `native_all_finite`, a call each: in a train step each call runs as soon as its gradient is
    written, beside the rest of the backward pass, and only the last waits after it (on the
    BN-MLP's search step, ad hoc, 1% faster than one call for all); every other array by
    `all_finite`."""
    leaves = [jnp.asarray(a) for a in jax.tree.leaves(tree)]
    large = [a.dtype == jnp.float32 and a.size >= _LARGE for a in leaves]
    ok = jnp.bool_(True)
    if any(large) and jax.default_backend() == 'cpu' and native_kernels():
        for a in (a for a, big in zip(leaves, large) if big):
            ok = ok & native_all_finite([a])
        leaves = [a for a, big in zip(leaves, large) if not big]
    for a in leaves:
        ok = ok & all_finite(a)
    return ok


def native_kernels() -> bool:
    """Whether ljax's C++ kernels for XLA:CPU are built here (`ljax.models.onednn.available()`,
    which builds them on first use)."""
    from ljax.models import onednn

    return onednn.available()
