"""The short restriction: a pure mask update that swaps only a fraction of the candidates.

With T the top-k of the new scores and M the current mask (|M| = k):
revive candidates are T \\ M, prune candidates M \\ T, both of size c. `restrict_masks` performs
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

from ljax import masks, selection
from ljax.reductions import count

RateSchedule = Callable[[jax.Array], jax.Array]


def num_swaps(rate, candidates):
    """r = ceil(rate * c) in float32, clipped to [0, c]."""
    r = jnp.ceil(jnp.asarray(rate, jnp.float32) * candidates.astype(jnp.float32)).astype(jnp.int32)
    return jnp.clip(r, 0, candidates)


class Swaps:
    """The rule of `restrict_masks` for `masks.update_masks` (see `masks.TopK`): the top-k, then
    the revive and keep selections among its disagreements with the old mask."""

    gather_changes = True  # outside the candidates the top-k equals the old mask: nothing moves

    def __init__(self, rate):
        self.rate = rate

    def select(self, layout, rows, index, old, ks, hints):
        """With `hints` (the hinted path's gathered candidates) the top-k's are warm-started at
        the hints and the revive and keep rows bisected within their span."""
        top = selection.select(layout(rows, index), ks, hints)
        chosen = [selection.chosen(r, i, t, c) for r, i, t, c in zip(rows, index, *top)]
        revive = [t & ~o for t, o in zip(chosen, old)]
        prune = [o & ~t for t, o in zip(chosen, old)]
        c = [count(r) for r in revive]
        r = [num_swaps(self.rate, ci) for ci in c]
        # invalid entries get key 0, below every real score (as `topk_mask(..., valid=)` does)
        t, last = selection.select(
            layout([jnp.where(v, kk, jnp.uint32(0)) for v, kk in zip(revive + prune, rows + rows)],
                   index + index),
            r + [ci - ri for ci, ri in zip(c, r)],
            span_rows=hints is not None,
        )
        n = len(rows)
        return top, ((t[:n], last[:n]), (t[n:], last[n:]))

    def write(self, keys, index, old, top, extra):
        """A row's new mask from its old one and its three selections ((threshold, last) each)."""
        top = selection.chosen(keys, index, *top)
        revive, prune = top & ~old, old & ~top
        come_in, stay = (selection.chosen(keys, index, *s) for s in extra)
        return (old & ~(prune & ~stay)) | (revive & come_in)

    def fallback(self, score, old, k, plan, tuning):
        """One layer's three selections by bisection passes over all its keys, for a layer whose
        gathered candidates missed. Each pass recomputes the keys, the top-k and the revive/prune
        masks from the scores and the old mask (`selection.tied`): this fallback needs no buffer
        of the layer's size, which matters because its buffers are allocated on every call,
        taken or not."""
        t, last = masks.second_try(score, k, plan, tuning)

        def candidates(i):  # keys, revive and prune at pass i
            s, o = selection.tied((score, old), i)
            keys = selection.order_keys(s).reshape(-1)
            top = selection.chosen(keys, None, t, last)
            return keys, top & ~o, o & ~top

        def rows(i):  # the revive and prune rows: key 0 elsewhere
            keys, revive, prune = candidates(i)
            return [jnp.where(v, keys, jnp.uint32(0)) for v in (revive, prune)]

        c = count(candidates(jnp.int32(0))[1])
        r = num_swaps(self.rate, c)

        def every_swap():  # rate * c rounds up to c: the new mask is the top-k
            return (jnp.uint32(0), jnp.int32(selection.LAST)), (jnp.uint32(selection.MAX), jnp.int32(-1))

        def some_swaps():
            th, lasts = selection.select(selection.Stacked(rows, stack=False), [r, c - r])
            return tuple(zip(th, lasts))

        return (t, last), lax.cond(r == c, every_swap, some_swaps)


@functools.partial(jax.jit, static_argnames=('selection', 'count_flips', 'tuning'))
def restrict_masks(
    mask: dict[str, jax.Array],
    scores: dict[str, jax.Array],
    kept: dict[str, int | jax.Array],
    rate,
    hints: dict[str, jax.Array] | None = None,
    selection: str | None = None,
    count_flips: bool = False,
    tuning: masks.Tuning = masks.TUNING,
):
    """The short restriction of every layer of a dict in one call: (mask, thresholds),
    and with `count_flips` a third output, the count of positions whose bit flips (int32; for a
    layer whose blocks were gathered, counted on those blocks alone).

    Each layer's threshold key is its top-k's (`masks.topk_masks`'); `rate` (may be traced) is
    shared.
    With `hints`, one pass over scores and masks finds the few blocks per layer where the top-k
    and the mask can differ and the three selections (top-k, revive, prune) run on those alone,
    and only those blocks of the old mask are rewritten (elsewhere the top-k equals the mask); a
    layer whose candidates miss runs its own exact selections and writes its whole mask.
    Without hints each selection is an exact bisection shared by all layers, and the new masks are
    written in one elementwise pass. `selection` and `tuning` as in `masks.topk_masks`.
    """
    return masks.update_masks(scores, kept, hints, rule=Swaps(rate), old=mask,
                              count_flips=count_flips, selection=selection, tuning=tuning)


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
