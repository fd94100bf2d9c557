"""The short restriction: a pure mask update that swaps only a fraction of the candidates.

With T the top-k of the new scores and M the current mask (|M| = k):
revive candidates are T \\ M, prune candidates M \\ T, both of size c. `restrict_mask` performs
r = ceil(rate * c) swaps: the r highest-ranked revive candidates come in, the r lowest-ranked prune
candidates go out (ranking as in `ljax.masks`: score, then lower index). The count never changes;
rate = 1 gives plain top-k, rate = 0 freezes the mask.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ljax import masks
from ljax.reductions import count

RateSchedule = Callable[[jax.Array], jax.Array]


def num_swaps(rate, candidates):
    """r = ceil(rate * c) in float32, clipped to [0, c]."""
    r = jnp.ceil(jnp.asarray(rate, jnp.float32) * candidates.astype(jnp.float32)).astype(jnp.int32)
    return jnp.clip(r, 0, candidates)


@jax.jit
def restrict_mask_with_threshold(mask, scores, k, rate, hint=None):
    """`restrict_mask`, also returning the top-k threshold key (a hint for the next step)."""
    top, threshold = masks.topk_mask_with_threshold(scores, k, hint=hint)
    revive = top & ~mask
    prune = mask & ~top
    c = count(revive)
    r = num_swaps(rate, c)

    def restricted():
        come_in = masks.topk_mask(scores, r, valid=revive)
        stay = masks.topk_mask(scores, c - r, valid=prune)
        return (mask & ~(prune & ~stay)) | come_in

    return lax.cond(r == c, lambda: top, restricted), threshold


def restrict_mask(mask: jax.Array, scores: jax.Array, k, rate) -> jax.Array:
    """New mask after at most ceil(rate * c) swaps; `mask` must hold exactly `k` True entries."""
    return restrict_mask_with_threshold(mask, scores, k, rate)[0]


def _swap_selections(rows, old, index, ks, rate, segmented=False, hints=None):
    """The top-k, revive and keep selections of each row, as (threshold, last tie index) pairs.
    With `hints` (the hinted path's gathered candidates) the rows go through
    `masks._stacked_selection`, the top-k's warm-started at the hints."""
    stacked = hints is not None
    top = masks._selection(rows, ks, index, segmented, stacked, hints)
    chosen = [masks._chosen(r, i, t, c) for r, i, t, c in zip(rows, index, *top)]
    revive = [t & ~o for t, o in zip(chosen, old)]
    prune = [o & ~t for t, o in zip(chosen, old)]
    c = [count(r) for r in revive]
    r = [num_swaps(rate, ci) for ci in c]
    # invalid entries get key 0, below every real score (as `topk_mask(..., valid=)` does)
    t, last = masks._selection(
        [jnp.where(v, kk, jnp.uint32(0)) for v, kk in zip(revive + prune, rows + rows)],
        r + [ci - ri for ci, ri in zip(c, r)],
        index + index,
        segmented,
        stacked,
    )
    n = len(rows)
    return top, (t[:n], last[:n]), (t[n:], last[n:])


@functools.partial(jax.jit, static_argnames=('selection', 'count_flips'))
def restrict_masks(
    mask: dict[str, jax.Array],
    scores: dict[str, jax.Array],
    kept: dict[str, int | jax.Array],
    rate,
    hints: dict[str, jax.Array] | None = None,
    selection: str | None = None,
    count_flips: bool = False,
):
    """`restrict_mask_with_threshold` for every layer of a dict in one call: (mask, thresholds),
    and with `count_flips` a third output, the count of positions whose bit flips (int32; for a
    layer whose blocks were gathered, counted on those blocks alone).

    Same masks and threshold keys as the per-layer function; `rate` (may be traced) is shared.
    With `hints`, one pass over scores and masks finds the few blocks per layer where the top-k
    and the mask can differ and the three selections (top-k, revive, prune) run on those alone,
    and only those blocks of the old mask are rewritten (elsewhere the top-k equals the mask); a
    layer whose candidates overflow runs its own exact selections and writes its whole mask.
    Without hints each selection is an exact bisection shared by all layers, and the new masks are
    written in one elementwise pass.
    `selection` as in `masks.topk_masks`: 'segmented' (the GPU/TPU default) ignores the hints and
    runs each selection as passes over all layers' keys at once.
    """
    selection = masks.resolve_selection(selection)
    names = list(scores)
    ks = [jnp.asarray(kept[n], jnp.int32) for n in names]
    old = [mask[n].reshape(-1) for n in names]

    def keys():  # recomputed where used: fused into each pass instead of written out
        return [masks.order_keys(scores[n]).reshape(-1) for n in names]

    def exact():
        rows = keys()
        positions = [masks._positions(r) for r in rows]
        return _swap_selections(rows, old, positions, ks, rate, selection == 'segmented')

    def write(top, come_in, stay):  # every layer's new mask in one elementwise pass
        new, flips = {}, []
        for i, (n, r, o) in enumerate(zip(names, keys(), old)):
            pos = masks._positions(r)
            flat = _swapped(r, pos, o, top, come_in, stay, i)
            flips.append(count(flat != o))
            new[n] = flat.reshape(mask[n].shape)
        return (new, dict(zip(names, top[0]))) + ((sum(flips, jnp.int32(0)),) if count_flips else ())

    if hints is None or selection == 'segmented':
        return write(*exact())
    plans = [masks._plan(scores[n], k, hints[n], mask[n]) for n, k in zip(names, ks)]
    gathered = [masks._gathered_rows(o, p.idx) for o, p in zip(old, plans)]
    # outside the gathered blocks the top-k equals the mask: no candidate lies there
    fast = _swap_selections(
        [p.keys for p in plans], gathered, [p.index for p in plans], [p.k for p in plans], rate,
        hints=[p.h for p in plans],
    )

    new, thresholds, flips = {}, {}, []
    for i, (n, o, p, g) in enumerate(zip(names, old, plans, gathered)):

        def scattered(o=o, p=p, g=g, i=i):
            # the layer's candidates were all gathered, so outside them the new mask is the old
            # one: only the gathered blocks are rewritten (no pass over all scores and masks)
            flat = _swapped(p.keys, p.index, g, *fast, i)
            rows = flat.reshape(-1, masks._BLOCK)
            nb = p.near.shape[0]
            blocks = jnp.pad(o, (0, nb * masks._BLOCK - o.size)).reshape(nb, masks._BLOCK)
            blocks = blocks.at[p.idx].set(rows, unique_indices=True, indices_are_sorted=True)
            out = blocks.reshape(-1)[: o.size], fast[0][0][i]
            return out + ((count(flat != g),) if count_flips else ())

        def exact_one(score=scores[n], o=o, k=ks[i], p=p):
            sel = tuple(([a], [b]) for a, b in _exact_swaps(score, o, k, rate, p))
            r = masks.order_keys(score).reshape(-1)
            flat = _swapped(r, masks._positions(r), o, *sel, 0)
            return (flat, sel[0][0][0]) + ((count(flat != o),) if count_flips else ())

        # per layer: a layer whose candidates overflow costs its own passes
        out = lax.cond(p.valid, scattered, exact_one)
        new[n], thresholds[n] = out[0].reshape(mask[n].shape), out[1]
        flips += out[2:]
    return (new, thresholds) + ((sum(flips, jnp.int32(0)),) if count_flips else ())


def _exact_swaps(score, old, k, rate, plan):
    """One layer's three selections, (threshold, last tie index) each, by bisection passes over
    all its keys, for a layer whose gathered candidates overflowed. Each pass recomputes the keys,
    the top-k and the revive/prune masks from the scores and the old mask (`masks._tied`), and no
    cumulative sum runs: this fallback needs no buffer of the layer's size, which matters because
    its buffers are allocated on every call, taken or not."""
    t, last = masks._second_try(score, k, plan)
    size = score.size

    def candidates(i):  # (keys, revive, prune) at pass i
        s, o = masks._tied((score, old), i)
        keys = masks.order_keys(s).reshape(-1)
        top = masks._chosen(keys, masks._positions(keys), t, last)
        return keys, top & ~o, o & ~top

    _, revive, _ = candidates(jnp.int32(0))
    c = count(revive)
    r = num_swaps(rate, c)

    def every_swap():  # rate * c rounds up to c: the new mask is the top-k
        everything = (jnp.uint32(0), jnp.int32(size))
        nothing = (jnp.uint32(masks._MAX), jnp.int32(-1))
        return everything, nothing

    def some_swaps():
        out = []
        for which, kk in ((1, r), (2, c - r)):

            def row(i, which=which):
                got = candidates(i)
                return got[0], got[which]

            th = masks._bisect(row, kk, jnp.uint32(0), 32)
            th = jnp.where(kk > 0, th, jnp.uint32(masks._MAX))
            out.append((th, masks._last_kept_one(row, kk, th, None, size)))
        return tuple(out)

    return ((t, last),) + lax.cond(r == c, every_swap, some_swaps)


def _swapped(keys, index, old, top, come_in, stay, i):
    """Row i's new mask from its old one and its three selections (threshold, last tie) lists."""
    top_i = masks._chosen(keys, index, top[0][i], top[1][i])
    revive, prune = top_i & ~old, old & ~top_i
    come = revive & masks._chosen(keys, index, come_in[0][i], come_in[1][i])
    keep = prune & masks._chosen(keys, index, stay[0][i], stay[1][i])
    return (old & ~(prune & ~keep)) | come


SCHEDULES = ('none', 'cosine', 'poly4', 'linear')  # and 'constant:R', a number, a callable


def constant_rate(name) -> float | None:
    """The rate of a constant schedule ('none' = 1.0, a number, 'constant:R'); None for a schedule
    that varies ('cosine', 'poly4', 'linear', a callable). ValueError for an unknown name or a
    constant outside [0, 1]: the one parser of schedule names (the config checks through it)."""
    if callable(name) or name in ('cosine', 'poly4', 'linear'):
        return None
    if isinstance(name, (int, float)) and not isinstance(name, bool):
        rate = float(name)
    elif name == 'none':
        rate = 1.0
    elif isinstance(name, str) and name.startswith('constant:'):
        try:
            rate = float(name.split(':', 1)[1])
        except ValueError:
            rate = float('nan')
    else:
        raise ValueError(
            f"restriction: unknown schedule {name!r}; expected 'none', 'cosine', 'poly4', "
            "'linear', 'constant:R', a rate in [0, 1] or a callable step -> rate"
        )
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f'restriction: a constant rate must lie in [0, 1], got {name!r}')
    return rate


def is_plain_topk(name) -> bool:
    """True when the schedule `name` is rate 1 at every step: the restriction is then plain top-k."""
    try:
        return constant_rate(name) == 1.0
    except ValueError:
        return False


def rate_schedule(name: str | float | RateSchedule, total_steps: int) -> RateSchedule:
    """The restriction rate as a function of the step (optax schedules).

    - 'none' (or 1.0): rate 1 at every step, i.e. plain top-k (edge-popup; the authors' code as
      released, whose (1 - t/T)^4 is rounded up to 1);
    - a float in [0, 1] or 'constant:R': that rate at every step;
    - 'cosine': 1 -> 0 by a half cosine over the search;
    - 'poly4': (1 - t/T)^4, the paper's schedule taken literally; 'linear': 1 - t/T.
    A callable step -> rate is used as it is.
    """
    if callable(name):
        return name
    total_steps = max(int(total_steps), 1)
    rate = constant_rate(name)
    if name == 'cosine':
        return optax.cosine_decay_schedule(1.0, total_steps)
    if name == 'poly4':
        return optax.polynomial_schedule(1.0, 0.0, power=4, transition_steps=total_steps)
    if name == 'linear':
        return optax.linear_schedule(1.0, 0.0, total_steps)
    return optax.constant_schedule(rate)
