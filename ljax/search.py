"""The jackpot search: state, one pmapped step, evaluation, and `search_jackpot`.

Only the scores train. The pre-trained params are replicated once and never updated or donated;
the forward pass uses `w * ste(scores, mask)`, so d loss / d scores = d loss / d(w * m) * w; the
state carries `w * m` (`SearchState.weights`, read through `masks.masked_ste`), rewritten where
the mask changes.
After each optax update the mask moves by the short restriction (`ljax.restriction`), which keeps
each layer's count exactly k_l.

Data parallelism (`ljax.parallel`): `jax.pmap` over every device of every process with the axis
named `AXIS_NAME`; gradients, metrics and BatchNorm running statistics are averaged with
`lax.pmean`, so masks, scores and statistics stay identical on every device. A model whose
BatchNorm takes `axis_name=AXIS_NAME` also normalises with the statistics of the whole global
batch (synchronised BN), which makes the result independent of how many devices share a batch.

A step whose loss or gradients are not finite (a NaN pixel) leaves scores, optimizer state, mask
and BN statistics unchanged, decided before the update is written (`loop.update_if_finite`); it is
counted in the metrics. An update that overflows although its gradients are finite (an absurd
learning rate) stops the search at the end of its epoch (`loop.Loop`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
from typing import Any, Callable, Iterable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax

from ljax import loop as loop_lib
from ljax import calibration as calibration_lib
from ljax import masks, prng, restriction, sparsity as sparsity_lib
from ljax.reductions import count
from ljax.selection import host_order_keys
from ljax import nm as nm_lib
from ljax.config import ALLOCATIONS, DISTILLS, SCORE_INITS  # the allowed values, once
from ljax.modelfn import ModelFn, check_variables, model_fn
from ljax.parallel import AXIS_NAME, Parallel

__all__ = [
    'AXIS_NAME',
    'Jackpot',
    'Parallel',
    'Search',
    'SearchOptions',
    'check_variables',
    'search_jackpot',
]
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
TEACHERS = (None, 'dense')
# A CPU search of at most SMALL_SEARCH prunable weights and SHORT_SEARCH steps selects 'segmented'
SMALL_SEARCH = 1 << 18
SHORT_SEARCH = 1000


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """Hyper-parameters of the search; the defaults are the paper's CIFAR settings.

    lr: peak learning rate of the scores, decayed by a cosine over the whole search (per step).
    momentum: SGD momentum. weight_decay: coupled (L2 added to the gradient, as torch.optim.SGD).
    score_init: 'magnitude' (initial mask = the magnitude mask, exactly), 'wanda' (the one-shot
      Wanda mask: |w| times the input feature's L2 norm over calibration batches, compared within
      each output neuron, with the allocation's layer counts) or 'random' (Kaiming-uniform,
      edge-popup). score_margin: magnitude/Wanda init give kept 1.0, pruned 1 - margin.
    allocation: 'global_magnitude' (one |w| threshold over all prunable layers decides each k_l),
      'uniform' (k_l ~ (1-s) n_l) or 'erk' (RigL's Erdos-Renyi-Kernel densities, exact total).
    restriction: rate schedule of the short restriction: 'none' (plain top-k every step), 'cosine',
      'poly4' ((1-t/T)^4), 'linear', 'constant:R', a float, or a callable step -> rate.
    prunable: predicate (path tuple inside params, leaf) -> bool; None = every parameter used as
      the weight of a matmul or convolution, except the classifier (the product that feeds the
      output), both found by tracing the model (`ljax.sparsity.find_kernels`); a ValueError asks
      for `prunable=` where that cannot decide.
    seed: for random score init and dropout.
    dtype: 'float32' or 'bfloat16': the dtype of the forward and backward pass; scores, optimizer
      state and BN statistics stay float32, and evaluation runs in float32.
    nm: (N, M) for an N:M jackpot: every M consecutive weights along each kernel's input axes as
      found from the computation (those its matmul contracts, flattened; a convolution's input
      channels; `ljax.sparsity.input_axes`) keep exactly N at every step (NVIDIA's 2:4 layout);
      sparsity is then 1 - N/M and allocation does not apply; magnitude and Wanda init give
      their N:M masks (`ljax.nm`).
    calibration_batches: batches whose input activations give Wanda's feature norms.
    loss: callable (logits float32 [batch, classes], labels [batch]) -> per-example losses
      [batch], jit-able (e.g. `optax.softmax_cross_entropy` with one-hot or smoothed labels
      made inside it); None = `optax.softmax_cross_entropy_with_integer_labels`. Accuracy still
      compares argmax(logits) with integer labels.
    teacher: None (learn from the labels) or 'dense': label-free, the mask learns to reproduce
      the frozen dense model's outputs, computed in the same step (eval mode, pre-trained BN
      statistics); batches may then hold x alone.
    distill: with teacher='dense', how outputs are compared ('kl' `distill_loss`: KL divergence
      to the dense logits at `temperature`, times temperature^2; 'cosine': 1 - cosine of the
      outputs along their last axis, for an embedding model; 'hidden': per-layer hidden-state
      matching, for a model whose output (the whole output, or what `output=` picks) is a pytree
      whose first leaf is the final output and whose other leaves are hidden states, e.g.
      (embedding, (h_1, ..., h_L)):
      1 - cosine along the last axis averaged over positions, then over the leaves). The train
      'accuracy' is the agreement with the dense argmax ('kl') or the mean cosine of the final
      outputs ('cosine', 'hidden'); evaluation scores labels with 'kl' and that cosine
      otherwise. With 'cosine' and 'hidden' the default `prunable` is every kernel (an
      embedding model has no classifier).
    temperature: the softmax temperature of distill='kl' (> 0).
    output: which of the model's outputs are the logits, for a model that returns a dict or a
      tuple: a key or index, or a function of the output (`ljax.modelfn.pick_output`; a dict's
      'logits' entry by default). The classifier is then found from that output.
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
    dtype: str = 'float32'
    nm: tuple[int, int] | None = None
    calibration_batches: int = 8
    loss: Callable | None = None
    teacher: str | None = None
    distill: str = 'kl'
    temperature: float = 1.0
    output: Any = None


class SearchState(struct.PyTreeNode):
    """Everything that changes during a search (and is checkpointed). Layer dicts keyed by path."""

    step: jax.Array
    scores: dict
    mask: dict
    thresholds: dict  # top-k threshold keys of the last step ...
    previous: dict  # ... and of the step before: the next selection's hint extrapolates from both
    opt_state: Any
    batch_stats: Any
    rng: jax.Array
    # the prunable weights as the model sees them, `masks.masked_weights` of the mask in the
    # search's dtype: carried so that the step reads them as a plain step reads its parameters,
    # and rewritten only where the mask changes. Derived from the mask: not checkpointed
    # (`Search.checkpointed`, `Search.resumed`).
    weights: dict

    @classmethod
    def start(cls, scores, mask, thresholds, opt_state, batch_stats, rng, weights,
              xp=jnp) -> 'SearchState':
        """The state at step 0 (`xp`: jnp inside a program, np on the host)."""
        return cls(step=xp.zeros((), xp.int32), scores=scores, mask=mask, thresholds=thresholds,
                   previous=thresholds, opt_state=opt_state, batch_stats=batch_stats, rng=rng,
                   weights=weights)


def _check_options(o: 'SearchOptions') -> None:
    """ValueError naming the first option that is out of range (before any work is done)."""
    for name in ('lr', 'momentum', 'weight_decay', 'score_margin', 'temperature'):
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise ValueError(f'{name}: expected a number, got {value!r}')
    for name, ok, want in (
        ('lr', o.lr > 0 and np.isfinite(o.lr), 'a finite number > 0'),
        ('momentum', 0 <= o.momentum < 1, 'a number in [0, 1)'),
        ('weight_decay', o.weight_decay >= 0, 'a number >= 0'),
        ('score_margin', 0 < o.score_margin < 1, 'a number in (0, 1)'),
        ('score_init', o.score_init in SCORE_INITS, f'one of {SCORE_INITS}'),
        ('allocation', o.allocation in ALLOCATIONS, f'one of {ALLOCATIONS}'),
        ('dtype', o.dtype in DTYPES, f'one of {sorted(DTYPES)}'),
        ('teacher', o.teacher in TEACHERS, f"None (labels) or 'dense' (label-free)"),
        ('distill', o.distill in DISTILLS, f'one of {DISTILLS}'),
        ('temperature', o.temperature > 0 and np.isfinite(o.temperature), 'a finite number > 0'),
        (
            'calibration_batches',
            isinstance(o.calibration_batches, int) and o.calibration_batches >= 1,
            'an integer >= 1',
        ),
    ):
        if not ok:
            raise ValueError(f'{name}: expected {want}, got {getattr(o, name)!r}')
    if o.teacher is not None and o.loss is not None:
        raise ValueError(
            "loss: teacher='dense' learns from the dense model's outputs, not from a loss of "
            'the labels; pass one of loss= and teacher='
        )


def _global_norms(norms: dict) -> dict:
    """Input norms over the calibration batches of every process (each sees its own share)."""
    if jax.process_count() == 1:
        return norms
    from jax.experimental import multihost_utils

    squares = multihost_utils.process_allgather({n: np.square(v) for n, v in norms.items()})
    return {n: np.sqrt(np.sum(v, axis=0)) for n, v in squares.items()}


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


@dataclasses.dataclass
class Search:
    """A prepared search: which layers, how many weights each keeps, the optimizer and the step."""

    fn: ModelFn  # the user's linen or NNX model as a pure function (ljax.modelfn)
    params: Any  # the frozen pre-trained params (caller's tree, never modified)
    batch_stats: Any  # initial BN statistics, or None
    names: list[str]  # prunable layers, tree order
    kept: dict[str, int]  # k_l
    magnitude: dict[str, jax.Array]  # the one-shot magnitude mask (step 0 of a magnitude search)
    options: SearchOptions
    total_steps: int
    num_classes: int = 0  # the model's output width
    wanda: dict | None = None  # the one-shot Wanda mask, when calibration batches were given
    wanda_skipped: str = ''  # why there is no Wanda mask although calibration batches were given
    # N:M: each kernel's input axes, along which its groups run (`sparsity.input_axes`); None:
    # axis -2 of every kernel
    input_axes: dict[str, tuple[int, ...]] | None = None

    @property
    def selection(self) -> str | None:
        """The exact selection of the step's mask update (`ljax.masks`): the backend's default
        ('native' on a CPU with ljax's kernels), but where those are not built, 'segmented' for a
        short search on a CPU (at most `SMALL_SEARCH` prunable weights and `SHORT_SEARCH`
        steps): its program compiles seconds faster than the hinted one's (on a 2-core CPU,
        0.7 s against 3.5 s for a 54k-weight MLP), while each of its updates costs more (54k
        weights: 1.08 against 0.75 ms; 266k: 3.5 against 0.9 ms), which a long search would pay
        at every step. All give the same masks."""
        total = sum(int(np.size(m)) for m in self.magnitude.values())
        short = total <= SMALL_SEARCH and self.total_steps <= SHORT_SEARCH
        if short and masks.default_selection() == 'hinted':
            return 'segmented'
        return None

    @classmethod
    def create(
        cls,
        model,
        variables,
        sample_x,
        *,
        sparsity: float | None,
        total_steps: int,
        options: SearchOptions = SearchOptions(),
        calibration: Iterable | None = None,
    ) -> 'Search':
        """Validate, choose the prunable kernels and their counts, and the one-shot masks.

        sparsity: fraction removed; with `options.nm` = (N, M) it is 1 - N/M (None: derived).
        calibration: batches for Wanda's input norms (the first `options.calibration_batches`);
          needed for score_init='wanda', and when given the one-shot Wanda mask is made too.
        """
        o = options
        _check_options(o)
        if o.nm is not None:
            nm_lib.check_nm(o.nm, {})
            derived = 1.0 - o.nm[0] / o.nm[1]
            if sparsity is not None and abs(float(sparsity) - derived) > 1e-9:
                raise ValueError(
                    f'sparsity: nm={o.nm[0]}:{o.nm[1]} keeps {o.nm[0]} of every {o.nm[1]} '
                    f'weights, i.e. sparsity {derived:g}; got {sparsity!r} (pass {derived:g} or None)'
                )
            sparsity = derived
        _check_fraction(sparsity)
        if o.score_init == 'wanda' and calibration is None:
            raise ValueError("score_init: 'wanda' needs calibration batches")
        hidden = o.teacher is not None and o.distill == 'hidden'
        # distill='hidden' takes the whole output (final output and hidden states) by default
        output = _whole if hidden and o.output is None else o.output
        fn = model_fn(model, variables, sample_x, output=output)
        params = fn.variables['params']
        traced = sparsity_lib.trace_logits(fn, sample_x)  # the model's one trace at set-up
        predicate = o.prunable or sparsity_lib.default_prunable(
            fn, sample_x, has_classifier=o.teacher is None or o.distill == 'kl', traced=traced
        )
        names = sparsity_lib.prunable_names(params, predicate)
        if not names:
            some = list(sparsity_lib.flatten(params))[:6]
            raise ValueError(
                f'prunable: the predicate selects no parameter; params hold {some}...; '
                'expected a predicate (path tuple, leaf) -> bool that is true for some kernels'
            )
        flat = sparsity_lib.flatten(params)
        weights = {n: flat[n] for n in names}
        axes = sparsity_lib.input_axes(fn, sample_x, names, traced) if o.nm is not None else None
        if o.nm is not None:
            nm_lib.check_nm(o.nm, {n: np.shape(w) for n, w in weights.items()}, axes)
            magnitude = nm_lib.nm_magnitude_masks(weights, *o.nm, axes)
        else:
            magnitude = sparsity_lib.magnitude_masks(weights, sparsity, o.allocation)
        kept = {n: int(np.count_nonzero(np.asarray(magnitude[n]))) for n in names}
        empty = [n for n, k in kept.items() if k == 0]
        if empty:
            raise ValueError(
                f'sparsity: {sparsity!r} keeps no weight in {len(empty)} layer(s) ({empty[0]}, ...); '
                'lower the sparsity, or choose allocation=uniform or erk'
            )
        search = cls(fn, params, fn.variables['batch_stats'] or None, names, kept, magnitude, o, int(total_steps))
        search.input_axes = axes
        search.rate(0)  # an unknown restriction schedule fails here, before any work
        out = traced.output
        if hidden and len(jax.tree.leaves(out)) < 2:
            raise ValueError(
                "distill: 'hidden' matches hidden states, but the model's output is one array; "
                "return (final output, hidden states) (pick them with output=), or use 'cosine'"
            )
        search.num_classes = int(search.final(out).shape[-1])
        if calibration is not None:
            batches = itertools.islice(iter(calibration), o.calibration_batches)
            try:
                norms = calibration_lib.input_norms(fn, fn.variables, batches, names)
            except ValueError as e:  # a kernel whose inputs calibration cannot see
                if o.score_init == 'wanda':
                    raise
                search.wanda_skipped = str(e).splitlines()[0]
            else:
                search.wanda = sparsity_lib.wanda_masks(
                    weights, _global_norms(norms), kept=None if o.nm else kept, nm=o.nm,
                    axes=axes,
                )
        return search

    @functools.cached_property
    def biases(self) -> list[str]:
        """The frozen bias of each pruned kernel (the `bias` beside a `kernel`): the step
        differentiates the loss with respect to them too and checks their gradients, unused
        otherwise. A plain train step does so: each layer's output gradient is then reduced for
        its bias, and XLA:CPU writes that gradient once instead of recomputing the activation's
        derivative inside the transposed copy that the kernel's gradient reads
        (all-MiniLM-L6-v2, batch 64: its backward 522 -> 374 ms, the dense one's 391)."""
        flat = sparsity_lib.flatten(self.params)
        out = []
        for n in self.names:
            head, _, _ = n.rpartition('/')
            b = f'{head}/bias' if head else 'bias'
            if b in flat and jnp.issubdtype(jnp.result_type(flat[b]), jnp.floating):
                out.append(b)
        return out

    @property
    def loss(self) -> Callable:
        """Per-example loss of (float32 logits, labels): the `loss` option, or cross-entropy."""
        return self.options.loss or optax.softmax_cross_entropy_with_integer_labels

    @property
    def frozen(self):
        """What `Parallel` replicates once and passes to every step: the pre-trained params."""
        return self.params

    # ---------------------------------------------------------------- state
    def learning_rate(self) -> optax.Schedule:
        return optax.cosine_decay_schedule(self.options.lr, max(self.total_steps, 1))

    def optimizer(self) -> optax.GradientTransformation:
        o = self.options
        return optax.chain(
            optax.add_decayed_weights(o.weight_decay),
            optax.sgd(self.learning_rate(), momentum=o.momentum),
        )

    @property
    def fused_update(self) -> bool:
        """Whether the step's score update runs in the native top-k kernel's pass (float32 plain
        top-k on CPU, `masks.native_topk_masks` with `sgd`): the same scores and momentum, bit for
        bit, as `optimizer()`'s update, without XLA's passes over the scores and the momentum
        (two a layer) before the kernel's own. Not without weight decay: XLA then drops its term
        and fuses the multiply-adds otherwise (0.5-1% of the scores differed in their last bit)."""
        return (
            masks.resolve_selection(self.selection) == 'native'
            and self.options.nm is None
            and restriction.is_plain_topk(self.options.restriction)
            and DTYPES[self.options.dtype] == jnp.float32
            and self.options.weight_decay > 0
        )

    def _fused_step(self, state, g, prunable, hints):
        """`optimizer()`'s update of the scores, the new masks, thresholds, flips and masked
        weights from one kernel call (`fused_update`); the optimizer's state is its own, with the
        kernel's momentum as its trace and its count moved on as optax moves it."""
        o = self.options
        count_ = optax.tree_utils.tree_get(state.opt_state, 'count')
        trace = optax.tree_utils.tree_get(state.opt_state, 'trace')
        step = jnp.array(-1 * self.learning_rate()(count_), jnp.float32)  # as optax scales
        names = self.names
        masks_, thresholds, flips, weights, scores, momentum = masks.native_topk_masks(
            [state.scores[n] for n in names], [self.kept[n] for n in names],
            [hints[n] for n in names], [state.mask[n] for n in names],
            [prunable[n] for n in names], [state.weights[n] for n in names],
            sgd=([g[n] for n in names], [trace[n] for n in names],
                 (o.weight_decay, o.momentum, step)),
        )
        opt_state = optax.tree_utils.tree_set(
            state.opt_state, trace=dict(zip(names, momentum)),
            count=optax.safe_increment(count_),
        )
        return (dict(zip(names, scores)), opt_state, dict(zip(names, masks_)),
                {n: thresholds[i] for i, n in enumerate(names)}, jnp.sum(flips),
                dict(zip(names, weights)))

    def init_state(self) -> SearchState:
        """The state at step 0. From a magnitude or Wanda mask it is made on the host (NumPy, the
        keys by `ljax.prng`): scores 1.0 on the mask and 1.0 - margin elsewhere, whose top-k (or
        N:M top) is the mask itself at the key of 1.0, and the optimizer's zeros: nothing to
        compile, which a short search notices. Random scores are drawn by one compiled program
        (`_random_state`)."""
        o = self.options
        keys = prng.split_seed(o.seed)
        batch_stats = jax.tree.map(np.array, self.batch_stats) if self.batch_stats is not None else {}
        if o.score_init == 'random':
            return jax.jit(self._random_state)(batch_stats, keys)
        initial = self.wanda if o.score_init == 'wanda' else self.magnitude
        scores = sparsity_lib.init_scores(self._weights, initial, o.score_init, None, o.score_margin)
        mask = {n: np.asarray(initial[n], bool) for n in self.names}
        key = np.zeros((), np.uint32) if o.nm is not None else host_order_keys(np.float32(1.0))
        thresholds = {n: key for n in self.names}  # N:M: unused
        # SGD with momentum: every leaf of its state starts at zero
        opt_state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                 jax.eval_shape(self.optimizer().init, scores))
        return SearchState.start(scores, mask, thresholds, opt_state, batch_stats, keys[1],
                                 self.masked_weights(mask, np), np)

    def _random_state(self, batch_stats, keys) -> SearchState:
        """The state at step 0 from random scores (keys[0] draws them), as one program."""
        o = self.options
        rng_scores = jax.random.wrap_key_data(keys[0])
        scores = sparsity_lib.init_scores(self._weights, {}, 'random', rng_scores)
        if o.nm is not None:
            mask = {n: nm_lib.nm_mask(scores[n], *o.nm, self._nm_axes[n]) for n in self.names}
            thresholds = {n: jnp.zeros((), jnp.uint32) for n in self.names}  # unused by N:M
        else:
            mask, thresholds = masks.topk_masks(scores, self.kept, selection=self.selection)
        opt_state = self.optimizer().init(scores)
        return SearchState.start(scores, mask, thresholds, opt_state, batch_stats,
                                 jnp.asarray(keys[1]), self.masked_weights(mask))

    def masked_weights(self, mask, xp=jnp) -> dict:
        """The prunable weights as the search's model sees them under `mask`: in its dtype,
        pruned ones exactly +0.0 (`SearchState.weights`). xp: jnp, or np on the host."""
        dtype = DTYPES[self.options.dtype]
        flat = sparsity_lib.flatten(self.params)
        weights = {n: xp.asarray(flat[n]).astype(dtype) for n in self.names}
        return masks.masked_weights({n: mask[n] for n in self.names}, weights, xp)

    @staticmethod
    def checkpointed(state: SearchState) -> SearchState:
        """`state` as checkpoints hold it: without its masked weights, which `resumed` derives."""
        return state.replace(weights={})

    def resumed(self, state: SearchState) -> SearchState:
        """A `checkpointed` state made whole again (on the host)."""
        return state.replace(weights=self.masked_weights(state.mask, np))

    @property
    def _nm_axes(self) -> dict:
        """Each prunable kernel's N:M input axes (None: axis -2)."""
        return self.input_axes or dict.fromkeys(self.names)

    @property
    def _weights(self) -> dict:
        """The prunable weights' shapes and dtypes."""
        flat = sparsity_lib.flatten(self.params)
        return {n: jax.ShapeDtypeStruct(np.shape(flat[n]), flat[n].dtype) for n in self.names}

    @functools.cached_property
    def _rate_schedule(self):
        return restriction.rate_schedule(self.options.restriction, self.total_steps)

    def rate(self, step: int) -> float:
        """The short restriction's rate at `step`, on the host (the step computes its own)."""
        return float(self._rate_schedule(step))

    # ---------------------------------------------------------------- pure functions
    def _variables(self, params, batch_stats):
        v = {'params': params}
        if self.batch_stats is not None:
            v['batch_stats'] = batch_stats
        return v

    def masked_params(self, params, mask, xp=jnp):
        """Pruned weights exactly +0.0, every other value untouched. xp: jnp (in the steps) or
        np (the final jackpot, made on the host: no program to compile)."""
        flat = sparsity_lib.flatten(params)
        flat.update(masks.masked_weights({n: mask[n] for n in self.names}, flat, xp))
        return sparsity_lib.unflatten(flat)

    def apply(self, params, batch_stats, x, *, train: bool, rng=None):
        """(logits, new batch_stats) of the model: the one place the search calls it."""
        variables = {'params': params, 'batch_stats': batch_stats if batch_stats is not None else {}}
        return self.fn.apply(variables, x, train=train, rng=rng)

    def final(self, out):
        """The final output among the model's outputs: with distill='hidden' the first leaf (the
        rest are hidden states), otherwise `out` itself."""
        if self.options.teacher is not None and self.options.distill == 'hidden':
            return jax.tree.leaves(out)[0]
        return out

    def teacher_outputs(self, params, x):
        """teacher='dense': the frozen dense model's outputs (eval mode, the pre-trained BN
        statistics), float32 and without gradient; None when the search learns from labels."""
        if self.options.teacher is None:
            return None
        out, _ = self.apply(params, self.batch_stats, x, train=False)
        return jax.tree.map(lambda a: lax.stop_gradient(a.astype(jnp.float32)), out)

    def losses(self, out, y, teacher):
        """(per-example loss, per-example score) of float32 outputs: with labels the `loss`
        option and top-1 correctness; with a teacher the distillation loss and the agreement
        with the dense argmax ('kl') or the cosine to the dense outputs ('cosine')."""
        if teacher is None:
            return self.loss(out, y), jnp.argmax(out, -1) == y
        if self.options.distill == 'cosine':
            cos = _cosine(out, teacher)
            return 1.0 - cos, cos
        if self.options.distill == 'hidden':
            cos = [_cosine(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(teacher))]
            return 1.0 - sum(cos) / len(cos), cos[0]
        t = self.options.temperature
        log_p = jax.nn.log_softmax(teacher / t, axis=-1)
        log_q = jax.nn.log_softmax(out / t, axis=-1)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
        kl = kl.reshape(kl.shape[0], -1).mean(-1) * t * t
        return kl, jnp.argmax(out, -1) == jnp.argmax(teacher, -1)

    def train_step(self, state: SearchState, params, x, y):
        """One search step on this device's share of the batch; call under pmap (axis AXIS_NAME)."""
        flat = sparsity_lib.flatten(params)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        dtype = DTYPES[self.options.dtype]
        rate = self._rate_schedule(state.step)  # on the device: no host value per step

        f = {n: _cast(w, dtype) for n, w in flat.items()}
        x = _cast(x, dtype)
        teacher = self.teacher_outputs(sparsity_lib.unflatten(f), x)

        def loss_fn(weights, biases):
            logits, batch_stats = self.apply(
                sparsity_lib.unflatten({**f, **biases, **weights}), state.batch_stats, x,
                train=True, rng=rng,
            )
            loss, score = self.losses(_cast(logits, jnp.float32), y, teacher)
            return loss.mean(), (score, batch_stats)

        prunable = {n: f[n] for n in self.names}

        def masked(scores):  # the prunable weights as the model sees them, carried in the state
            return {n: masks.masked_ste(scores[n], state.weights[n], f[n]) for n in self.names}

        weights, ste_vjp = jax.vjp(masked, state.scores)
        biases = {n: f[n] for n in self.biases}
        (loss, (score, batch_stats)), (g, g_biases) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(weights, biases)
        g_biases = lax.pmean(g_biases, AXIS_NAME)
        if dtype == jnp.float32:
            # averaged over the devices before the STE's product with the (replicated) weights:
            # XLA then fuses that product into the optimizer's update, a pass over them fewer
            g = lax.pmean(g, AXIS_NAME)
            checked = (g, g_biases)  # finite there, the scores' gradients are (times weights)
        else:  # a half-precision gradient is averaged in float32, after the product
            checked = (lax.pmean(ste_vjp(g)[0], AXIS_NAME), g_biases)
        loss = lax.pmean(loss, AXIS_NAME)
        batch_stats = lax.pmean(batch_stats, AXIS_NAME)

        def update():
            hints = {n: masks.extrapolate(state.thresholds[n], state.previous[n]) for n in self.names}
            weights = None  # the new masked weights, where the top-k does not write them
            if self.fused_update:  # the scores' update in the top-k kernel's pass
                scores, opt_state, mask, thresholds, flips, weights = self._fused_step(
                    state, g, prunable, hints)
            else:
                grads = ste_vjp(g)[0] if dtype == jnp.float32 else checked[0]
                updates, opt_state = self.optimizer().update(grads, state.opt_state, state.scores)
                scores = optax.apply_updates(state.scores, updates)
                if self.options.nm is not None:
                    if restriction.is_plain_topk(self.options.restriction):
                        # rate 1: the N:M top of every group, without the restriction's candidates
                        # and its per-layer branch (a conditional, which on a GPU waits on the host)
                        mask = {n: nm_lib.nm_mask(scores[n], *self.options.nm, self._nm_axes[n])
                                for n in self.names}
                    else:
                        mask = nm_lib.nm_restrict_all(
                            state.mask, scores, *self.options.nm, rate, self.input_axes
                        )
                    thresholds = state.thresholds
                    flips = sum(count(mask[n] != state.mask[n]) for n in self.names)
                elif restriction.is_plain_topk(self.options.restriction):
                    # rate 1 at every step: the top-k alone, without the restriction's look at the
                    # old mask (whose changed blocks would all have to be gathered); flips counted
                    # on the way, the masked weights too: the native kernel rewrites them where the
                    # mask changes
                    mask, thresholds, flips, weights = masks.topk_masks(
                        scores, self.kept, hints, old=state.mask, count_flips=True,
                        selection=self.selection, weights=prunable, masked=state.weights,
                    )
                else:
                    mask, thresholds, flips = restriction.restrict_masks(
                        state.mask, scores, self.kept, rate, hints, count_flips=True,
                        selection=self.selection,
                    )
            if weights is None:  # one pass over the new mask
                weights = masks.masked_weights(mask, prunable)
            new = state.replace(
                step=state.step + 1,
                scores=scores,
                mask=mask,
                weights=weights,
                thresholds=thresholds,
                previous=state.thresholds,
                opt_state=opt_state,
                batch_stats=batch_stats,
            )
            return new, jnp.asarray(flips, jnp.int32)

        def keep():  # scores, optimizer state, mask, thresholds and statistics as they were
            return state.replace(step=state.step + 1), jnp.int32(0)

        # loss and gradients are pmean'd: every replica skips a non-finite step alike; decided
        # before the update, which then runs (in place) or not: no pass over the state of its own
        (new, flips), finite = loop_lib.update_if_finite(loss, checked, update, keep)
        metrics = {
            'loss': loss,
            'accuracy': lax.pmean(jnp.mean(score), AXIS_NAME),
            'flips': flips,
            'finite': finite,
        }
        return new, metrics

    def eval_step(self, params, mask, batch_stats, x, y, weight):
        """Sums of (correct, top-5 correct, loss, weight) over this device's share; psum'd.
        With distill='cosine' or 'hidden', 'correct' sums the cosine of the final outputs to the
        dense ones and 'loss' the distillation loss (labels unused); otherwise labels are scored,
        whatever the search learned from."""
        logits, _ = self.apply(
            self.masked_params(params, mask) if mask is not None else params,
            batch_stats,
            x,
            train=False,
        )
        logits = _cast(logits, jnp.float32)
        embedding = self.options.teacher is not None and self.options.distill != 'kl'
        if embedding:
            loss, score = self.losses(logits, y, self.teacher_outputs(params, x))
            logits = self.final(logits)
        else:
            loss, score = self.loss(logits, y), jnp.argmax(logits, -1) == y
        sums = {
            'correct': jnp.sum(score * weight),
            'loss': jnp.sum(loss * weight),
            'count': jnp.sum(weight),
        }
        if logits.shape[-1] > 5 and not embedding:
            top5 = jnp.any(lax.top_k(logits, 5)[1] == y[:, None], axis=-1)
            sums['correct5'] = jnp.sum(top5 * weight)
        return lax.psum(sums, AXIS_NAME)

    def bn_step(self, params, mask, batch_stats, x):
        """BN running statistics after one train-mode forward of the masked model (no learning)."""
        _, batch_stats = self.apply(
            self.masked_params(params, mask), batch_stats, x, train=True, rng=jax.random.key(0)
        )
        return lax.pmean(batch_stats, AXIS_NAME)

    # ---------------------------------------------------------------- results
    def jackpot_variables(self, mask, batch_stats) -> dict:
        params = jax.tree.map(np.asarray, jax.device_get(self.params))
        return self._variables(self.masked_params(params, mask, xp=np), batch_stats)

    def params_mask(self, mask) -> dict:
        """The mask shaped like params: bool arrays on prunable leaves, None elsewhere."""
        flat = {n: None for n in sparsity_lib.flatten(self.params)}
        flat.update({n: np.asarray(mask[n]) for n in self.names})
        return sparsity_lib.unflatten(flat)


@dataclasses.dataclass
class Jackpot:
    """Result of `search_jackpot`.

    variables: {'params': pre-trained params with pruned weights exactly 0.0 and all else
      bit-identical, 'batch_stats': as updated by the search} (batch_stats absent if the model has none).
    model: for an NNX model, a new module holding `variables` (None for linen).
    mask: pytree shaped like params: bool arrays on prunable leaves, None elsewhere.
    sparsity: achieved fraction of prunable weights removed.
    kept_per_layer: {layer path: kept count}. scores: final scores per layer.
    history: one dict per epoch (train loss/accuracy, mask flips, eval accuracy if eval_batches);
      flips count positions whose mask bit changed, so a swap (one revived, one pruned) counts 2.
    """

    variables: dict
    mask: dict
    sparsity: float
    kept_per_layer: dict[str, int]
    scores: dict
    history: list[dict]
    model: Any = None


def _first_batch(batches, labels: bool = True):
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
    return _as_xy(batch, 0, labels)


def _as_xy(batch, index, labels: bool = True):
    """(x, y) of a batch: a tuple (x, y, ...), or a dict with labels under 'label' (or 'labels',
    'y') and the input under 'image' (as tfds yields) or 'x', else its other entries as the
    model's keyword arguments. x may be a tuple or dict of arrays (`ljax.modelfn.call_args`).
    labels=False (a search with a teacher): x alone (an array, a tuple whose first entry is x,
    a dict) is a batch too; y is then zeros, and any labels given are not read."""
    if isinstance(batch, Mapping):
        label_key = next((k for k in LABEL_KEYS if k in batch), None)
        input_key = next((k for k in INPUT_KEYS if k in batch), None)
        if input_key is not None:
            x = batch[input_key]
        else:  # the other entries are the model's keyword arguments
            x = {k: v for k, v in batch.items() if k != label_key}
        if label_key is None and labels:
            raise ValueError(
                f'batches: batch {index} is a dict with keys {sorted(batch)} and no labels; '
                f"expected one of {list(LABEL_KEYS)} (the other entries are the model's inputs)"
            )
        if isinstance(x, Mapping) and not x:
            raise ValueError(f'batches: batch {index} is a dict with labels and no inputs')
        x, y = _inputs(x), batch[label_key] if labels else None
    elif labels:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                f'batches: batch {index} is a {type(batch).__name__}; expected a tuple (x, y) '
                "of arrays or a dict {'image': x, 'label': y}"
            )
        x, y = _inputs(batch[0]), batch[1]
    else:
        x = _inputs(batch[0] if isinstance(batch, (tuple, list)) else batch)
    n = _batch_size(x, index)
    if not labels:
        return x, np.zeros(n, np.int32)
    if isinstance(y, (tuple, list, Mapping)):
        raise ValueError(
            f'batches: batch {index}: the labels are a {type(y).__name__}; expected one array of '
            'integer class indices (are x and y swapped? batches are (x, y))'
        )
    y = np.asarray(y)
    if y.ndim > 1 and all(np.ndim(a) == 1 for a in jax.tree.leaves(x)):
        raise ValueError(
            f'batches: batch {index}: labels of shape {y.shape} and x of shape ({n},): are x and '
            'y swapped? batches are (x, y)'
        )
    return x, y


INPUT_KEYS = ('image', 'x')
LABEL_KEYS = ('label', 'labels', 'y')


def _inputs(x):
    """x as NumPy: an array, or a tuple / dict of them (a model's several inputs)."""
    if isinstance(x, (tuple, Mapping)):
        return jax.tree.map(np.asarray, x)
    return np.asarray(x)


def _batch_size(x, index) -> int:
    """The common leading axis of x's arrays; ValueError naming the batch otherwise."""
    leaves = jax.tree.leaves(x)
    if not leaves or any(np.ndim(a) == 0 for a in leaves):
        raise ValueError(f'batches: batch {index}: x holds a scalar; expected batches of inputs')
    sizes = {np.shape(a)[0] for a in leaves}
    if len(sizes) > 1:
        raise ValueError(
            f'batches: batch {index}: the inputs have leading axes {sorted(sizes)}; every input '
            'needs the same batch size'
        )
    return sizes.pop()


def _shapes(x) -> tuple:
    """(tree structure, per-example shapes) of x: what must stay the same across batches."""
    leaves, tree = jax.tree.flatten(x)
    return tree, tuple(np.shape(a)[1:] for a in leaves)


def first_example(x):
    """x[:1] of every input: the sample the model is traced on."""
    return jax.tree.map(lambda a: a[:1], x)


def checked_batches(
    batches: Iterable, num_classes: int, first_x, labels: bool = True
) -> Iterable[tuple]:
    """(x, y) of every batch, after checking what would otherwise poison the search silently:
    integer labels in [0, num_classes), as many labels as inputs, the inputs shaped as in the
    first batch `first_x` throughout. (Non-finite inputs are the step's business: such steps
    are skipped and counted.) labels=False: batches may be x alone (`_as_xy`)."""
    want = _shapes(first_x)
    for i, batch in enumerate(batches):
        x, y = _as_xy(batch, i, labels)
        n = _batch_size(x, i)
        problem = None
        if _shapes(x) != want and not isinstance(x, (tuple, Mapping)):
            problem = f'x of shape {x.shape}, where the first batch had (N,) + {want[1][0]}'
        elif _shapes(x) != want:
            problem = (
                f'inputs of per-example shapes {_shapes(x)[1]}, where the first batch had '
                f'{want[1]}'
            )
        elif y.shape != (n,):
            problem = f'{n} inputs but labels of shape {y.shape}; expected ({n},)'
        elif not np.issubdtype(y.dtype, np.integer):
            problem = f'labels of dtype {y.dtype}; expected integer class indices'
        elif y.size and (y.min() < 0 or y.max() >= num_classes):
            bad = y[(y < 0) | (y >= num_classes)][0]
            problem = f'label {bad} outside [0, {num_classes}) for a model with {num_classes} outputs'
        if problem:
            raise ValueError(f'batches: batch {i}: {problem}')
        yield x, y


def search_jackpot(
    model,
    variables,
    batches: Iterable | None = None,
    *,
    sparsity: float | None = None,
    epochs: int,
    eval_batches: Iterable | None = None,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    log_every: int = 50,
    **options,
) -> Jackpot:
    """Find a lottery jackpot: a mask over the frozen pre-trained weights of `model`.

    linen: `search_jackpot(model, variables, batches, ...)`, the module called as
      `model.apply(variables, x, train=...)`, variables {'params': ..., 'batch_stats': ...}.
    NNX: `search_jackpot(module, batches, ...)`, an `nnx.Module` holding its pre-trained weights,
      called as `module(x)` (or `module(x, train=...)`), searched in training mode (BatchNorm on
      batch statistics, Dropout on) and evaluated in eval mode; `.model` of the result is a new
      module holding the jackpot. Either way the caller's weights are never modified or donated.
    batches: re-iterable of (x, y) NumPy batches (integer labels), or of x alone with
      teacher='dense'; each pass is one epoch. Every
      batch is split across the local devices, so its size must divide by their number. With
      several processes (`jax.distributed`), each process passes its own share of every batch.
    sparsity: fraction of prunable weights *removed*, 0 <= sparsity < 1 (0.9 keeps 10%); with
      nm=(N, M) it is 1 - N/M and may be left out.
    epochs: passes over `batches`, >= 1.
    eval_batches: optional (x, y) or (x, y, weight) batches scored after every epoch (history).
    callback: optional callable(epoch, history_row) after every epoch.
    progress: show a progress bar (steps, loss, images/s) and a line per epoch.
    log_every: steps between reads of the metrics from the devices (the bar's refresh).
    **options: the fields of `SearchOptions` (lr=0.1, momentum=0.9, weight_decay=5e-4,
      score_init='magnitude', score_margin=0.01, allocation='global_magnitude',
      restriction='none', prunable=None, seed=0, dtype='float32', nm=None,
      calibration_batches=8, loss=None, teacher=None, distill='kl', temperature=1.0,
      output=None); see its docstring.
    """
    if batches is None and isinstance(model, nnx.Module):
        variables, batches = None, variables  # search_jackpot(module, batches, ...)
    elif batches is None and not isinstance(variables, Mapping):
        raise ValueError(
            'variables: a flax.linen model needs its pre-trained variables: '
            'search_jackpot(model, variables, batches, ...) (an nnx.Module holds its own)'
        )
    unknown = set(options) - {f.name for f in dataclasses.fields(SearchOptions)}
    if unknown:
        raise ValueError(
            f'options: unknown {sorted(unknown)}; expected some of '
            f'{[f.name for f in dataclasses.fields(SearchOptions)]}'
        )
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f'epochs: expected an integer >= 1, got {epochs!r}')
    if isinstance(log_every, bool) or not isinstance(log_every, (int, np.integer)) or log_every < 1:
        raise ValueError(f'log_every: expected an integer >= 1, got {log_every!r}')
    labels = options.get('teacher') is None
    x0, _ = _first_batch(batches, labels)
    _warn_if_raw_images(x0)
    steps_per_epoch = len(batches) if hasattr(batches, '__len__') else sum(1 for _ in batches)
    search = Search.create(
        model,
        variables,
        first_example(x0),
        sparsity=sparsity,
        total_steps=epochs * steps_per_epoch,
        options=SearchOptions(**options),
        calibration=batches if options.get('score_init') == 'wanda' else None,
    )
    par = Parallel(search)

    def on_epoch(epoch, state, row):
        if eval_batches is not None:
            row['eval_accuracy'] = par.evaluate_state(eval_batches, state)['accuracy']
        if callback is not None:
            callback(epoch, row)

    loop = loop_lib.Loop(
        par,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=_batch_size(x0, 0) * jax.process_count(),
        log_every=log_every,
        on_epoch=on_epoch,
        progress=progress,
    )
    state, history = loop.run(
        par.replicate(search.init_state()),
        lambda epoch, start: checked_batches(batches, search.num_classes, x0, labels),
    )
    final = par.unreplicate(state)
    total = sum(int(np.size(final.mask[n])) for n in search.names)
    kept = {n: int(np.sum(final.mask[n])) for n in search.names}
    jackpot_variables = search.jackpot_variables(final.mask, final.batch_stats)
    return Jackpot(
        model=search.fn.rebuild(jackpot_variables) if search.fn.kind == 'nnx' else None,
        variables=jackpot_variables,
        mask=search.params_mask(final.mask),
        sparsity=1.0 - sum(kept.values()) / total,
        kept_per_layer=kept,
        scores=final.scores,
        history=history,
    )


def _whole(out):
    return out


def _cosine(a, b):
    """Per-example cosine of a and b along the last axis, averaged over any axes between."""
    dot = jnp.sum(a * b, -1)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    cos = dot / jnp.maximum(norms, 1e-12)
    return cos.reshape(cos.shape[0], -1).mean(-1)


def _cast(x, dtype):
    """Floating arrays (of a pytree) to `dtype`; integer and boolean arrays as they are."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, x
    )


def _warn_if_raw_images(x) -> None:
    """uint8 inputs are passed to the model as they are (0..255): say so once."""
    if any(np.asarray(a).dtype == np.uint8 for a in jax.tree.leaves(x)):
        warnings.warn(
            'batches: x is uint8 (raw 0..255 pixels) and goes into the model unchanged; '
            'convert it to the floats the model was trained on (e.g. x / 255.0) if it expects them',
            stacklevel=3,
        )
