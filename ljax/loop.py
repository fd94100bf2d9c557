"""The one training loop: `search_jackpot`, main.py (search and dense pretraining), the notebooks
and the benchmarks all run `Loop.run`.

Steady state has no host round trip: batches are copied to the devices ahead of use (prefetch),
per-step metrics stay on the devices and are read once per log interval, and at most
`max_in_flight` steps are queued (waiting on a step's metrics is a device sync, not a copy; an
unbounded queue of pmapped CPU steps aborted XLA's collectives). Actions hang off the loop in the
shape of clu's periodic actions: `every_steps` callbacks (checkpoints), `on_log` and `on_epoch`
(evaluation, history, the user's callback).

Per-step metrics from the task: 'loss', 'accuracy' (means over the global batch), optionally
'flips' (mask changes), and 'finite' (1 when the step was applied, 0 when its loss or gradients
were not finite and it left the state unchanged: `update_if_finite`). At the end of every epoch
the state is checked for NaN/inf (an update that overflowed) and the loop stops with
`NonFiniteError` then.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

from ljax.parallel import Parallel, first
from ljax.reductions import tree_all_finite

EpochBatches = Callable[[int, int], Iterator]  # (epoch, start_step) -> iterator of (x, y, ...)


def finite(loss, grads) -> jax.Array:
    """Whether the loss and every gradient are finite (bool scalar)."""
    return jnp.isfinite(loss) & tree_all_finite(grads)


GUARDS = ('cond', 'select')


def default_guard() -> str:
    """How `update_if_finite` chooses on this backend. 'cond' on CPU: a `lax.cond` writes a finite
    step's state in place and runs no update for a skipped one. 'select' on GPU and TPU: the update
    always runs and each of its outputs is chosen by a `where` that XLA fuses into the kernel that
    writes it, so no pass of its own; there a conditional waits for its predicate on the host,
    which drains the device's queue every step (measured on an NVIDIA H200: docs/RESULTS.md,
    Speed)."""
    return 'cond' if jax.default_backend() == 'cpu' else 'select'


def update_if_finite(
    loss, grads, update: Callable[[], Any], keep: Callable[[], Any], guard: str | None = None
):
    """(`update()` if the loss and every gradient are finite, else `keep()`; the finite flag as
    int32): the guard of the train steps, decided before the update is written.

    `update` and `keep` return trees of the same structure (the new state and any metrics of the
    update; the state as it was, with the step counter moved on). guard: 'cond' or 'select'
    (default: `default_guard()`). 'cond' is a `lax.cond`, so a finite step writes its state in
    place (donated) exactly as an unguarded step does, and the guard costs the check of the
    gradients alone, not a pass over the state: on CPU a `where` between the updated and the old
    state (`keep_if_not_finite`) must keep both alive, read both and write a third, and decided on
    the updated values it cannot even start before they are written (measured on a ResNet-50 step,
    77-96 -> 123-133 ms; a 23.5M-element SGD update: 1.14x with this guard, 3.0x with the `where`).
    'select' decides on the same values, before the update, with a `where` per output of the
    update, which GPU and TPU compilers fuse into the update's own kernels. Call with values that
    agree across devices (pmean'd), so every replica takes the same branch. An update that
    overflows (finite gradients, an absurd learning rate) is not caught here: `Loop` checks the
    state at the end of every epoch.

    `grads` may be empty: the guard is then decided on the loss alone, which a NaN or inf in a
    batch makes non-finite too, and `update` may hold the backward pass (its collectives run
    inside the cond). Dense training does so where the gradients' check is not ljax's C++ one
    (`DenseTraining.checks_gradients`): nothing waits on every gradient before any update is
    written, and with its state not donated on CPU its step took 102 ms on the ResNet-50 stand-in
    (32x32, batch 16) against 128 with the gradients checked by XLA, the plain flax step's 103. A
    finite loss with non-finite gradients is then applied, and the loop stops at the end of the
    epoch. The search keeps its gradients checked: decided on its loss it measured 9% slower on
    ResNet-50 at 224x224, batch 8 (2016 against 1851 ms), though 7% faster on the BN-MLP."""
    guard = default_guard() if guard is None else guard
    if guard not in GUARDS:
        raise ValueError(f'guard: expected one of {GUARDS}, got {guard!r}')
    ok = finite(loss, grads)
    if guard == 'cond':
        return lax.cond(ok, update, keep), ok.astype(jnp.int32)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), update(), keep()), ok.astype(jnp.int32)


def keep_if_not_finite(loss, grads, new, old, updated=()):
    """(`new` if the loss, every gradient and every `updated` value (the trained variables after
    the update, which overflow under an exploding learning rate) are finite, else `old`; the
    finite flag as int32). Call with values that agree across devices, so every replica decides
    alike. A pass over `new` and `old` of its own, after the update: the train steps use
    `update_if_finite`."""
    ok = finite(loss, (grads, updated))
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old), ok.astype(jnp.int32)


def state_is_finite(state) -> bool:
    """Whether every floating value of a replicated state is finite, read on the host from the
    first local device's copy (every replica holds the same): once per epoch, and nothing to
    compile (a jitted check cost 0.3 s of compilation per search of a small MLP)."""
    leaves = [
        a.addressable_shards[0].data if isinstance(a, jax.Array) else np.asarray(a)
        for a in jax.tree.leaves(state)
        if jnp.issubdtype(a.dtype, jnp.inexact)
    ]
    return all(np.isfinite(a).all() for a in jax.device_get(leaves))


class NonFiniteError(ValueError):
    """Every step of an epoch had a non-finite loss or gradient."""


@dataclasses.dataclass
class Periodic:
    """Call `fn(step, state)` after every `every_steps`-th step and after each of `steps`, except
    after the last step of an epoch (that is `on_epoch`'s moment)."""

    every_steps: int | None
    fn: Callable[[int, Any], None]
    steps: frozenset = frozenset()

    def due(self, step: int) -> bool:
        return bool(self.every_steps and step % self.every_steps == 0) or step in self.steps


@dataclasses.dataclass
class EpochSums:
    """Running sums of one epoch's step metrics (checkpointed, so a resumed epoch reports the same)."""

    steps: int = 0
    finite: int = 0
    loss: float = 0.0
    accuracy: float = 0.0
    flips: int = 0

    def add(self, metrics: dict) -> None:
        self.steps += 1
        ok = bool(metrics.get('finite', 1))
        self.finite += ok
        if ok:
            self.loss += float(metrics['loss'])
            self.accuracy += float(metrics['accuracy'])
        self.flips += int(metrics.get('flips', 0))

    def row(self) -> dict:
        n = max(self.finite, 1)
        return {
            'loss': self.loss / n if self.finite else float('nan'),
            'accuracy': self.accuracy / n if self.finite else float('nan'),
            'flips': self.flips,
            'nonfinite_steps': self.steps - self.finite,
        }


@dataclasses.dataclass
class Loop:
    """Runs `epochs` epochs of `steps_per_epoch` steps of `par.train`, from `start_step`.

    on_log(step, metrics): after fetching, with the last step's metrics (host values).
    on_metrics(metrics): every step's metrics (host values, in order), as they are fetched.
    on_epoch(epoch, state, row) -> None: after each epoch (1-based); may add keys to `row`
      (evaluation); the row then joins `history`.
    periodic: Periodic actions (checkpoints), run between steps.
    sums: the running sums of the epoch in progress (restore them to resume mid-epoch).
    """

    par: Parallel
    epochs: int
    steps_per_epoch: int
    batch_size: int  # global, for images/s
    log_every: int = 50
    on_log: Callable[[int, dict], None] | None = None
    on_metrics: Callable[[list[dict]], None] | None = None
    on_epoch: Callable[[int, Any, dict], None] | None = None
    periodic: list[Periodic] = dataclasses.field(default_factory=list)
    max_in_flight: int = 2
    prefetch: int = 2
    progress: bool = True
    epoch_lines: bool | None = None  # print a line per epoch (None: as `progress`)
    desc: str = 'search'
    sums: EpochSums = dataclasses.field(default_factory=EpochSums)

    def run(self, state, epoch_batches: EpochBatches, start_step: int = 0):
        """Returns (state, history rows of the epochs finished in this call)."""
        total = self.epochs * self.steps_per_epoch
        step, history = start_step, []
        bar = tqdm(
            total=total,
            initial=step,
            desc=self.desc,
            unit='step',
            dynamic_ncols=True,
            disable=not self.progress,
            mininterval=1.0,
        )
        pending: list[dict] = []  # device metrics not yet read
        in_flight: collections.deque = collections.deque()
        try:
            for epoch in range(step // self.steps_per_epoch, self.epochs):
                t0, n0 = time.perf_counter(), step
                batches = epoch_batches(epoch, step % self.steps_per_epoch)
                for x, y in self._prefetched(batches):
                    # No device-to-host copy may happen inside a step (a GPU would stall on it).
                    with jax.transfer_guard_device_to_host('disallow'):
                        state, metrics = self.par.train(state, x, y)
                    step += 1
                    pending.append(metrics)
                    in_flight.append(metrics)
                    if len(in_flight) > self.max_in_flight:
                        jax.block_until_ready(in_flight.popleft())
                    bar.update(1)
                    end_of_epoch = step % self.steps_per_epoch == 0
                    if step % self.log_every == 0 or end_of_epoch:
                        last = self._read(pending)
                        ips = (step - n0) * self.batch_size / (time.perf_counter() - t0)
                        bar.set_postfix(
                            loss=f'{last["loss"]:.3f}', acc=f'{last["accuracy"]:.3f}', img_s=f'{ips:.0f}'
                        )
                        if self.on_log is not None:
                            self.on_log(step, {**last, 'images_per_second': ips})
                    if not end_of_epoch:
                        for action in self.periodic:
                            if action.due(step):
                                if pending:  # the sums go into the checkpoint too
                                    self._read(pending)
                                action.fn(step, state)
                    if end_of_epoch:
                        break
                row = {'epoch': epoch + 1, 'step': step, **self.sums.row()}
                row['seconds'] = time.perf_counter() - t0
                row['images_per_second'] = (step - n0) * self.batch_size / row['seconds']
                if self.sums.steps and not self.sums.finite:
                    raise NonFiniteError(
                        f'every step of epoch {epoch + 1} had a non-finite loss or gradient '
                        '(NaN/inf in the data, or a learning rate too large); nothing was '
                        'updated in that epoch'
                    )
                if not state_is_finite(state):
                    raise NonFiniteError(
                        f'the state holds NaN/inf after epoch {epoch + 1} although every applied '
                        'step had a finite loss: an update overflowed (a learning rate too large) '
                        'or, in dense training, a gradient was not finite'
                    )
                self.sums = EpochSums()
                if self.on_epoch is not None:
                    self.on_epoch(epoch + 1, state, row)
                history.append(row)
                if self.progress if self.epoch_lines is None else self.epoch_lines:
                    tqdm.write(_describe(row, self.epochs))
        finally:
            bar.close()
        return state, history

    def _read(self, pending: list[dict]) -> dict:
        """Host copies of the pending steps' metrics, added to the epoch sums; the last one."""
        values = first(pending)  # one batched device_get
        for m in values:
            self.sums.add(m)
        if self.on_metrics is not None:
            self.on_metrics(values)
        pending.clear()
        return values[-1]

    def _prefetched(self, batches) -> Iterator[tuple]:
        queue: collections.deque = collections.deque()
        for batch in batches:
            queue.append(self.par.put(batch[0], batch[1]))
            if len(queue) > self.prefetch:
                yield queue.popleft()
        while queue:
            yield queue.popleft()


def _describe(row: dict, epochs: int) -> str:
    parts = []
    for key, label in (('jackpot_accuracy', 'jackpot test accuracy'), ('eval_accuracy', 'test acc')):
        if key in row:
            parts.append(f'{label} {100 * row[key]:.2f}%')
    if 'jackpot_cosine' in row:  # a sentence encoder (ljax.textjob): held-out embedding metrics
        parts.append(f'held-out cosine {row["jackpot_cosine"]:.4f}')
        parts += [f'{k[len("jackpot_"):]} {100 * v:.1f}%' for k, v in row.items()
                  if k.startswith('jackpot_nn') or k == 'jackpot_probe_accuracy']
    parts.append(f'loss {row["loss"]:.4f}, train acc {100 * row["accuracy"]:.2f}%')
    if 'flips' in row:
        parts.append(f'{row["flips"]} flips')
    if row.get('nonfinite_steps'):
        parts.append(f'{row["nonfinite_steps"]} non-finite steps skipped')
    parts.append(f'{row["images_per_second"]:.0f} img/s')
    return f'epoch {row["epoch"]}/{epochs}: ' + ', '.join(parts)
