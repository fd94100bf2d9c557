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


def restrict_masks(mask: dict, scores: dict, kept: dict, rate, hints: dict | None = None):
    """`restrict_mask_with_threshold` of every layer: ({name: mask}, {name: threshold key})."""
    out = {
        n: restrict_mask_with_threshold(
            mask[n], scores[n], kept[n], rate, hint=None if hints is None else hints[n]
        )
        for n in mask
    }
    return {n: m for n, (m, _) in out.items()}, {n: t for n, (_, t) in out.items()}
