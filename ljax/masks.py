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

`topk_masks` selects every layer of a dict in one call, for a cost that does not grow with depth:
the bisection passes are shared by all layers, and with hints one pass over the scores narrows each
layer to a few candidate blocks (see `_plan`), whose candidates are then selected stacked by size,
warm-started in the hint's window (`_stacked_selection`). A hint is the previous threshold key, or (the search)
its extrapolation from the last two (`extrapolate`). On GPU and TPU the passes run instead over the
keys of all layers concatenated, one chunked row sum and one segment sum per pass, which launches a
few kernels per pass rather than several per layer (`default_selection`).
NaN scores are not supported.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ljax.reductions import count as _count, total as _total

_WINDOW_BITS = 16
_ROW = 64


def order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with key(a) < key(b) iff a < b for floats (NaN aside); float32 input."""
    bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    # -0.0 ranks as +0.0 (done on the bits: XLA folds `x + 0.0` into `x` under jit)
    bits = jnp.where(bits == jnp.uint32(0x80000000), jnp.uint32(0), bits)
    return jnp.where(bits >> 31, ~bits, bits | jnp.uint32(0x80000000))


def _count_ge(keys, t):
    return _count(keys >= t)


def _tied(arrays, i):
    """`arrays` as read in iteration `i` of a loop. What a pass computes from them then depends on
    the loop counter, so XLA recomputes it inside each pass (fused into the count) instead of
    hoisting it out of the loop and writing it out in full: a pass over a layer's keys then needs
    no buffer of the layer's size."""
    return lax.optimization_barrier((arrays, i))[0]


def _row(keys, i):
    """(keys, valid or None) of a row at loop iteration i: `keys` is an array, or a function of
    the iteration returning that pair (recomputed in each pass, see `_tied`). Invalid keys rank
    as key 0, below every real score."""
    return keys(i) if callable(keys) else (keys, None)


def _bisect(keys, k, base, nbits):
    """Largest t in [base, base + 2**nbits) with count(keys >= t) >= k, given that base qualifies.

    `nbits` may be traced (a while loop of nbits counting passes); `keys` as in `_row`."""
    nbits = jnp.asarray(nbits, jnp.uint32)

    def body(i, offset):
        cand = offset | (jnp.uint32(1) << (nbits - 1 - i).astype(jnp.uint32))
        t = base + cand  # a candidate past the top of uint32 (base + 2**nbits may wrap) never qualifies
        r, valid = _row(keys, i)
        ge = r >= t if valid is None else (r >= t) & valid  # t >= 1: key 0 never counts
        return jnp.where((t >= base) & (_count(ge) >= k), cand, offset)

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
    n_above = _count(above)
    at = keys == threshold
    unique = n_above + _count(at) == k
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


# ------------------------------------------------------------------ all layers at once
# The fast path of `topk_masks` / `restriction.restrict_masks`. One pass over every layer computes,
# per block of _BLOCK elements and relative to the hint key h: the count of keys >= h, the largest
# key below h and the smallest key >= h (and, for the restriction, how many elements of the block
# disagree between `key >= h` and the current mask). With e = count(keys >= h) - k, the threshold
# is the (-e)-th largest key below h (e < 0) or the (e+1)-th smallest key >= h (e >= 0), so it and
# every element between it and h lie in the |e|+1 blocks whose closest key to h is closest: those
# blocks (and the disagreeing ones) are gathered, a few per layer, and the exact selection runs on
# them. When they do not fit the capacity the call falls back to exact bisection over all keys.
_BLOCK = 64
# A layer of at most _WHOLE blocks is gathered whole (its 32 passes are cheap). 1024 made 64 equal
# layers of 65,536 weights cost 165 ms (32 passes over all 4.2M keys) against 23 ms with 64, and
# ResNet-50's update 73 -> 51 ms (restriction 147 -> 88 ms), the stand-in step unchanged.
_WHOLE = 64
_MIN_BLOCKS = 32  # candidate blocks gathered per larger layer: the larger of this ...
_BLOCK_SHARE = 64  # ... and 1/_BLOCK_SHARE of the layer's blocks
_MAX = 0xFFFFFFFF


class _Plan(NamedTuple):
    """One layer's gathered candidates: block ids (ascending), their keys and flat indices."""

    idx: jax.Array  # [cap] int32
    keys: jax.Array  # [cap * _BLOCK] uint32, 0 past the end of the layer
    index: jax.Array  # [cap * _BLOCK] int32
    k: jax.Array  # the layer's k minus the count of keys >= threshold outside the candidates
    valid: jax.Array  # bool: the candidates hold the threshold, all its ties and (mask) the changes
    near: jax.Array  # [nb] uint32 per block: closeness to the hint of its key nearest on the
    #                  threshold's side (0: none there)
    count: jax.Array  # [nb] int32 per block: keys >= the hint
    h: jax.Array  # the hint as used (uint32)
    e: jax.Array  # count of keys >= h minus k: the threshold is >= h when e >= 0, below it if not
    j: jax.Array  # the threshold is the j-th closest key to h on its side
    changed: jax.Array | None = None  # [nb] int32 per block: keys >= h where `old` is False or
    #                                   the reverse (with `old` or `mask` given)


def extrapolate(last: jax.Array, previous: jax.Array) -> jax.Array:
    """A hint for the next selection from the last two threshold keys: last + (last - previous),
    clamped to uint32. During a search the threshold drifts steadily (momentum), so this lands
    much closer than `last` alone; any hint gives the same masks, only the cost differs."""
    last = jnp.asarray(last, jnp.uint32)
    previous = jnp.asarray(previous, jnp.uint32)
    up = last >= previous
    d = jnp.where(up, last - previous, previous - last)
    return jnp.where(up, last + jnp.minimum(d, jnp.uint32(_MAX) - last), last - jnp.minimum(d, last))


def _blocked_keys(scores):
    keys = order_keys(scores).reshape(-1)
    pad = -keys.size % _BLOCK
    # key 0 (a NaN's image) ranks below every real score
    return jnp.pad(keys, (0, pad)).reshape(-1, _BLOCK)


def _plan(scores, k, hint, mask=None, old=None) -> _Plan:
    """One layer's candidate blocks around `hint`, from one variadic reduce over its keys.

    mask (the restriction's old mask): every block where keys >= hint and the mask differ is
    gathered too (invalid if they do not fit). old: those blocks are only counted (`changed`),
    for the count of flips (`_flips`)."""
    n = scores.size
    # The barrier keeps XLA from merging these keys with the mask write's (the same expression
    # of the same scores): merged, XLA:CPU wrote every layer's keys out and read them back, which
    # doubled `topk_masks` on ResNet-50's shapes (about 100 -> 50 ms, docs/RESULTS.md, Speed).
    kb = _blocked_keys(lax.optimization_barrier(scores))
    nb = kb.shape[0]
    cap = nb if nb <= _WHOLE else max(_MIN_BLOCKS, nb // _BLOCK_SHARE)
    k = jnp.asarray(k, jnp.int32)
    h = jnp.maximum(jnp.asarray(hint, jnp.uint32), 1)  # padding (key 0) stays below h
    h = jnp.where(k == 0, jnp.uint32(_MAX), jnp.where(k == n, jnp.uint32(1), h))
    ge = kb >= h
    ops = [ge.astype(jnp.int32), jnp.where(ge, jnp.uint32(0), kb), jnp.where(ge, ~kb, 0)]
    compared = mask if mask is not None else old
    if compared is not None:
        mb = jnp.pad(compared.reshape(-1), (0, nb * _BLOCK - n)).reshape(nb, _BLOCK)
        ops.append((ge != mb).astype(jnp.int32))

    def combine(a, b):  # one variadic reduce: a single pass over the keys
        out = (a[0] + b[0], jnp.maximum(a[1], b[1]), jnp.maximum(a[2], b[2]))
        return out + ((a[3] + b[3],) if compared is not None else ())

    zero = (jnp.int32(0), jnp.uint32(0), jnp.uint32(0), jnp.int32(0))[: len(ops)]
    stats = lax.reduce(tuple(ops), zero, combine, (1,))
    count, below, above = stats[:3]
    e = jnp.sum(count) - k
    j = jnp.where(e < 0, -e, e + 1)
    # closeness to h of each block's nearest key on the threshold's side (0: none there)
    near = jnp.where(e < 0, below, above)
    # priority: minus the distance from h of that key, in float32, which is exact for the 2**24
    # keys nearest h (a float32 of `near` itself ties keys that differ in their last 8 bits, and
    # early in a search, scores near 1.0 and 1 - margin, those ties left the threshold's block out)
    dist = jnp.where(e < 0, h - near, ~near - h)
    priority = jnp.where(near == 0, -jnp.inf, -dist.astype(jnp.float32))
    if mask is not None:
        priority = jnp.where(stats[3] > 0, jnp.inf, priority)
    if cap == nb:  # a small layer: every block (cheaper than choosing)
        idx = jnp.arange(nb, dtype=jnp.int32)
    else:
        _, idx = lax.top_k(priority, cap)  # far blocks may tie in float32: checked exactly below
        idx = (-lax.top_k(-idx.astype(jnp.float32), cap)[0]).astype(jnp.int32)  # ascending
    inside = jnp.zeros(nb, bool).at[idx].set(True)
    outside_max = jnp.max(jnp.where(inside, jnp.uint32(0), near))
    valid = (k == 0) | (outside_max == 0) | (_count(near[idx] > outside_max) >= j)
    if mask is not None:
        valid &= ~jnp.any(~inside & (stats[3] > 0))
    # gathered from the scores, not from `kb`, which would then be written out in full
    keys, index, kprime = _gather(scores, k, count, idx)
    changed = stats[3] if compared is not None else None
    return _Plan(idx, keys, index, kprime, valid, near, count, h, e, j, changed)


def _gathered_rows(x, idx):
    """Blocks `idx` of a layer's flat array (ids past its last block give padding), flat."""
    pad = -x.size % _BLOCK + _BLOCK
    return jnp.pad(x.reshape(-1), (0, pad)).reshape(-1, _BLOCK)[idx].reshape(-1)


def _flips(plan, new_rows, old_rows):
    """Positions whose bit differs between the new mask and `old`, for a layer whose new mask is
    keys >= h outside the gathered blocks (a valid plan): the plan's count of `changed` outside
    those blocks plus the count inside them, from the gathered rows alone."""
    outside = jnp.sum(plan.changed) - jnp.sum(jnp.pad(plan.changed, (0, 1))[plan.idx])
    return outside + _count(new_rows != old_rows)


_WIDE_SHARE = 8  # the second try gathers up to 1/_WIDE_SHARE of a layer's blocks


def _gather(scores, k, count, idx):
    """Keys and flat indices of the blocks `idx` (ids >= nb give padding, key 0), and the k that
    the selection among them needs: k minus the count of keys >= the hint outside them (`count`:
    per block)."""
    n = scores.size
    nb = count.shape[0]
    rows = jnp.pad(scores.reshape(-1), (0, (nb + 1) * _BLOCK - n)).reshape(nb + 1, _BLOCK)[idx]
    index = (idx[:, None] * _BLOCK + jnp.arange(_BLOCK, dtype=jnp.int32)).reshape(-1)
    keys = jnp.where(index < n, order_keys(rows).reshape(-1), jnp.uint32(0))
    return keys, index, k - jnp.sum(count) + jnp.sum(jnp.pad(count, (0, 1))[idx])


def _bracket(plan):
    """(v, base, nbits): v is the j-th largest block closeness (0: fewer blocks than j), and the
    threshold lies in [base, base + 2**nbits) with count(keys >= base) >= k. On the threshold's
    side the j blocks closest to h hold j keys between h and the key of v, so the threshold lies
    between them."""
    v = _kth_largest_many([plan.near], [plan.j])[0]  # 0 when fewer than j blocks have a key there
    up = plan.e >= 0
    # above h: the threshold is in [h, ~v]; below: in [v, h - 1] (v = 0: no bound but 0)
    top = jnp.where(v == 0, jnp.uint32(_MAX), ~v)
    base = jnp.where(up, plan.h, v)
    span = jnp.where(up, top - plan.h, plan.h - jnp.uint32(1) - v)
    nbits = jnp.uint32(32) - lax.clz(span)
    return v, base, nbits


def _wide_blocks(plan):
    """(inside, cap, base, nbits): the blocks a far-moved threshold needs, how many fit, and the
    bracket; the gather is taken when count(inside) <= cap."""
    nb = plan.near.shape[0]
    v, base, nbits = _bracket(plan)
    inside = (plan.near >= v) & (plan.near > 0)
    return inside, min(nb, max(_MIN_BLOCKS, nb // _WIDE_SHARE)), base, nbits


def _last_kept_one(r, k, t, index, size):
    """`_last_kept` for one row without a cumulative sum over it: when not every tie at `t` is
    kept, the index of the last kept one is found by bisection over the indices (all < `size`).
    `r` as in `_row` (t >= 1 when it has a valid mask); `index` None: the row's positions."""

    def ties(i):
        keys, valid = _row(r, i)
        above, at = keys > t, keys == t
        if valid is not None:
            above, at = above & valid, at & valid
        return above, at, _positions(keys) if index is None else index

    above, at, idx = ties(jnp.int32(0))
    need = k - _count(above)  # ties kept, lowest indices first
    n_at = _count(at)
    last_all = _total(jnp.where(at, idx, -1), jnp.max)
    nbits = jnp.where((n_at > need) & (need > 0), max(int(size), 1).bit_length(), 0)

    def body(i, offset):  # largest c with count(ties at indices < c) < need: the need-th tie's
        cand = offset | (jnp.int32(1) << (nbits - 1 - i))
        _, at, idx = ties(i)
        return jnp.where(_count(at & (idx < cand)) < need, cand, offset)

    nth = lax.fori_loop(0, nbits, body, jnp.int32(0))
    return jnp.where(n_at <= need, last_all, jnp.where(need > 0, nth, -1))


def _second_try(scores, k, plan):
    """One layer's (threshold, last kept tie index) when its gathered candidates overflowed, i.e.
    the threshold moved far from the hint. Every key between the hint and the threshold, and every
    tie of the threshold, lies in a block at least as close as the j-th closest (`_bracket`): when
    those blocks number at most 1/_WIDE_SHARE of the layer they are gathered in index order and
    bisected within the bracket, otherwise the whole layer is (about 20 passes instead of 32)."""
    nb = plan.near.shape[0]
    k = jnp.asarray(k, jnp.int32)
    inside, cap, base, nbits = _wide_blocks(plan)

    def gathered():
        idx = jnp.nonzero(inside, size=cap, fill_value=nb)[0].astype(jnp.int32)
        keys, index, kprime = _gather(scores, k, plan.count, idx)
        t = _bisect(keys, kprime, base, nbits)
        return t, _last_kept_one(keys, kprime, t, index, (nb + 1) * _BLOCK)

    def whole():  # keys recomputed in each pass: no buffer of the layer's size
        def r(i):
            return order_keys(_tied(scores, i)).reshape(-1), None

        t = _bisect(r, k, base, nbits)
        return t, _last_kept_one(r, k, t, None, scores.size)

    t, last = lax.cond(_count(inside) <= cap, gathered, whole)
    return jnp.where(k > 0, t, jnp.uint32(_MAX)), last


def _kth_largest_many(rows, ks):
    """The k-th largest key of each row (maximum uint32 where k = 0): 32 passes for all rows."""
    ks = [jnp.asarray(k, jnp.int32) for k in ks]

    def body(i, found):
        bit = jnp.uint32(1) << (jnp.uint32(31) - i)
        return [
            jnp.where(_count(r >= (f | bit)) >= k, f | bit, f) for r, f, k in zip(rows, found, ks)
        ]

    found = lax.fori_loop(jnp.uint32(0), jnp.uint32(32), body, [jnp.uint32(0)] * len(rows))
    return [jnp.where(k > 0, f, jnp.uint32(_MAX)) for f, k in zip(found, ks)]


# The segmented passes sum each row's keys in chunks of _SEG_LINES lines of _ROW keys (a row is
# padded to whole chunks), so the segment sum adds a few thousand chunk counts rather than one
# count per line (on an NVIDIA H200 this took the VGG-19 mask update from 4.6 to 1.3 ms).
# _SEG_UNROLL unrolls the 32 passes; measured slower there, so off (docs/RESULTS.md, Speed).
_SEG_LINES = 64
_SEG_UNROLL = False


def _segments(rows, lines=1):
    """All rows as one [Q, lines * _ROW] array (each row zero-padded to whole chunks: key 0 ranks
    below every real key) and the row id of each of its Q chunks (static)."""
    width = lines * _ROW
    parts, ids = [], []
    for i, r in enumerate(rows):
        pad = -r.size % width
        parts.append(jnp.pad(r, (0, pad)))
        ids.append(np.full((r.size + pad) // width, i, np.int32))
    return jnp.concatenate(parts).reshape(-1, width), np.concatenate(ids)


def _kth_largest_segmented(rows, ks):
    """`_kth_largest_many` as one counting pass over every row's keys per bit (a chunked row sum
    and a segment sum), instead of one reduction per row per bit: on an accelerator a pass is then
    a couple of kernels whatever the number of rows (layers), not several per row."""
    keys, ids = _segments(rows, _SEG_LINES)
    seg = jnp.asarray(ids)
    ks = jnp.stack([jnp.asarray(k, jnp.int32) for k in ks])

    def body(i, found):
        cand = found | (jnp.uint32(1) << (jnp.uint32(31) - jnp.asarray(i, jnp.uint32)))
        per_chunk = jnp.sum((keys >= cand[seg][:, None]).astype(jnp.int32), axis=1)
        counts = jax.ops.segment_sum(per_chunk, seg, len(rows), indices_are_sorted=True)
        return jnp.where(counts >= ks, cand, found)

    found = lax.fori_loop(0, 32, body, jnp.zeros(len(rows), jnp.uint32), unroll=_SEG_UNROLL)
    found = jnp.where(ks > 0, found, jnp.uint32(_MAX))
    return [found[i] for i in range(len(rows))]


def _last_kept(rows, ks, thresholds, indices):
    """Per row: the largest index among the ties at the threshold that the top-k keeps (-1: none).

    Rows are in ascending index order; the cumulative sum is skipped when every tie is kept."""
    above = [_count(r > t) for r, t in zip(rows, thresholds)]
    at = [r == t for r, t in zip(rows, thresholds)]
    unique = jnp.all(jnp.stack([_count(a) + n == k for a, n, k in zip(at, above, ks)]))

    def last(keep):
        return [_total(jnp.where(a & kp, i, -1), jnp.max) for a, kp, i in zip(at, keep, indices)]

    return lax.cond(
        unique,
        lambda: last([True] * len(rows)),
        lambda: last([jnp.cumsum(a, dtype=jnp.int32) <= k - n for a, n, k in zip(at, above, ks)]),
    )


def _row_total(x, fn=jnp.sum):
    """`fn` over each row of a [R, S] array, through rows of _ROW where S allows (XLA:CPU
    vectorises those; a longer row goes through its tree-reduction rewrite)."""
    r, s = x.shape
    if s % _ROW == 0 and s > _ROW:
        x = fn(x.reshape(r, s // _ROW, _ROW), axis=2)
    return fn(x, axis=1)


def _row_count(pred):
    return _row_total(pred.astype(jnp.int32))


def _stacked_selection(rows, ks, indices, hints=None):
    """`_selection` with the rows of each size stacked into one [R, S] array, so that a counting
    pass is one operation per size rather than one per row (the gathered candidates of
    ResNet-50's 54 layers come in 9 sizes), and with fewer passes: a row with a hint (its top-k
    threshold key, roughly) whose window of 2**16 keys around it holds the threshold bisects that
    window alone, and a row without one bisects between its smallest nonzero key and its largest
    (the restriction's revive and prune rows hold only a few keys near the threshold). All rows
    share one loop of as many passes as the widest row needs. Same thresholds and last ties,
    row for row."""
    sizes = {}
    for i, r in enumerate(rows):
        sizes.setdefault(r.size, []).append(i)
    groups = list(sizes.values())
    keys = [jnp.stack([rows[i] for i in g]) for g in groups]
    kk = [jnp.stack([jnp.asarray(ks[i], jnp.int32) for i in g]) for g in groups]
    index = [jnp.stack([indices[i] for i in g]) for g in groups]
    if hints is None:  # [smallest nonzero key, largest key]: key 0 is padding or not a candidate
        base = [_row_total(jnp.where(x > 0, x, jnp.uint32(_MAX)), jnp.min) for x in keys]
        top = [_row_total(x, jnp.max) for x in keys]
        base = [jnp.where(t > 0, b, 0) for b, t in zip(base, top)]
        nbits = [jnp.uint32(32) - lax.clz(t - b) for b, t in zip(base, top)]
    else:
        width = jnp.uint32(1 << _WINDOW_BITS)
        hh = [jnp.stack([jnp.asarray(hints[i], jnp.uint32) for i in g]) for g in groups]
        lo = [jnp.clip(h, width // 2, jnp.uint32(_MAX) - width) - width // 2 for h in hh]
        inside = [
            (_row_count(x >= w[:, None]) >= k) & (_row_count(x >= (w + width)[:, None]) < k)
            for x, w, k in zip(keys, lo, kk)
        ]
        base = [jnp.where(i, w, jnp.uint32(0)) for i, w in zip(inside, lo)]
        nbits = [jnp.where(i, jnp.uint32(_WINDOW_BITS), jnp.uint32(32)) for i in inside]
    passes = jnp.max(jnp.concatenate(nbits))

    def body(i, offset):
        bit = passes - 1 - i
        out = []
        for x, o, k, b, n in zip(keys, offset, kk, base, nbits):
            cand = o | (jnp.uint32(1) << bit)
            t = b + cand  # past the top of uint32 (b + 2**n may wrap): never qualifies
            ok = (bit < n) & (t >= b) & (_row_count(x >= t[:, None]) >= k)
            out.append(jnp.where(ok, cand, o))
        return out

    zero = [jnp.zeros(len(g), jnp.uint32) for g in groups]
    offset = lax.fori_loop(jnp.uint32(0), passes, body, zero)
    found = [jnp.where(k > 0, b + o, jnp.uint32(_MAX)) for b, o, k in zip(base, offset, kk)]
    above = [_row_count(x > t[:, None]) for x, t in zip(keys, found)]
    at = [x == t[:, None] for x, t in zip(keys, found)]
    unique = jnp.all(jnp.concatenate([_row_count(a) + n == k for a, n, k in zip(at, above, kk)]))

    def last(keep):
        return [_row_total(jnp.where(a & kp, i, -1), jnp.max) for a, kp, i in zip(at, keep, index)]

    last = lax.cond(
        unique,
        lambda: last([True] * len(groups)),
        lambda: last(
            [
                jnp.cumsum(a, axis=1, dtype=jnp.int32) <= (k - n)[:, None]
                for a, n, k in zip(at, above, kk)
            ]
        ),
    )
    thresholds, lasts = [None] * len(rows), [None] * len(rows)
    for g, t, c in zip(groups, found, last):
        for j, i in enumerate(g):
            thresholds[i], lasts[i] = t[j], c[j]
    return thresholds, lasts


def _selection(rows, ks, indices, segmented=False, stacked=False, hints=None):
    """Per row the threshold key and the last tie index of its top-k: see `_chosen`."""
    if stacked:
        return _stacked_selection(rows, ks, indices, hints)
    thresholds = (_kth_largest_segmented if segmented else _kth_largest_many)(rows, ks)
    return thresholds, _last_kept(rows, ks, thresholds, indices)


def _chosen(keys, index, threshold, last):
    return (keys > threshold) | ((keys == threshold) & (index <= last))


def _positions(x):
    return jnp.arange(x.size, dtype=jnp.int32)


SELECTIONS = ('hinted', 'segmented')


def default_selection() -> str:
    """How `topk_masks` selects on this backend. 'hinted' on CPU, where memory traffic dominates:
    one pass narrows each layer to a few candidate blocks around its hint. 'segmented' on GPU and
    TPU, where the number of kernels dominates: the hints' per-layer gathers, top_k's and
    fallback branches cost more there than 32 exact counting passes over all the keys, each one
    kernel for every layer together (measured on an NVIDIA H200: docs/RESULTS.md, Speed)."""
    return 'hinted' if jax.default_backend() == 'cpu' else 'segmented'


def resolve_selection(selection: str | None) -> str:
    """`selection`, or the backend's default for None; an unknown name is refused in one line."""
    selection = selection or default_selection()
    if selection not in SELECTIONS:
        raise ValueError(f'selection must be one of {SELECTIONS}, not {selection!r}')
    return selection


@functools.partial(jax.jit, static_argnames='selection')
def topk_masks(
    scores: dict[str, jax.Array],
    kept: dict[str, int | jax.Array],
    hints: dict[str, jax.Array] | None = None,
    selection: str | None = None,
    old: dict[str, jax.Array] | None = None,
):
    """`topk_mask_with_threshold` for every layer of a dict in one call: (masks, thresholds), and
    with `old` (the masks these replace) a third output, the count of positions whose bit flips
    (all layers; int32).

    Same masks and threshold keys as the per-layer function, whichever `selection` (None: the
    backend's `default_selection()`). 'hinted' with `hints` (last step's thresholds): one pass
    over the scores finds a few candidate blocks per layer and the selection runs on those (a
    layer whose candidates miss falls back alone to the warm-started per-layer bisection);
    without hints all layers share 32 bisection passes. 'segmented' ignores the hints: 32
    counting passes over the concatenated keys of all layers, one segmented reduction each.
    Either way the masks are then written in one elementwise pass. The flips of a layer whose
    candidates were gathered are counted from the hint pass and the gathered blocks alone.
    """
    selection = resolve_selection(selection)
    names = list(scores)
    ks = [jnp.asarray(kept[n], jnp.int32) for n in names]

    def keys():  # recomputed where used: fused into each pass instead of written out
        return [order_keys(scores[n]).reshape(-1) for n in names]

    def exact():
        rows = keys()
        return _selection(rows, ks, [_positions(r) for r in rows], selection == 'segmented')

    counting = old is not None

    def all_flips(n, t, c):  # a pass over the layer's scores and old mask
        r = order_keys(scores[n]).reshape(-1)
        return _count(_chosen(r, _positions(r), t, c) != old[n].reshape(-1))

    if hints is None or selection == 'segmented':
        thresholds, last = exact()
        flips = [all_flips(n, t, c) for n, t, c in zip(names, thresholds, last)] if counting else []
    else:
        plans = [
            _plan(scores[n], k, hints[n], old=old[n] if counting else None) for n, k in zip(names, ks)
        ]
        fast = _selection(
            [p.keys for p in plans], [p.k for p in plans], [p.index for p in plans],
            stacked=True, hints=[p.h for p in plans],
        )
        thresholds, last, flips = [], [], []
        for i, (n, p) in enumerate(zip(names, plans)):

            def gathered(i=i, p=p, n=n):
                t, c = fast[0][i], fast[1][i]
                if not counting:
                    return t, c
                new_rows = _chosen(p.keys, p.index, t, c)
                return t, c, _flips(p, new_rows, _gathered_rows(old[n], p.idx))

            def second_try(n=n, i=i, p=p):
                t, c = _second_try(scores[n], ks[i], p)
                return (t, c, all_flips(n, t, c)) if counting else (t, c)

            # per layer, scalars out: a layer whose candidates overflow (many flips, ties at the
            # threshold) pays for its own second try, not every layer's. (A 0/1-trip loop instead
            # of lax.cond, which copies the scores into its branches, measured slower.)
            out = lax.cond(p.valid, gathered, second_try)
            thresholds.append(out[0])
            last.append(out[1])
            flips += out[2:]
    masks = {
        n: _chosen(r, _positions(r), t, c).reshape(scores[n].shape)
        for n, r, t, c in zip(names, keys(), thresholds, last)
    }
    if counting:
        return masks, dict(zip(names, thresholds)), sum(flips, jnp.int32(0))
    return masks, dict(zip(names, thresholds))


@jax.custom_vjp
def ste(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Straight-through estimator: returns `mask` as scores' dtype; the gradient goes to `scores` unchanged."""
    return mask.astype(scores.dtype)


def _ste_fwd(scores, mask):
    return mask.astype(scores.dtype), None


def _ste_bwd(_, g):
    return g, None


ste.defvjp(_ste_fwd, _ste_bwd)
