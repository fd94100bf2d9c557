"""The short restriction: a pure mask update that swaps only a fraction of the candidates.

With T the top-k of the new scores and M the current mask (|M| = k):
revive candidates are T \\ M, prune candidates M \\ T, both of size c. `restrict_mask` performs
r = ceil(rate * c) swaps: the r highest-ranked revive candidates come in, the r lowest-ranked prune
candidates go out (ranking as in `ljax.masks`: score, then lower index). The count never changes;
rate = 1 gives plain top-k, rate = 0 freezes the mask.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ljax import masks

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
    c = jnp.sum(revive, dtype=jnp.int32)
    r = num_swaps(rate, c)

    def restricted():
        come_in = masks.topk_mask(scores, r, valid=revive)
        stay = masks.topk_mask(scores, c - r, valid=prune)
        return (mask & ~(prune & ~stay)) | come_in

    return lax.cond(r == c, lambda: top, restricted), threshold


def restrict_mask(mask: jax.Array, scores: jax.Array, k, rate) -> jax.Array:
    """New mask after at most ceil(rate * c) swaps; `mask` must hold exactly `k` True entries."""
    return restrict_mask_with_threshold(mask, scores, k, rate)[0]


@jax.jit
def restrict_masks(
    mask: dict[str, jax.Array],
    scores: dict[str, jax.Array],
    kept: dict[str, int | jax.Array],
    rate,
    hints: dict[str, jax.Array] | None = None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """`restrict_mask_with_threshold` for every layer of a dict in one call: (mask, thresholds).

    Same masks and threshold keys as the per-layer function; `rate` (may be traced) is shared.
    With `hints`, one pass over scores and masks finds the few blocks per layer where the top-k
    and the mask can differ and all three selections (top-k, revive, prune) run on those alone;
    otherwise, or when they overflow, every selection is an exact bisection shared by all layers.
    """
    names = list(scores)
    ks = [jnp.asarray(kept[n], jnp.int32) for n in names]
    old = [mask[n].reshape(-1) for n in names]

    def swaps(top, m, keys, index, select):
        revive = [t & ~o for t, o in zip(top, m)]
        prune = [o & ~t for t, o in zip(top, m)]
        c = [masks._count(r) for r in revive]
        r = [num_swaps(rate, ci) for ci in c]
        chosen, _ = select(
            [jnp.where(v, kk, jnp.uint32(0)) for v, kk in zip(revive + prune, keys + keys)],
            r + [ci - ri for ci, ri in zip(c, r)],
            index + index,
        )
        come_in, stay = chosen[: len(top)], chosen[len(top) :]
        return [(o & ~(p & ~s)) | i for o, p, s, i in zip(m, prune, stay, come_in)]

    def exact():
        keys = [masks.order_keys(scores[n]).reshape(-1) for n in names]
        top, thresholds = masks._exact_many(keys, ks)
        pos = [jnp.arange(kk.size, dtype=jnp.int32) for kk in keys]
        return swaps(top, old, keys, pos, lambda rows, k, _: masks._exact_many(rows, k)), (
            thresholds
        )

    if hints is None:
        new, thr = exact()
    else:
        plans = [masks._plan(scores[n], k, hints[n], mask[n]) for n, k in zip(names, ks)]
        rows, index = [p.keys for p in plans], [p.index for p in plans]
        gathered = [
            jnp.pad(o, (0, -o.size % masks._BLOCK)).reshape(-1, masks._BLOCK)[p.idx].reshape(-1)
            for o, p in zip(old, plans)
        ]
        top, thr_fast = masks._select_gathered(rows, [p.k for p in plans], index)
        changed = swaps(top, gathered, rows, index, masks._select_gathered)

        def fast():
            # outside the candidate blocks the top-k equals the mask: nothing moves there
            out = []
            for o, p, c in zip(old, plans, changed):
                pad = -o.size % masks._BLOCK
                blocks = jnp.pad(o, (0, pad)).reshape(-1, masks._BLOCK)
                flat = blocks.at[p.idx].set(c.reshape(-1, masks._BLOCK)).reshape(-1)
                out.append(flat[: o.size])
            return out, thr_fast

        ok = jnp.all(jnp.stack([p.valid for p in plans]))
        new, thr = lax.cond(ok, fast, exact)
    out = {n: m.reshape(mask[n].shape) for n, m in zip(names, new)}
    return out, dict(zip(names, thr))


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
    if isinstance(name, (int, float)) and not isinstance(name, bool):
        rate = float(name)
    elif name == 'none':
        rate = 1.0
    elif isinstance(name, str) and name.startswith('constant:'):
        rate = float(name.split(':', 1)[1])
    elif name == 'cosine':
        return optax.cosine_decay_schedule(1.0, total_steps)
    elif name == 'poly4':
        return optax.polynomial_schedule(1.0, 0.0, power=4, transition_steps=total_steps)
    elif name == 'linear':
        return optax.linear_schedule(1.0, 0.0, total_steps)
    else:
        raise ValueError(
            f"restriction: unknown schedule {name!r}; expected 'none', 'cosine', 'poly4', "
            "'linear', 'constant:R', a rate in [0, 1] or a callable step -> rate"
        )
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f'restriction: a constant rate must lie in [0, 1], got {rate}')
    return optax.constant_schedule(rate)
