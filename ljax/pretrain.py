"""Dense training of every parameter, on the same parallel step machinery and loop as the search.

Used to make the pre-trained models that ljax ships and that the benchmarks search: SGD with
Nesterov momentum 0.9, coupled weight decay and a cosine learning rate over the whole run;
BatchNorm in training mode with statistics averaged across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ljax import loop as loop_lib
from ljax.parallel import AXIS_NAME
from ljax.reductions import native_kernels


class DenseTraining:
    """The task for `Parallel` / `Loop`: state {'step', 'params', 'batch_stats', 'opt_state'}."""

    frozen: dict = {}

    @property
    def checks_gradients(self) -> bool:
        """Whether the step's guard checks the gradients, computed before the update, or decides
        on the loss alone with the backward pass inside the update (`loop.update_if_finite`): on a
        CPU with ljax's kernels, whose check of each gradient runs as soon as it is written, the
        former (and a finite loss with non-finite gradients is skipped, not applied). Donated
        (`donate`), the update then writes the state in place with no copy: the shipped BN-MLP's
        step 1.04-1.05x the plain flax step's, against 1.06-1.08x for the undonated step deciding
        on the loss, whose conditional copies the old state into its outputs first (ad hoc:
        `benchmarks/speed.py --parts plain --plain-models shipped`, alternated with that step)."""
        return jax.default_backend() == 'cpu' and native_kernels()

    @property
    def donate(self) -> bool:
        """Whether `Parallel` donates the state to the step: everywhere but on a CPU without
        ljax's kernels. There the backward pass runs inside the update (`checks_gradients`), and
        donated, XLA copied every weight it still reads before the step to update it in place;
        the undonated step ran at the plain flax step's speed (ResNet-50 stand-in, 32x32, batch
        16: 131.6 -> 101.6 ms, plain 103.5); the state is small there."""
        return jax.default_backend() != 'cpu' or self.checks_gradients

    def __init__(
        self, model, *, lr: float, weight_decay: float, total_steps: int, momentum=0.9,
        dtype='float32', tx: optax.GradientTransformation | None = None,
    ):
        """tx: another optimizer in place of the recipe of the module docstring (which lr,
        weight_decay, total_steps and momentum then no longer set); the benchmarks give the plain
        flax step's, so that the two differ by ljax's step machinery alone."""
        self.model = model
        self.dtype = jnp.dtype(dtype)  # of the forward and backward; params stay float32
        self.tx = tx if tx is not None else optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.sgd(
                optax.cosine_decay_schedule(lr, max(int(total_steps), 1)),
                momentum=momentum,
                nesterov=True,
            ),
        )

    def init_state(self, variables) -> dict:
        return {
            'step': jnp.zeros((), jnp.int32),
            'params': variables['params'],
            'batch_stats': variables.get('batch_stats', {}),
            'opt_state': self.tx.init(variables['params']),
        }

    def train_step(self, state, frozen, x, y):
        def loss_fn(params):
            variables = {'params': jax.tree.map(lambda a: a.astype(self.dtype), params)}
            if state['batch_stats']:
                variables['batch_stats'] = state['batch_stats']
            logits, updates = self.model.apply(
                variables, x.astype(self.dtype), train=True, mutable=['batch_stats']
            )
            logits = logits.astype(jnp.float32)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, updates.get('batch_stats', {}))

        local_loss, backward, (logits, batch_stats) = jax.vjp(loss_fn, state['params'], has_aux=True)
        loss = lax.pmean(local_loss, AXIS_NAME)

        def gradients():
            return lax.pmean(backward(jnp.ones_like(local_loss))[0], AXIS_NAME)

        checked = gradients() if self.checks_gradients else ()

        def update():
            grads = checked if self.checks_gradients else gradients()
            updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
            return {
                'step': state['step'] + 1,
                'params': optax.apply_updates(state['params'], updates),
                'batch_stats': lax.pmean(batch_stats, AXIS_NAME),
                'opt_state': opt_state,
            }

        # decided on the loss and the gradients, or on the loss alone with the backward inside the
        # update (`checks_gradients`): a NaN batch changes nothing
        new, finite = loop_lib.update_if_finite(
            loss, checked, update, lambda: {**state, 'step': state['step'] + 1}
        )
        accuracy = lax.pmean(jnp.mean(jnp.argmax(logits, -1) == y), AXIS_NAME)
        return new, {'loss': loss, 'accuracy': accuracy, 'finite': finite}
