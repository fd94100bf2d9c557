"""Exact top-k masks of layers, all layers at once, and the straight-through estimator.

The ranking (score, then lower index; `+0.0 == -0.0`; NaN unsupported) and the exact selection of
a row of keys are `ljax.selection`'s. `topk_mask(scores, k)` keeps the k highest-ranked elements
of one array, exactly k whatever ties exist; with a `hint` (the previous step's threshold key) its
bisection runs within a window around it. `host_topk_mask` is the same top-k in NumPy, for masks
computed once (magnitude masks at set-up): no program to compile, one partition on the host.

`topk_masks` and `restriction.restrict_masks` update every layer of a dict in one call, through
one driver (`update_masks`) and a rule saying how the new mask follows from the selections
(`TOPK` here, the restriction's swaps there). `selection` picks the strategy (`default_selection`):
- 'native' (CPU, where ljax's C++ kernels are built: `ljax.models.onednn.available()`): the
  top-k of every layer is one FFI call (`ljax/csrc/topk_mask.cc`), a task per layer: the same
  candidate blocks around the hint as 'hinted', found in one vectorised pass over the scores and
  the old mask, a selection over their keys, and only the bits that change written, over the old
  mask, their flips counted. The restriction's rule runs 'hinted'. The search's step also hands
  it its score update (`native_topk_masks(..., sgd=)`, `Search.fused_update`), which the pass
  makes just before ranking, bit for bit optax's.
- 'hinted' (CPU): one pass over each layer narrows it to a few candidate blocks around its hint
  (`plan`), the selections run on those, stacked by size and warm-started in the hints' windows,
  and a layer whose candidates miss retries alone (`second_try`). A hint is the previous threshold
  key, or (the search) its extrapolation from the last two (`extrapolate`). Without hints every
  layer is bisected over its 32 bits, all layers in one loop.
- 'segmented' (GPU, TPU): ignores the hints; 32 passes over all layers' keys concatenated.
Either way the cost does not grow with depth: the passes are shared by all layers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ljax import selection as sel
from ljax.reductions import count, native_kernels
from ljax.selection import MAX, chosen, order_keys

__all__ = [
    'order_keys', 'kth_largest_key', 'topk_mask', 'topk_mask_with_threshold', 'host_topk_mask',
    'extrapolate', 'Tuning', 'Plan', 'plan', 'wide_blocks', 'second_try', 'TOPK', 'update_masks',
    'topk_masks', 'masked_weights', 'SELECTIONS', 'default_selection', 'resolve_selection',
    'native_topk_mask', 'native_topk_masks', 'ste', 'masked_ste',
]


def kth_largest_key(keys: jax.Array, k, hint=None) -> jax.Array:
    """The k-th largest key (1 <= k <= keys.size); for k = 0 returns the maximum uint32."""
    return _one(keys, k, hint)[0]


def _one(keys, k, hint):
    # where the segmented selection suits (GPU, TPU) and no hint asks for a window: its layout,
    # whose loop has a length known when compiled (a GPU waits on the host for a loop's every
    # pass when only the device knows its length)
    segmented = hint is None and default_selection() == 'segmented'
    rows = (sel.Segmented if segmented else functools.partial(sel.Stacked, stack=False))(
        [keys.reshape(-1)])
    t, last = sel.select(rows, [k], None if hint is None else [hint])
    return t[0], last[0]


@jax.jit
def topk_mask_with_threshold(scores: jax.Array, k, valid=None, hint=None):
    """Like `topk_mask`, also returning the threshold key (a `hint` for the next call)."""
    keys = order_keys(scores).reshape(-1)
    if valid is not None:
        # Key 0 is the image of a NaN only: invalid elements rank below every real score.
        keys = jnp.where(valid.reshape(-1), keys, jnp.uint32(0))
    t, last = _one(keys, k, hint)
    return chosen(keys, None, t, last).reshape(scores.shape), t


def topk_mask(scores: jax.Array, k, valid=None, hint=None) -> jax.Array:
    """Bool mask of the `k` highest-ranked entries of `scores` (any shape), exactly k of them.

    `valid` (bool, same shape) restricts the choice to valid entries; then k <= valid.sum().
    `k` may be a Python int or a traced int32 scalar.
    """
    return topk_mask_with_threshold(scores, k, valid, hint)[0]


def host_topk_mask(scores, k: int) -> np.ndarray:
    """`topk_mask` in NumPy (float scores of any shape and float dtype, a Python int k): the k-th
    largest score by one partition, then the scores above it and its ties of lowest flat index.
    For masks built once, where compiling the bisection costs more than this does on the host."""
    s = np.asarray(scores).reshape(-1)
    n, k = s.size, int(k)
    if k >= n:
        return np.ones(np.shape(scores), bool)
    if k <= 0:
        return np.zeros(np.shape(scores), bool)
    t = np.partition(s, n - k)[n - k]  # -0.0 == +0.0 in these comparisons, as in the ranking
    keep = s > t
    keep[np.flatnonzero(s == t)[: k - int(np.count_nonzero(keep))]] = True
    return keep.reshape(np.shape(scores))


def extrapolate(last: jax.Array, previous: jax.Array) -> jax.Array:
    """A hint for the next selection from the last two threshold keys: last + (last - previous),
    clamped to uint32. During a search the threshold drifts steadily (momentum), so this lands
    much closer than `last` alone; any hint gives the same masks, only the cost differs."""
    last = jnp.asarray(last, jnp.uint32)
    previous = jnp.asarray(previous, jnp.uint32)
    up = last >= previous
    d = jnp.where(up, last - previous, previous - last)
    return jnp.where(up, last + jnp.minimum(d, jnp.uint32(MAX) - last), last - jnp.minimum(d, last))


# ------------------------------------------------------------------ candidate blocks ('hinted')
# One pass over a layer computes, per block of `block` elements and relative to the hint key h:
# the count of keys >= h, the largest key below h and the smallest key >= h (and, given the old
# mask, how many elements of the block disagree between `key >= h` and it). With e = count(keys
# >= h) - k, the threshold is the (-e)-th largest key below h (e < 0) or the (e+1)-th smallest key
# >= h (e >= 0), so it and every element between it and h lie in the |e|+1 blocks whose closest
# key to h is closest: those blocks (and, for the restriction, the disagreeing ones) are gathered,
# a few per layer, and the selections run on them. When they do not fit, the layer retries alone.
class Tuning(NamedTuple):
    """Sizes the benchmarks vary (static under jit: pass `tuning=Tuning(...)`)."""

    block: int = 64  # elements per candidate block
    # A layer of at most `whole` blocks is gathered whole (its 32 passes are cheap). 1024 made 64
    # equal layers of 65,536 weights cost 165 ms (32 passes over all 4.2M keys) against 23 ms
    # with 64, and ResNet-50's update 73 -> 51 ms (restriction 147 -> 88 ms).
    whole: int = 64
    min_blocks: int = 32  # blocks gathered per larger layer: the larger of this ...
    block_share: int = 64  # ... and 1/block_share of the layer's blocks
    wide_share: int = 8  # the second try gathers up to 1/wide_share of a layer's blocks
    lines: int = 64  # 'segmented': lines of 64 keys per chunk (`selection.Segmented`)
    unroll: bool = False  # 'segmented': unroll the 32 passes


TUNING = Tuning()


class Plan(NamedTuple):
    """One layer's gathered candidates: block ids (ascending), their keys and flat indices."""

    idx: jax.Array  # [cap] int32
    keys: jax.Array  # [cap * block] uint32, 0 past the end of the layer
    index: jax.Array  # [cap * block] int32
    k: jax.Array  # the layer's k minus the count of keys >= threshold outside the candidates
    valid: jax.Array  # bool: the candidates hold the threshold, all its ties and (force) the changes
    near: jax.Array  # [nb] uint32 per block: closeness to the hint of its key nearest on the
    #                  threshold's side (0: none there)
    count: jax.Array  # [nb] int32 per block: keys >= the hint
    h: jax.Array  # the hint as used (uint32)
    e: jax.Array  # count of keys >= h minus k: the threshold is >= h when e >= 0, below it if not
    j: jax.Array  # the threshold is the j-th closest key to h on its side
    changed: jax.Array | None = None  # [nb] int32 per block: keys >= h where `old` is False or
    #                                   the reverse (with `old` given)


def _blocks(x, nb, block):
    """A layer's flat array as [nb, block] (zero-padded: key 0 ranks below every real score)."""
    return jnp.pad(x.reshape(-1), (0, nb * block - x.size)).reshape(nb, block)


def plan(scores, k, hint, old=None, force=False, tuning: Tuning = TUNING) -> Plan:
    """One layer's candidate blocks around `hint`, from one variadic reduce over its keys.

    old: the mask being replaced; the blocks where keys >= hint and it differ are counted
    (`changed`, for the count of flips) and, with `force` (the restriction, whose new mask equals
    `old` outside the candidates), all gathered (the plan is invalid if they do not fit)."""
    n, block = scores.size, tuning.block
    nb = -(-n // block)
    # The barrier keeps XLA from merging these keys with the mask write's (the same expression
    # of the same scores): merged, XLA:CPU wrote every layer's keys out and read them back, which
    # doubled `topk_masks` on ResNet-50's shapes (about 100 -> 50 ms, docs/RESULTS.md, Speed).
    kb = _blocks(order_keys(lax.optimization_barrier(scores)), nb, block)
    cap = nb if nb <= tuning.whole else max(tuning.min_blocks, nb // tuning.block_share)
    k = jnp.asarray(k, jnp.int32)
    h = jnp.maximum(jnp.asarray(hint, jnp.uint32), 1)  # padding (key 0) stays below h
    h = jnp.where(k == 0, jnp.uint32(MAX), jnp.where(k == n, jnp.uint32(1), h))
    ge = kb >= h
    ops = [ge.astype(jnp.int32), jnp.where(ge, jnp.uint32(0), kb), jnp.where(ge, ~kb, 0)]
    if old is not None:
        ops.append((ge != _blocks(old, nb, block)).astype(jnp.int32))

    def combine(a, b):  # one variadic reduce: a single pass over the keys
        out = (a[0] + b[0], jnp.maximum(a[1], b[1]), jnp.maximum(a[2], b[2]))
        return out + ((a[3] + b[3],) if old is not None else ())

    zero = (jnp.int32(0), jnp.uint32(0), jnp.uint32(0), jnp.int32(0))[: len(ops)]
    stats = lax.reduce(tuple(ops), zero, combine, (1,))
    counts, below, above = stats[:3]
    changed = stats[3] if old is not None else None
    e = jnp.sum(counts) - k
    j = jnp.where(e < 0, -e, e + 1)
    # closeness to h of each block's nearest key on the threshold's side (0: none there)
    near = jnp.where(e < 0, below, above)
    # priority: minus the distance from h of that key, in float32, which is exact for the 2**24
    # keys nearest h (a float32 of `near` itself ties keys that differ in their last 8 bits, and
    # early in a search, scores near 1.0 and 1 - margin, those ties left the threshold's block out)
    dist = jnp.where(e < 0, h - near, ~near - h)
    priority = jnp.where(near == 0, -jnp.inf, -dist.astype(jnp.float32))
    if force:
        priority = jnp.where(changed > 0, jnp.inf, priority)
    if cap == nb:  # a small layer: every block (cheaper than choosing)
        idx = jnp.arange(nb, dtype=jnp.int32)
    else:
        _, idx = lax.top_k(priority, cap)  # far blocks may tie in float32: checked exactly below
        idx = (-lax.top_k(-idx.astype(jnp.float32), cap)[0]).astype(jnp.int32)  # ascending
    inside = jnp.zeros(nb, bool).at[idx].set(True)
    outside_max = jnp.max(jnp.where(inside, jnp.uint32(0), near))
    valid = (k == 0) | (outside_max == 0) | (count(near[idx] > outside_max) >= j)
    if force:
        valid &= ~jnp.any(~inside & (changed > 0))
    # gathered from the scores, not from `kb`, which would then be written out in full
    keys, index, kprime = _gather(scores, k, counts, idx, block)
    return Plan(idx, keys, index, kprime, valid, near, counts, h, e, j, changed)


def _gather(scores, k, counts, idx, block):
    """Keys and flat indices of the blocks `idx` (ids >= nb give padding, key 0), and the k that
    the selection among them needs: k minus the count of keys >= the hint outside them."""
    n, nb = scores.size, counts.shape[0]
    index = (idx[:, None] * block + jnp.arange(block, dtype=jnp.int32)).reshape(-1)
    rows = _blocks(scores, nb + 1, block)[idx]
    keys = jnp.where(index < n, order_keys(rows).reshape(-1), jnp.uint32(0))
    return keys, index, k - jnp.sum(counts) + jnp.sum(jnp.pad(counts, (0, 1))[idx])


def wide_blocks(p: Plan, tuning: Tuning = TUNING):
    """(inside, cap, base, nbits) for a far-moved threshold: the blocks it needs, how many the
    second try gathers, and the bracket [base, base + 2**nbits) holding it. On the threshold's
    side the j blocks closest to h hold j keys between h and the key of v (the j-th largest block
    closeness; 0: fewer blocks than j), so the threshold lies between them."""
    nb = p.near.shape[0]
    rows = sel.Stacked([p.near], stack=False)
    v = sel.threshold(rows, rows.values([p.j], jnp.int32))[0]
    up = p.e >= 0
    # above h: the threshold is in [h, ~v]; below: in [v, h - 1] (v = 0: no bound but 0)
    top = jnp.where(v == 0, jnp.uint32(MAX), ~v)
    base = jnp.where(up, p.h, v)
    nbits = jnp.uint32(32) - lax.clz(jnp.where(up, top - p.h, p.h - jnp.uint32(1) - v))
    inside = (p.near >= v) & (p.near > 0)
    return inside, min(nb, max(tuning.min_blocks, nb // tuning.wide_share)), base, nbits


def second_try(scores, k, p: Plan, tuning: Tuning = TUNING):
    """One layer's (threshold, last kept tie) when its gathered candidates missed, i.e. the
    threshold moved far from the hint. Every key between the hint and the threshold, and every tie
    of the threshold, lies in a block at least as close as the j-th closest (`wide_blocks`): when
    those blocks number at most 1/wide_share of the layer they are gathered in index order and
    bisected within the bracket, otherwise the whole layer is (about 20 passes instead of 32),
    its keys recomputed in each pass (`selection.tied`: no buffer of the layer's size)."""
    nb, block = p.near.shape[0], tuning.block
    k = jnp.asarray(k, jnp.int32)
    inside, cap, base, nbits = wide_blocks(p, tuning)

    def gathered():
        idx = jnp.nonzero(inside, size=cap, fill_value=nb)[0].astype(jnp.int32)
        keys, index, kprime = _gather(scores, k, p.count, idx, block)
        rows = sel.Stacked([keys], [index], stack=False, bound=(nb + 1) * block)
        t, last = sel.select(rows, [kprime], bracket=([base], [nbits]))
        return t[0], last[0]

    def whole():
        rows = sel.Stacked(lambda i: [order_keys(sel.tied(scores, i)).reshape(-1)], stack=False)
        t, last = sel.select(rows, [k], bracket=([base], [nbits]))
        return t[0], last[0]

    t, last = lax.cond(count(inside) <= cap, gathered, whole)
    return jnp.where(k > 0, t, jnp.uint32(MAX)), last


# ------------------------------------------------------------------ the driver
class TopK:
    """The rule of `topk_masks`: the new mask is the top-k. A rule gives the selections of rows
    (full layers, or a layer's gathered blocks) as (top, extra): the top-k's (thresholds, lasts)
    and any further (thresholds, lasts) pairs; `write`s one row's new mask from its share of
    them; and gives one layer's selections when its candidates missed (`fallback`).
    `gather_changes`: outside the gathered blocks the new mask is the old one (their plan gathers
    every block where they differ, and only those blocks are rewritten)."""

    gather_changes = False

    def select(self, layout, rows, index, old, ks, hints):
        return sel.select(layout(rows, index), ks, hints), ()

    def write(self, keys, index, old, top, extra):
        return chosen(keys, index, *top)

    def fallback(self, scores, old, k, p, tuning):
        return second_try(scores, k, p, tuning), ()


TOPK = TopK()


def _row(pairs, i):
    return tuple((t[i], c[i]) for t, c in pairs)


def masked_weights(mask, weights, xp=jnp):
    """`where(mask, weights, +0.0)` of every layer of the dict `mask`: the weights as the masked
    model sees them (pruned ones exactly +0.0, kept ones untouched). xp: jnp, or np on the host."""
    return {n: xp.where(xp.asarray(m), weights[n], xp.zeros((), weights[n].dtype))
            for n, m in mask.items()}


def update_masks(scores, kept, hints=None, *, rule=TOPK, old=None, count_flips=False,
                 selection=None, tuning: Tuning = TUNING, weights=None, masked=None):
    """The new masks of every layer of a dict under `rule` (`TOPK` or the restriction's): (masks,
    thresholds), plus with `count_flips` the count of positions whose bit differs from `old`
    (int32; for a layer whose blocks were gathered, counted from the plan and those blocks), plus
    with `weights` the new `masked_weights` (the native kernel writes float32 ones over `masked`,
    the old masks' masked weights, in the blocks that change).
    Call it inside jit (`topk_masks`, `restriction.restrict_masks`)."""
    selection = resolve_selection(selection)
    native = selection == 'native' and rule is TOPK
    if weights is not None and not (
        native and old is not None and masked is not None
        and all(w.dtype == jnp.float32 for w in weights.values())
    ):  # the masked weights from the new masks, in one pass
        got = update_masks(scores, kept, hints, rule=rule, old=old, count_flips=count_flips,
                           selection=selection, tuning=tuning)
        return got + (masked_weights(got[0], weights),)
    names = list(scores)
    ks = [jnp.asarray(kept[n], jnp.int32) for n in names]
    olds = [None if old is None else old[n].reshape(-1) for n in names]
    if count_flips and old is None:
        raise ValueError('counting flips needs the old masks (old=)')
    if native:  # the C++ kernel, one call for every layer (with weights: they are rewritten too)
        got = native_topk_masks(
            [scores[n] for n in names], ks, None if hints is None else [hints[n] for n in names],
            olds, *(() if weights is None else ([weights[n] for n in names],
                                                [masked[n] for n in names])))
        result = (dict(zip(names, got[0])), {n: got[1][i] for i, n in enumerate(names)})
        if count_flips:
            result += (jnp.sum(got[2]),)
        return result if weights is None else result + (dict(zip(names, got[3])),)
    if selection == 'native':  # the restriction's rule: its XLA program
        selection = 'hinted'

    def keys():  # recomputed where used: fused into each pass instead of written out
        return [order_keys(scores[n]).reshape(-1) for n in names]

    def out(new, thresholds, flips):
        new = {n: new[i].reshape(scores[n].shape) for i, n in enumerate(names)}
        out = (new, dict(zip(names, thresholds)))
        return out + (sum(flips, jnp.int32(0)),) if count_flips else out

    def flips_of(new, o):
        return count(new != o) if count_flips else jnp.int32(0)

    if hints is None or selection == 'segmented':
        if selection == 'segmented':
            layout = functools.partial(sel.Segmented, lines=tuning.lines, unroll=tuning.unroll)
        else:
            layout = functools.partial(sel.Stacked, stack=False)
        top, extra = rule.select(layout, keys(), [None] * len(names), olds, ks, None)
        new = [rule.write(r, None, o, (top[0][i], top[1][i]), _row(extra, i))
               for i, (r, o) in enumerate(zip(keys(), olds))]
        return out(new, top[0], [flips_of(m, o) for m, o in zip(new, olds)])

    block = tuning.block
    plans = [plan(scores[n], k, hints[n], o if rule.gather_changes or count_flips else None,
                  rule.gather_changes, tuning) for n, k, o in zip(names, ks, olds)]
    old_rows = [None if o is None else _blocks(o, p.near.shape[0] + 1, block)[p.idx].reshape(-1)
                for o, p in zip(olds, plans)]
    bound = max((p.near.shape[0] + 1) * block for p in plans)
    top, extra = rule.select(
        functools.partial(sel.Stacked, bound=bound), [p.keys for p in plans],
        [p.index for p in plans], old_rows, [p.k for p in plans], [p.h for p in plans],
    )
    new, thresholds, flips = [None] * len(names), [], []
    for i, (n, o, p, g) in enumerate(zip(names, olds, plans, old_rows)):

        def gathered(i=i, o=o, p=p, g=g):
            sel_i = ((top[0][i], top[1][i]), _row(extra, i))
            rows = rule.write(p.keys, p.index, g, *sel_i) if count_flips or rule.gather_changes else None
            f = jnp.int32(0)
            if count_flips:  # the changes outside the gathered blocks, and inside them
                outside = jnp.sum(p.changed) - jnp.sum(jnp.pad(p.changed, (0, 1))[p.idx])
                f = outside + count(rows != g)
            if rule.gather_changes:  # only the gathered blocks of the old mask are rewritten
                nb = p.near.shape[0]
                blocks = _blocks(o, nb, block).at[p.idx].set(
                    rows.reshape(-1, block), unique_indices=True, indices_are_sorted=True)
                return blocks.reshape(-1)[: o.size], sel_i[0][0], f
            return sel_i, f

        def fallback(i=i, n=n, o=o, p=p):
            sel_i = rule.fallback(scores[n], o, ks[i], p, tuning)
            if not (rule.gather_changes or count_flips):
                return sel_i, jnp.int32(0)
            flat = rule.write(order_keys(scores[n]).reshape(-1), None, o, *sel_i)
            if rule.gather_changes:
                return flat, sel_i[0][0], flips_of(flat, o)
            return sel_i, flips_of(flat, o)

        # per layer: a layer whose candidates miss pays for its own second try, not every
        # layer's. (A 0/1-trip loop instead of lax.cond, which copies the scores into its
        # branches, measured slower.)
        got = lax.cond(p.valid, gathered, fallback)
        if rule.gather_changes:
            new[i], t, f = got
        else:  # the selections: the mask is written below
            new[i], f = got
            t = new[i][0][0]
        thresholds.append(t)
        flips.append(f)
    if not rule.gather_changes:  # every layer's new mask in one elementwise pass
        new = [rule.write(r, None, o, *s) for r, o, s in zip(keys(), olds, new)]
    return out(new, thresholds, flips)


SELECTIONS = ('native', 'hinted', 'segmented')


def _native_available() -> bool:
    return native_kernels()


def default_selection() -> str:
    """How `topk_masks` selects on this backend. On CPU, where memory traffic dominates: 'native'
    where ljax's C++ kernels are built (one pass over each layer, then a write of the blocks that
    change, and no program of its own to compile), else 'hinted' (one pass narrows each layer to
    a few candidate blocks around its hint). 'segmented' on GPU and TPU, where the number of
    kernels dominates: the hints' per-layer gathers, top_k's and fallback branches cost more there
    than 32 exact counting passes over all the keys, each one kernel for every layer together
    (measured on an NVIDIA H200: docs/RESULTS.md, Speed)."""
    if jax.default_backend() != 'cpu':
        return 'segmented'
    return 'native' if _native_available() else 'hinted'


def resolve_selection(selection: str | None) -> str:
    """`selection`, or the backend's default for None; an unknown name, or 'native' where the
    kernel cannot run, is refused in one line."""
    selection = selection or default_selection()
    if selection not in SELECTIONS:
        raise ValueError(f'selection must be one of {SELECTIONS}, not {selection!r}')
    if selection == 'native' and not _native_available():
        from ljax.models import onednn

        raise ValueError(
            f"selection='native' needs ljax's C++ kernels, which are not built here "
            f"({onednn.reason()}); use 'hinted'"
        )
    return selection


def native_topk_masks(scores, ks, hints=None, olds=None, weights=None, masked=None, sgd=None):
    """(masks, threshold keys, flips) of several layers (lists) from one call of ljax's C++ kernel
    (XLA:CPU only): per layer the same top-k and threshold as `topk_mask_with_threshold`, and the
    count of positions where the mask differs from its `olds` entry (bool, scores' shape; None:
    all False); thresholds uint32[L] and flips int32[L]. `hints`: per layer the previous threshold
    key or its `extrapolate` (None or 0: estimated from a sample of the keys); they only change
    the cost. With `weights` (float32, scores' shapes) a fourth output, the masked weights
    `where(mask, weights, +0.0)`, written over `masked` only where the bit changes: `masked`
    must be the old masks', `where(old, weights, +0.0)` (None: made so here). The call runs the
    layers side by side on XLA's thread pool.

    With `sgd` = (gradients, momentum, (decay, momentum coefficient, step)), which needs
    `weights`: the masks are those of the scores after the search's score update, made in the
    same pass (`SgdSpan` in ljax/csrc/topk_mask.cc): per layer, with the gradients `g` of the
    masked weights and the weights `w`, u = fma(g, w, scores * decay), momentum' =
    fma(momentum, coefficient, u), scores' = fma(step, momentum', scores): the fused
    multiply-adds XLA:CPU compiles optax's add_decayed_weights and sgd with momentum to, bit for
    bit (with decay > 0: `Search.fused_update`). Two more outputs: the new scores and the new
    momentum (lists)."""
    n = len(scores)
    if n == 0:  # no layer: no call
        none = ([], jnp.zeros((0,), jnp.uint32), jnp.zeros((0,), jnp.int32))
        return none if weights is None else none + ([],)
    olds = [None] * n if olds is None else list(olds)
    olds = [jnp.zeros(s.shape, bool) if o is None else o.reshape(s.shape)
            for s, o in zip(scores, olds)]
    hints = [None] * n if hints is None else list(hints)
    hint = jnp.stack([jnp.asarray(0 if h is None else h, jnp.uint32).reshape(()) for h in hints])
    k = jnp.stack([jnp.asarray(k, jnp.int32).reshape(()) for k in ks])
    args = [k, hint, *(jnp.asarray(s, jnp.float32) for s in scores), *olds]
    result = [jax.ShapeDtypeStruct(s.shape, jnp.bool_) for s in scores]
    aliases = {2 + n + i: i for i in range(n)}  # the new masks over the old: the kernel writes
    if weights is not None:  # the blocks that change
        weights = [jnp.asarray(w, jnp.float32).reshape(s.shape) for w, s in zip(weights, scores)]
        masked = [None] * n if masked is None else list(masked)
        args += weights + [jnp.where(o, w, jnp.float32(0)) if m is None
                           else jnp.asarray(m, jnp.float32).reshape(w.shape)
                           for o, w, m in zip(olds, weights, masked)]
        result += [jax.ShapeDtypeStruct(s.shape, jnp.float32) for s in scores]
        aliases.update({2 + 3 * n + i: n + i for i in range(n)})
    if sgd is not None:
        if weights is None:
            raise ValueError('the score update (sgd=) needs the weights')
        grads, momentum, coefficients = sgd
        args += [jnp.asarray(g, jnp.float32).reshape(s.shape) for g, s in zip(grads, scores)]
        args += [jnp.asarray(m, jnp.float32).reshape(s.shape) for m, s in zip(momentum, scores)]
        args.append(jnp.stack([jnp.asarray(c, jnp.float32).reshape(()) for c in coefficients]))
        result += [jax.ShapeDtypeStruct(s.shape, jnp.float32) for s in scores] * 2
        aliases.update({2 + i: 2 * n + i for i in range(n)})  # the scores and the momentum
        aliases.update({2 + 5 * n + i: 3 * n + i for i in range(n)})
    result += [jax.ShapeDtypeStruct((n,), jnp.uint32), jax.ShapeDtypeStruct((n,), jnp.int32)]
    got = jax.ffi.ffi_call('ljax_topk_masks', result, vmap_method='sequential',
                           input_output_aliases=aliases)(*args)
    out = (list(got[:n]), got[-2], got[-1])
    if weights is not None:
        out += (list(got[n:2 * n]),)
    return out if sgd is None else out + (list(got[2 * n:3 * n]), list(got[3 * n:4 * n]))


def native_topk_mask(scores: jax.Array, k, hint=None, old=None, weights=None, masked=None):
    """`native_topk_masks` of one layer: (mask, threshold key, flips), and with `weights` the
    masked weights."""
    got = native_topk_masks([scores], [k], [hint], [old],
                            *(() if weights is None else ([weights], [masked])))
    return (got[0][0], got[1][0], got[2][0]) + (() if weights is None else (got[3][0],))


@functools.partial(jax.jit, static_argnames=('selection', 'count_flips', 'tuning'))
def topk_masks(
    scores: dict[str, jax.Array],
    kept: dict[str, int | jax.Array],
    hints: dict[str, jax.Array] | None = None,
    selection: str | None = None,
    old: dict[str, jax.Array] | None = None,
    count_flips: bool | None = None,
    tuning: Tuning = TUNING,
    weights: dict[str, jax.Array] | None = None,
    masked: dict[str, jax.Array] | None = None,
):
    """`topk_mask_with_threshold` for every layer of a dict in one call: (masks, thresholds), and
    with `count_flips` a third output, the count of positions whose bit differs from `old` (the
    masks these replace; all layers, int32). count_flips None: counted when `old` is given. With
    `weights` a last output, the new masks' `masked_weights`; `masked` (those of `old`, donated
    with it) lets the native kernel write them in the blocks that change only.

    Same masks and threshold keys as the per-layer function, whichever `selection` (None: the
    backend's `default_selection()`); `hints` (last step's thresholds, or their `extrapolate`)
    only change the cost. See the module docstring.
    """
    count_flips = old is not None if count_flips is None else count_flips
    return update_masks(scores, kept, hints, old=old, count_flips=count_flips,
                        selection=selection, tuning=tuning, weights=weights, masked=masked)


@jax.custom_vjp
def ste(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Straight-through estimator: returns `mask` as scores' dtype; the gradient goes to `scores` unchanged."""
    return mask.astype(scores.dtype)


def _ste_fwd(scores, mask):
    return mask.astype(scores.dtype), None


def _ste_bwd(_, g):
    return g, None


ste.defvjp(_ste_fwd, _ste_bwd)


@jax.custom_vjp
def masked_ste(scores: jax.Array, masked: jax.Array, weights: jax.Array) -> jax.Array:
    """`weights * ste(scores, mask)` of a mask whose `masked_weights` are carried (`masked`):
    returns `masked`, and the gradient goes to `scores` times `weights`, cast to scores' dtype,
    as through `ste`; none goes to `masked` or `weights`. The search's step reads the masked
    weights it carries instead of multiplying them out at every step."""
    return masked


def _masked_ste_fwd(scores, masked, weights):
    return masked, (jnp.zeros((), scores.dtype), weights)


def _masked_ste_bwd(res, g):
    like, weights = res
    return (g * weights).astype(like.dtype), None, None


masked_ste.defvjp(_masked_ste_fwd, _masked_ste_bwd)
