"""Exact selection: per row of order keys, the threshold key and the last kept tie of its top-k.

Ranking used everywhere in ljax: element i ranks above element j when its score is larger, or when
the scores are equal and i < j (row-major index); `+0.0` and `-0.0` rank equal. NaN scores are not
supported (a NaN's key is 0 or near the top). The top-k keeps exactly k elements whatever ties exist.

No sorting: floats map to an order-preserving uint32 image (`order_keys`) and each row's k-th
largest key, its threshold, is found by one bisection over key bits (`bisect`: one counting pass
per bit). A row whose `hint` (roughly its threshold) has the threshold within the 2**16 keys
around it bisects that window alone, 18 passes instead of 32 (`window`). Ties at the threshold
follow one rule (`last_kept`): the lowest indices win, found by the same bisection over indices
(no pass at all when every tie is kept) or, in the segmented layout, by running tie counts. A
row's top-k is then `chosen(keys, index, threshold, last)`.

`select` runs all this for many rows at once: every pass counts all rows. How it counts is the
layout, the one thing the two strategies (`masks.SELECTIONS`) do differently:
- `Stacked` ('hinted', for CPU, where memory traffic dominates): rows of equal size stacked into
  one [R, S] array, so a pass is one operation per size rather than per row (the gathered
  candidates of ResNet-50's 54 layers come in 9 sizes), or (`stack=False`) each row alone, counted
  at memory speed by `ljax.reductions.count`; rows may be recomputed in each pass (`tied`).
- `Segmented` ('segmented', for GPU and TPU, where the number of kernels dominates): the keys of
  all rows concatenated, one chunked row sum and one segment sum per pass, a couple of kernels per
  pass whatever the number of rows (layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ljax.reductions import count, total

WINDOW_BITS = 16
MAX = 0xFFFFFFFF  # the threshold of k = 0
LAST = 2**31 - 1  # the last kept tie when every tie is kept
_ROW = 64
tm = jax.tree.map


def order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with key(a) < key(b) iff a < b for floats (NaN aside); float32 input."""
    bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    # -0.0 ranks as +0.0 (done on the bits: XLA folds `x + 0.0` into `x` under jit)
    bits = jnp.where(bits == jnp.uint32(0x80000000), jnp.uint32(0), bits)
    return jnp.where(bits >> 31, ~bits, bits | jnp.uint32(0x80000000))


def host_order_keys(x) -> np.ndarray:
    """`order_keys` in NumPy."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    bits = np.where(bits == np.uint32(0x80000000), np.uint32(0), bits)
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def tied(arrays, i):
    """`arrays` as read in iteration `i` of a loop. What a pass computes from them then depends on
    the loop counter, so XLA recomputes it inside each pass (fused into the count) instead of
    hoisting it out of the loop and writing it out in full: a pass over a layer's keys then needs
    no buffer of the layer's size."""
    return lax.optimization_barrier((arrays, i))[0]


def chosen(keys, index, threshold, last):
    """The top-k of a row from its selection: above the threshold, or tied at it up to `last`
    (`index` None: the row's positions)."""
    index = jnp.arange(keys.size, dtype=jnp.int32) if index is None else index
    return (keys > threshold) | ((keys == threshold) & (index <= last))


def _row_total(x, fn=jnp.sum):
    """`fn` over each row of a [R, S] array, through rows of _ROW where S allows (XLA:CPU
    vectorises those; a longer row goes through its tree-reduction rewrite)."""
    r, s = x.shape
    if s % _ROW == 0 and s > _ROW:
        x = fn(x.reshape(r, s // _ROW, _ROW), axis=2)
    return fn(x, axis=1)


class Stacked:
    """The 'hinted' layout. `rows`: a list of 1-D uint32 keys, or a function of the pass i
    returning that list (recomputed in each pass: see `tied`; then each row stands alone).
    `indices`: the rows' flat indices (None: positions), all below `bound` (default: positions'
    bound). Per-row values are laid out as one array per group of rows."""

    unroll = 1

    def __init__(self, rows, indices=None, *, stack=True, bound=None):
        self.fresh = rows if callable(rows) else None
        sample = rows(jnp.int32(0)) if self.fresh else rows
        indices = [None] * len(sample) if indices is None else indices
        groups = {}
        for i, r in enumerate(sample):
            groups.setdefault(r.size if stack and not self.fresh else -1 - i, []).append(i)
        self.groups = list(groups.values())
        self.n = len(sample)
        self.bound = bound or max(r.size for r in sample)
        if bound is None and any(i is not None for i in indices):
            self.bound = LAST
        self.index = [self._stack([indices[i] for i in g]) if indices[g[0]] is not None else None
                      for g in self.groups]
        self.keys = None if self.fresh else [self._stack([rows[i] for i in g]) for g in self.groups]

    @staticmethod
    def _stack(xs):
        return jnp.stack(xs) if len(xs) > 1 else xs[0]

    def values(self, per_row, dtype):
        return [self._stack([jnp.asarray(per_row[i], dtype) for i in g]) for g in self.groups]

    def rows_of(self, values):
        out = [None] * self.n
        for g, v in zip(self.groups, values):
            for j, i in enumerate(g):
                out[i] = v[j] if len(g) > 1 else v
        return out

    def _each(self, f, vals, i, one, many):
        keys = self.keys
        if keys is None:
            fresh = self.fresh(i)
            keys = [fresh[g[0]] for g in self.groups]
        out = []
        for gi, x in enumerate(keys):
            idx = self.index[gi]
            if idx is None:
                idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
            if x.ndim == 1:
                out.append(one(f(x, idx, *[v[gi] for v in vals])))
            else:
                out.append(many(f(x, idx, *[v[gi][:, None] for v in vals])))
        return out

    def count(self, pred, *vals, i=0):
        """Per row, the count of pred(keys, index, *per-row values) (int32)."""
        return self._each(pred, vals, i, count, lambda p: _row_total(p.astype(jnp.int32)))

    def total(self, f, fn):
        """Per row, `fn` (jnp.min, jnp.max) of f(keys)."""
        return self._each(lambda x, _: f(x), (), 0, lambda y: total(y, fn),
                          lambda y: _row_total(y, fn))


class Segmented:
    """The 'segmented' layout: all rows as one [Q, lines * 64] array, each row zero-padded to whole
    chunks (key 0 ranks below every real key), counted per chunk then summed per row. Chunks of
    `lines` lines of 64 keys keep the segment sum to a few thousand chunk counts rather than one
    per line (on an NVIDIA H200 this took the VGG-19 mask update from 4.6 to 1.3 ms); `unroll`
    unrolls the 32 passes, measured slower there (docs/RESULTS.md, Speed). Rows are full layers:
    their indices are positions. Per-row values are laid out as one [rows] array."""

    def __init__(self, rows, indices=None, *, lines=64, unroll=False):
        assert indices is None or all(i is None for i in indices), 'segmented rows are positions'
        width = lines * _ROW
        parts, ids, starts = [], [], []
        for i, r in enumerate(rows):
            pad = -r.size % width
            parts.append(jnp.pad(r, (0, pad)))
            ids.append(np.full((r.size + pad) // width, i, np.int32))
            starts.append(np.arange(0, r.size + pad, width, dtype=np.int32))
        self.keys = jnp.concatenate(parts).reshape(-1, width)
        self.seg, self.starts = np.concatenate(ids), np.concatenate(starts)
        self.n, self.unroll = len(rows), unroll
        self.bound = max(r.size for r in rows)

    def values(self, per_row, dtype):
        return jnp.stack([jnp.asarray(v, dtype) for v in per_row])

    def rows_of(self, values):
        return [values[i] for i in range(self.n)]

    def _each(self, f, vals, reduce, segment):
        seg = jnp.asarray(self.seg)
        idx = jnp.asarray(self.starts)[:, None] + jnp.arange(self.keys.shape[1], dtype=jnp.int32)
        per_chunk = reduce(f(self.keys, idx, *[v[seg][:, None] for v in vals]), axis=1)
        return segment(per_chunk, seg, self.n, indices_are_sorted=True)

    def count(self, pred, *vals, i=0):
        return self._each(lambda *a: pred(*a).astype(jnp.int32), vals, jnp.sum, jax.ops.segment_sum)

    def total(self, f, fn):
        segment = {jnp.min: jax.ops.segment_min, jnp.max: jax.ops.segment_max}[fn]
        return self._each(lambda x, _: f(x), (), fn, segment)

    def ties(self, t, need):
        """Per row (t, need: [rows]): the count of keys equal to t, and the index of the need-th
        of them in index order (1-based; meaningless where need is not in [1, count]). No loop:
        the tie counts per chunk, their running sum per row, and within the one chunk that holds
        the need-th tie a running count of its 4,096 keys. (A bisection over indices, as `Stacked`
        does, runs a loop whose length is known only on the device, and a GPU then waits on the
        host for each pass: on an NVIDIA H200 that left the device idle for about 4 ms of each
        ResNet-50 step.)"""
        seg = jnp.asarray(self.seg)
        per_chunk = jnp.sum(self.keys == t[seg][:, None], axis=1, dtype=jnp.int32)
        n_at = jax.ops.segment_sum(per_chunk, seg, self.n, indices_are_sorted=True)
        before = jnp.cumsum(per_chunk) - per_chunk  # ties in earlier chunks, of every row
        first = np.searchsorted(self.seg, np.arange(self.n))  # each row's first chunk
        before = before - before[jnp.asarray(first)][seg]  # ... of the chunk's own row
        holds = (before < need[seg]) & (need[seg] <= before + per_chunk)
        chunk = jax.ops.segment_max(
            jnp.where(holds, jnp.arange(seg.size, dtype=jnp.int32), -1), seg, self.n,
            indices_are_sorted=True,
        )
        chunk = jnp.maximum(chunk, 0)
        tie = self.keys[chunk] == t[:, None]
        nth = tie & (jnp.cumsum(tie, axis=1, dtype=jnp.int32) == (need - before[chunk])[:, None])
        return n_at, jnp.asarray(self.starts)[chunk] + jnp.argmax(nth, axis=1).astype(jnp.int32)


def _ge(keys, index, t):
    return keys >= t


def _tie_at_or_after(keys, index, c, t):
    return (keys == t) & (index >= c.astype(jnp.int32))


def bisect(rows, k, base, nbits=None, pred=_ge, extra=()):
    """The one bisection: per row, the largest t in [base, base + 2**nbits) with
    count(pred(keys, index, t, *extra)) >= k, given that `base` qualifies and that the count falls
    as t grows. Per-row values in `rows`' layout; nbits None: 32 for every row (a loop of static
    length), else one loop of as many passes as the widest row needs (traced)."""
    zero = tm(jnp.zeros_like, base)
    passes = jnp.uint32(32) if nbits is None else jnp.max(jnp.stack([
        jnp.max(n) for n in jax.tree.leaves(nbits)]))

    def body(i, offset):
        bit = passes - 1 - jnp.asarray(i, jnp.uint32)
        cand = tm(lambda o: o | (jnp.uint32(1) << bit), offset)
        t = tm(jnp.add, base, cand)  # past the top of uint32 (base + 2**nbits may wrap): no
        ok = tm(lambda c, k, t, b: (c >= k) & (t >= b), rows.count(pred, t, *extra, i=i), k, t, base)
        if nbits is not None:
            ok = tm(lambda ok, n: ok & (bit < n), ok, nbits)
        return tm(lambda ok, c, o: jnp.where(ok, c, o), ok, cand, offset)

    unroll = rows.unroll if nbits is None else 1
    return tm(jnp.add, base, lax.fori_loop(jnp.uint32(0), passes, body, zero, unroll=unroll))


def window(rows, k, hint):
    """(base, nbits) per row: the 2**16 keys around `hint` when they hold the row's k-th largest
    key, all 2**32 keys otherwise."""
    width = jnp.uint32(1 << WINDOW_BITS)
    lo = tm(lambda h: jnp.clip(h, width // 2, jnp.uint32(MAX) - width) - width // 2, hint)
    at_lo = rows.count(_ge, lo)
    at_hi = rows.count(_ge, tm(lambda w: w + width, lo))
    inside = tm(lambda a, b, k: (a >= k) & (b < k), at_lo, at_hi, k)
    base = tm(lambda i, w: jnp.where(i, w, jnp.uint32(0)), inside, lo)
    return base, tm(lambda i: jnp.where(i, jnp.uint32(WINDOW_BITS), jnp.uint32(32)), inside)


def span(rows):
    """(base, nbits) per row: [its smallest nonzero key, its largest] (key 0 is padding or not a
    candidate: the restriction's revive and prune rows hold only a few keys near the threshold)."""
    low = rows.total(lambda x: jnp.where(x > 0, x, jnp.uint32(MAX)), jnp.min)
    top = rows.total(lambda x: x, jnp.max)
    base = tm(lambda b, t: jnp.where(t > 0, b, jnp.uint32(0)), low, top)
    return base, tm(lambda b, t: jnp.uint32(32) - lax.clz(t - b), base, top)


def threshold(rows, k, base=None, nbits=None):
    """Per row its k-th largest key (MAX where k = 0), in [base, base + 2**nbits) if given."""
    base = tm(lambda k: jnp.zeros(k.shape, jnp.uint32), k) if base is None else base
    return tm(lambda f, k: jnp.where(k > 0, f, jnp.uint32(MAX)), bisect(rows, k, base, nbits), k)


def last_kept(rows, k, t):
    """The tie rule: of the ties at a row's threshold t, the top-k keeps the lowest indices, as
    many as k leaves room for. Returns per row the index of the last one kept (-1: none; LAST:
    every tie), the need-th tie: in a `Stacked` layout found by bisection over indices, the
    largest c with count(ties at indices >= c) >= n_ties - need + 1 (no pass when every row keeps
    all); in a `Segmented` one by `Segmented.ties`, with no loop."""
    above = rows.count(lambda x, _, t: x > t, t)
    need = tm(jnp.subtract, k, above)
    if isinstance(rows, Segmented):
        n_at, nth = rows.ties(t, need)
        return jnp.where(n_at <= need, LAST, jnp.where(need > 0, nth, -1))
    n_at = rows.count(lambda x, _, t: x == t, t)
    bits = jnp.uint32(max(int(rows.bound), 1).bit_length())
    nbits = tm(lambda a, n: jnp.where((a > n) & (n > 0), bits, jnp.uint32(0)), n_at, need)
    zero = tm(lambda a: jnp.zeros(a.shape, jnp.uint32), n_at)
    nth = bisect(rows, tm(lambda a, n: a - n + 1, n_at, need), zero, nbits, _tie_at_or_after, (t,))
    return tm(
        lambda a, n, c: jnp.where(a <= n, LAST, jnp.where(n > 0, c.astype(jnp.int32), -1)),
        n_at, need, nth,
    )


def select(rows, ks, hints=None, *, span_rows=False, bracket=None):
    """Per row of `rows` (a `Stacked` or `Segmented` layout) the threshold key and last kept tie
    of its top-k: two lists. The bisection runs within each row's `window` around its hint
    (`hints`: a list), or its `span` (span_rows), or a given (base, nbits) pair of lists, or over
    all 32 bits."""
    k = rows.values(ks, jnp.int32)
    if hints is not None:
        base, nbits = window(rows, k, rows.values(hints, jnp.uint32))
    elif span_rows:
        base, nbits = span(rows)
    elif bracket is not None:
        base, nbits = (rows.values(b, jnp.uint32) for b in bracket)
    else:
        base = nbits = None
    t = threshold(rows, k, base, nbits)
    return rows.rows_of(t), rows.rows_of(last_kept(rows, k, t))
