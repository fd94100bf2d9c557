"""The jackpot search: state, one pmapped step, evaluation, and `search_jackpot`.

Only the scores train. The pre-trained params are replicated once and never updated or donated;
the forward pass uses `w * ste(scores, mask)`, so d loss / d scores = d loss / d(w * m) * w.
After each optax update the mask moves by the short restriction (`ljax.restriction`), which keeps
each layer's count exactly k_l.

Data parallelism: `jax.pmap` over the local devices with the axis named `AXIS_NAME`; gradients,
metrics and BatchNorm running statistics are averaged with `lax.pmean`, so masks, scores and
statistics stay identical on every device. A model whose BatchNorm takes `axis_name=AXIS_NAME`
also normalises with the statistics of the whole global batch (synchronised BN).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils, struct
from jax import lax

from ljax import masks, restriction, sparsity as sparsity_lib

AXIS_NAME = 'batch'


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """Hyper-parameters of the search; the defaults are the paper's CIFAR settings.

    lr: peak learning rate of the scores, decayed by a cosine over the whole search (per step).
    momentum: SGD momentum. weight_decay: coupled (L2 added to the gradient, as torch.optim.SGD).
    score_init: 'magnitude' (initial mask = the global-magnitude mask, exactly) or 'random'
      (Kaiming-uniform, edge-popup). score_margin: magnitude init gives kept 1.0, pruned 1 - margin.
    allocation: 'global_magnitude' (one |w| threshold over all prunable layers decides each k_l) or
      'uniform' (k_l ~ (1-s) n_l).
    restriction: rate schedule of the short restriction: 'none' (plain top-k every step), 'cosine',
      'poly4' ((1-t/T)^4), 'linear', 'constant:R', a float, or a callable step -> rate.
    prunable: predicate (path tuple inside params, leaf) -> bool; None = every Dense/Conv kernel but
      the classifier (the last layer the model calls).
    seed: for random score init and dropout.
    """

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    score_init: str = 'magnitude'
    score_margin: float = 0.01
    allocation: str = 'global_magnitude'
    restriction: Any = 'none'
    prunable: Callable[[tuple, Any], bool] | None = None
    seed: int = 0


class SearchState(struct.PyTreeNode):
    """Everything that changes during a search (and is checkpointed). Layer dicts keyed by path."""

    step: jax.Array
    scores: dict
    mask: dict
    thresholds: dict  # top-k threshold keys of the last step: hints for the next selection
    opt_state: Any
    batch_stats: Any
    rng: jax.Array


def _check_fraction(sparsity):
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float, np.floating))
        or not 0.0 <= float(sparsity) < 1.0
    ):
        raise ValueError(
            f'sparsity: expected the fraction of prunable weights to remove, in [0, 1) '
            f'(0.9 keeps 10%), got {sparsity!r}'
        )


def check_variables(model: nn.Module, variables, x) -> None:
    """ValueError unless `variables['params']` has exactly the names and shapes the model creates."""
    if not isinstance(variables, Mapping) or 'params' not in variables:
        raise ValueError(
            "variables: expected a mapping {'params': ..., 'batch_stats': ...} "
            f'of pre-trained variables, got {type(variables).__name__}'
        )
    try:
        expected = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    except Exception as e:  # the model itself does not run on this input
        raise ValueError(
            f'batches: the model does not accept x of shape {np.shape(x)}: '
            f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        ) from None
    for collection in ('params', 'batch_stats'):
        want = {
            n: tuple(v.shape) for n, v in sparsity_lib.flatten(expected.get(collection, {})).items()
        }
        got = {
            n: tuple(np.shape(v))
            for n, v in sparsity_lib.flatten(variables.get(collection, {})).items()
        }
        if collection == 'batch_stats' and not got:
            if want:
                raise ValueError(
                    'variables: the model has BatchNorm but variables hold no batch_stats'
                )
            continue
        problems = [f'{n}: missing (expected {want[n]})' for n in want if n not in got]
        problems += [f'{n}: unexpected' for n in got if n not in want]
        problems += [
            f'{n}: expected {want[n]}, found {got[n]}'
            for n in want
            if n in got and want[n] != got[n]
        ]
        if problems:
            raise ValueError(
                f'variables: {collection} do not fit the model ({len(problems)} problems): '
                + '; '.join(problems[:5])
            )


@dataclasses.dataclass
class Search:
    """A prepared search: which layers, how many weights each keeps, the optimizer and the step."""

    model: nn.Module
    params: Any  # the frozen pre-trained params (caller's tree, never modified)
    batch_stats: Any  # initial BN statistics, or None
    names: list[str]  # prunable layers, tree order
    kept: dict[str, int]  # k_l
    magnitude: dict[str, jax.Array]  # the one-shot magnitude mask (step 0 of a magnitude search)
    options: SearchOptions
    total_steps: int

    @classmethod
    def create(
        cls,
        model,
        variables,
        sample_x,
        *,
        sparsity: float,
        total_steps: int,
        options: SearchOptions = SearchOptions(),
    ) -> 'Search':
        _check_fraction(sparsity)
        check_variables(model, variables, sample_x)
        params = variables['params']
        predicate = options.prunable or sparsity_lib.default_prunable(model, variables, sample_x)
        names = sparsity_lib.prunable_names(params, predicate)
        if not names:
            some = list(sparsity_lib.flatten(params))[:6]
            raise ValueError(
                f'prunable: the predicate selects no parameter; params hold {some}...; '
                'expected a predicate (path tuple, leaf) -> bool that is true for some kernels'
            )
        flat = sparsity_lib.flatten(params)
        weights = {n: flat[n] for n in names}
        magnitude = sparsity_lib.magnitude_masks(weights, sparsity, options.allocation)
        kept = {n: int(jnp.sum(magnitude[n])) for n in names}
        search = cls(
            model,
            params,
            variables.get('batch_stats') or None,
            names,
            kept,
            magnitude,
            options,
            int(total_steps),
        )
        search.rate(0)  # an unknown restriction schedule fails here, before any work
        return search

    # ---------------------------------------------------------------- state
    def optimizer(self) -> optax.GradientTransformation:
        o = self.options
        lr = optax.cosine_decay_schedule(o.lr, max(self.total_steps, 1))
        return optax.chain(
            optax.add_decayed_weights(o.weight_decay), optax.sgd(lr, momentum=o.momentum)
        )

    def init_state(self) -> SearchState:
        o = self.options
        rng_scores, rng = jax.random.split(jax.random.key(o.seed))
        flat = sparsity_lib.flatten(self.params)
        weights = {n: flat[n] for n in self.names}
        scores = sparsity_lib.init_scores(
            weights, self.magnitude, o.score_init, rng_scores, o.score_margin
        )
        mask, thresholds = {}, {}
        for n in self.names:
            mask[n], thresholds[n] = masks.topk_mask_with_threshold(scores[n], self.kept[n])
        bs = jax.tree.map(jnp.array, self.batch_stats) if self.batch_stats is not None else {}
        return SearchState(
            step=jnp.zeros((), jnp.int32),
            scores=scores,
            mask=mask,
            thresholds=thresholds,
            opt_state=self.optimizer().init(scores),
            batch_stats=bs,
            rng=jax.random.key_data(rng),
        )

    @functools.cached_property
    def _rate_schedule(self):
        return restriction.rate_schedule(self.options.restriction, self.total_steps)

    def rate(self, step: int) -> float:
        """The short restriction's rate at `step` (host side; passed to the step as an argument)."""
        return float(self._rate_schedule(step))

    # ---------------------------------------------------------------- pure functions
    def _variables(self, params, batch_stats):
        v = {'params': params}
        if self.batch_stats is not None:
            v['batch_stats'] = batch_stats
        return v

    def masked_params(self, params, mask):
        """Pruned weights exactly +0.0, every other value untouched."""
        flat = sparsity_lib.flatten(params)
        for n in self.names:
            flat[n] = jnp.where(mask[n], flat[n], jnp.zeros((), flat[n].dtype))
        return sparsity_lib.unflatten(flat)

    def train_step(self, state: SearchState, params, x, y, rate):
        """One search step on this device's share of the batch; call under pmap (axis AXIS_NAME)."""
        flat = sparsity_lib.flatten(params)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(scores):
            f = dict(flat)
            for n in self.names:
                f[n] = f[n] * masks.ste(scores[n], state.mask[n]).astype(f[n].dtype)
            logits, updates = self.model.apply(
                self._variables(sparsity_lib.unflatten(f), state.batch_stats),
                x,
                train=True,
                mutable=['batch_stats'],
                rngs={'dropout': rng},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, updates.get('batch_stats', {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.scores
        )
        grads = lax.pmean(grads, AXIS_NAME)
        updates, opt_state = self.optimizer().update(grads, state.opt_state, state.scores)
        scores = optax.apply_updates(state.scores, updates)
        mask, thresholds, flips = {}, {}, jnp.zeros((), jnp.int32)
        for n in self.names:
            mask[n], thresholds[n] = restriction.restrict_mask_with_threshold(
                state.mask[n], scores[n], self.kept[n], rate, hint=state.thresholds[n]
            )
            flips += jnp.sum(mask[n] != state.mask[n], dtype=jnp.int32)
        metrics = {
            'loss': lax.pmean(loss, AXIS_NAME),
            'accuracy': lax.pmean(jnp.mean(jnp.argmax(logits, -1) == y), AXIS_NAME),
            'flips': flips,
        }
        new = state.replace(
            step=state.step + 1,
            scores=scores,
            mask=mask,
            thresholds=thresholds,
            opt_state=opt_state,
            batch_stats=lax.pmean(batch_stats, AXIS_NAME),
        )
        return new, metrics

    def eval_step(self, params, mask, batch_stats, x, y, weight):
        """Sums of (correct, loss, weight) over this device's share; psum'd across devices."""
        variables = self._variables(
            self.masked_params(params, mask) if mask is not None else params, batch_stats
        )
        logits = self.model.apply(variables, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        sums = {
            'correct': jnp.sum((jnp.argmax(logits, -1) == y) * weight),
            'loss': jnp.sum(loss * weight),
            'count': jnp.sum(weight),
        }
        return lax.psum(sums, AXIS_NAME)

    # ---------------------------------------------------------------- results
    def jackpot_variables(self, mask, batch_stats) -> dict:
        return self._variables(self.masked_params(self.params, mask), batch_stats)

    def params_mask(self, mask) -> dict:
        """The mask shaped like params: bool arrays on prunable leaves, None elsewhere."""
        flat = {n: None for n in sparsity_lib.flatten(self.params)}
        flat.update({n: np.asarray(mask[n]) for n in self.names})
        return sparsity_lib.unflatten(flat)


class Parallel:
    """pmapped step and evaluation of a `Search` over the local devices."""

    def __init__(self, search: Search, devices=None):
        self.search = search
        self.devices = list(devices or jax.local_devices())
        self.n = len(self.devices)
        self.params = self.replicate(search.params)
        self.step = jax.pmap(
            search.train_step, AXIS_NAME, devices=self.devices, donate_argnums=(0,)
        )
        self.eval = jax.pmap(search.eval_step, AXIS_NAME, devices=self.devices)

    def shard(self, *arrays):
        out = []
        for a in arrays:
            a = np.asarray(a)
            if a.shape[0] % self.n:
                raise ValueError(
                    f'batches: a global batch of {a.shape[0]} does not divide across {self.n} '
                    f'devices; use a batch size that is a multiple of {self.n}'
                )
            out.append(a.reshape((self.n, a.shape[0] // self.n) + a.shape[1:]))
        return out

    def replicate(self, tree):
        return jax_utils.replicate(tree, self.devices, axis_name=AXIS_NAME)

    @staticmethod
    def unreplicate(tree):
        """The first local device's copy of every leaf, as host NumPy arrays.

        Reads the shard buffers directly: `a[0]` would dispatch one device op per leaf (about
        1.6 ms each on CPU, most of a second for ResNet-50's search state).
        """

        def first(a):
            if isinstance(a, jax.Array):
                return np.asarray(a.addressable_shards[0].data)[0]
            return np.asarray(a)[0]

        return jax.tree.map(first, tree)

    def train(self, state, x, y, rate: float):
        x, y = self.shard(x, y)
        return self.step(state, self.params, x, y, np.full((self.n,), rate, np.float32))

    def evaluate(self, batches: Iterable, mask, batch_stats) -> dict:
        """Accuracy and mean loss over (x, y) or (x, y, weight) batches; mask None = dense."""
        mask_r = self.replicate(mask) if mask is not None else None
        return self.evaluate_replicated(batches, mask_r, self.replicate(batch_stats))

    def evaluate_state(self, batches: Iterable, state) -> dict:
        """`evaluate` of a replicated search state's mask and statistics, left on the devices."""
        return self.evaluate_replicated(batches, state.mask, state.batch_stats)

    def evaluate_replicated(self, batches: Iterable, mask_r, batch_stats_r) -> dict:
        sums = []
        for batch in batches:
            x, y = batch[0], batch[1]
            w = batch[2] if len(batch) > 2 else np.ones(np.shape(y), np.float32)
            x, y, w = self.shard(x, y, w)
            sums.append(self.eval(self.params, mask_r, batch_stats_r, x, y, w))
        total = jax.tree.map(lambda *a: np.sum([np.asarray(v)[0] for v in a]), *sums)
        count = float(total['count'])
        return {'accuracy': float(total['correct']) / count, 'loss': float(total['loss']) / count}


@dataclasses.dataclass
class Jackpot:
    """Result of `search_jackpot`.

    variables: {'params': pre-trained params with pruned weights exactly 0.0 and all else
      bit-identical, 'batch_stats': as updated by the search} (batch_stats absent if the model has none).
    mask: pytree shaped like params: bool arrays on prunable leaves, None elsewhere.
    sparsity: achieved fraction of prunable weights removed.
    kept_per_layer: {layer path: kept count}. scores: final scores per layer.
    history: one dict per epoch (train loss/accuracy, mask flips, eval accuracy if eval_batches).
    """

    variables: dict
    mask: dict
    sparsity: float
    kept_per_layer: dict[str, int]
    scores: dict
    history: list[dict]


def _first_batch(batches):
    if batches is None or not hasattr(batches, '__iter__'):
        raise ValueError(
            f'batches: expected a re-iterable of (x, y) NumPy batches, got {type(batches).__name__}'
        )
    first_pass = iter(batches)  # one call: an epoch-counting dataset skips one epoch, not two
    if first_pass is batches:
        raise ValueError(
            'batches: got an iterator, which is used up after one epoch; pass a '
            're-iterable such as a list or an object whose __iter__ starts a new epoch'
        )
    batch = next(first_pass, None)
    if batch is None:
        raise ValueError('batches: empty; expected at least one (x, y) batch per epoch')
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError('batches: each batch must be a tuple (x, y) of arrays')
    return batch


def search_jackpot(
    model: nn.Module,
    variables: Mapping,
    batches: Iterable,
    *,
    sparsity: float,
    epochs: int,
    eval_batches: Iterable | None = None,
    callback: Callable[[int, dict], None] | None = None,
    **options,
) -> Jackpot:
    """Find a lottery jackpot: a mask over the frozen pre-trained weights of `model`.

    model: flax module called as `model.apply(variables, x, train=...)`, returning logits.
    variables: {'params': ..., 'batch_stats': ...} pre-trained; never modified or donated.
    batches: re-iterable of (x, y) NumPy batches (integer labels); each pass is one epoch. Every
      batch is split across the local devices, so its size must divide by their number.
    sparsity: fraction of prunable weights *removed*, 0 <= sparsity < 1 (0.9 keeps 10%).
    epochs: passes over `batches`, >= 1.
    eval_batches: optional (x, y) or (x, y, weight) batches scored after every epoch (history).
    callback: optional callable(epoch, history_row) after every epoch.
    **options: the fields of `SearchOptions` (lr=0.1, momentum=0.9, weight_decay=5e-4,
      score_init='magnitude', score_margin=0.01, allocation='global_magnitude',
      restriction='none', prunable=None, seed=0); see its docstring.
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(SearchOptions)}
    if unknown:
        raise ValueError(
            f'options: unknown {sorted(unknown)}; expected some of '
            f'{[f.name for f in dataclasses.fields(SearchOptions)]}'
        )
    _check_fraction(sparsity)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f'epochs: expected an integer >= 1, got {epochs!r}')
    x0 = np.asarray(_first_batch(batches)[0])
    steps_per_epoch = len(batches) if hasattr(batches, '__len__') else sum(1 for _ in batches)
    search = Search.create(
        model,
        variables,
        x0[:1],
        sparsity=sparsity,
        total_steps=epochs * steps_per_epoch,
        options=SearchOptions(**options),
    )
    par = Parallel(search)
    state = par.replicate(search.init_state())
    history, step = [], 0
    for epoch in range(epochs):
        per_step = []
        for x, y, *_ in batches:
            state, metrics = par.train(state, x, y, search.rate(step))
            # Fetched every step: an unbounded queue of pmapped steps on CPU devices aborted
            # XLA's collectives here (tests/test_end_to_end.py).
            per_step.append(par.unreplicate(metrics))
            step += 1
        row = {
            'epoch': epoch + 1,
            'loss': float(np.mean([m['loss'] for m in per_step])),
            'accuracy': float(np.mean([m['accuracy'] for m in per_step])),
            'flips': int(np.sum([m['flips'] for m in per_step])),
        }
        if eval_batches is not None:
            row['eval_accuracy'] = par.evaluate_state(eval_batches, state)['accuracy']
        history.append(row)
        if callback is not None:
            callback(epoch + 1, row)
    final = par.unreplicate(state)
    total = sum(int(np.size(final.mask[n])) for n in search.names)
    kept = {n: int(np.sum(final.mask[n])) for n in search.names}
    return Jackpot(
        variables=search.jackpot_variables(final.mask, final.batch_stats),
        mask=search.params_mask(final.mask),
        sparsity=1.0 - sum(kept.values()) / total,
        kept_per_layer=kept,
        scores=final.scores,
        history=history,
    )
