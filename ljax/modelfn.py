"""How ljax calls a Flax model: one pure function for flax.linen and flax.nnx modules.

`model_fn(model, variables, sample_x)` returns a `ModelFn`: the model's variables as plain dicts
{'params': ..., 'batch_stats': ...} and a pure `apply(variables, x, train=, rng=)` that can be
jitted, differentiated with respect to the params and pmapped. Layers are named by their path
joined with '/' ('Conv_0/kernel'; NNX list indices become strings: 'layers/0/kernel').
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import nnx, traverse_util
from flax.core import unfreeze

COLLECTIONS = ('params', 'batch_stats')


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, as a static arg
class ModelFn:
    """A uniform, pure view of a user's model.

    kind: 'linen' or 'nnx'.
    variables: {'params': nested dict of arrays, 'batch_stats': nested dict ({} if none)}.
    apply(variables, x, *, train, rng) -> (logits, batch_stats): train=True normalises with batch
      statistics and returns the updated running averages, dropout draws from `rng` (a PRNG key);
      train=False uses running statistics, no dropout (rng may be None) and returns
      variables['batch_stats'] unchanged. rng=None with train=True: linen draws from key(0), nnx
      from the keys the module holds (the same masks every call).
    rebuild(variables): nnx: a new nnx.Module holding these values (the input module is never
      modified); linen: the variables dict itself.
    """

    kind: str
    variables: dict
    _apply: Callable = dataclasses.field(repr=False, compare=False)
    _rebuild: Callable = dataclasses.field(repr=False, compare=False)

    def apply(self, variables, x, *, train: bool, rng=None):
        return self._apply(variables, x, bool(train), rng)

    def rebuild(self, variables):
        return self._rebuild(variables)


def _flat(tree) -> dict[str, Any]:
    return traverse_util.flatten_dict(unfreeze(tree), sep='/') if tree else {}


def model_fn(model, variables=None, sample_x=None) -> ModelFn:
    """The `ModelFn` of a flax.linen Module (with its `variables`) or a flax.nnx Module.

    linen: `variables` {'params': ..., 'batch_stats': ...?} is checked against the shapes that
    `model.init` creates for `sample_x` (skipped when sample_x is None). nnx: the module holds its
    weights and `variables` must be None. ValueError for anything else.
    """
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(
                'variables: an nnx.Module holds its own weights; pass variables=None '
                f'(got {type(variables).__name__})'
            )
        return _nnx_fn(model)
    if isinstance(model, nn.Module):
        return _linen_fn(model, variables, sample_x)
    raise ValueError(
        f'model: expected a flax.linen or flax.nnx Module, got {type(model).__name__}'
    )


# ------------------------------------------------------------------------------------- linen
def check_variables(model: nn.Module, variables, x) -> None:
    """ValueError unless `variables` has exactly the params (and batch_stats) the model creates
    for input `x`; x=None checks only the form."""
    if not isinstance(variables, Mapping) or 'params' not in variables:
        raise ValueError(
            "variables: expected a mapping {'params': ..., 'batch_stats': ...} "
            f'of pre-trained variables, got {type(variables).__name__}'
        )
    if x is None:
        return
    try:
        # A 'dropout' stream too: an nnx.bridge.to_linen module builds its Dropout at init.
        rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
        expected = jax.eval_shape(lambda: model.init(rngs, x, train=False))
    except Exception as e:  # the model itself does not run on this input
        raise ValueError(
            f'batches: the model does not accept x of shape {np.shape(x)}: '
            f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        ) from None
    for collection in COLLECTIONS:
        want = {n: tuple(v.shape) for n, v in _flat(expected.get(collection, {})).items()}
        got = {n: tuple(np.shape(v)) for n, v in _flat(variables.get(collection, {})).items()}
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


def _linen_fn(model: nn.Module, variables, sample_x) -> ModelFn:
    check_variables(model, variables, sample_x)
    # Other collections (user constants) are passed through unchanged; they do not train.
    extra = {k: v for k, v in variables.items() if k not in COLLECTIONS}
    own = {c: unfreeze(variables.get(c) or {}) for c in COLLECTIONS}

    def apply(v, x, train, rng):
        vs = dict(extra, params=v['params'])
        if v.get('batch_stats'):
            vs['batch_stats'] = v['batch_stats']
        # Never empty: a to_linen-wrapped module builds its Dropout (off in eval) on every call.
        rngs = {'dropout': rng if rng is not None else jax.random.key(0)}
        if not train:
            return model.apply(vs, x, train=False, rngs=rngs), v.get('batch_stats', {})
        logits, updates = model.apply(vs, x, train=True, mutable=['batch_stats'], rngs=rngs)
        return logits, unfreeze(updates).get('batch_stats', {})

    return ModelFn('linen', own, apply, lambda v: v)


# --------------------------------------------------------------------------------------- nnx
class _Split:
    """One nnx State as a flat {name: value} dict and back, building fresh Variables each time
    (nnx.split hands out the module's own Variables: merging them would let a BatchNorm update
    write into the user's module)."""

    def __init__(self, state):
        paths, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        self.names = [
            '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
            for path, _ in paths
        ]
        self.values = [leaf for _, leaf in paths]

    def to_dict(self, values=None) -> dict:
        values = self.values if values is None else values
        return traverse_util.unflatten_dict(dict(zip(self.names, values)), sep='/')

    def state(self, tree=None):
        values = self.values if tree is None else [_flat(tree)[n] for n in self.names]
        return jax.tree_util.tree_unflatten(self.treedef, values)

    def read(self, state) -> dict:
        return self.to_dict(jax.tree_util.tree_leaves(state))


def _is_key(a) -> bool:
    return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def _reseeded(rest: _Split, rng):
    """The non-weight state with every RNG key derived from `rng`: dropout randomness comes from
    the argument, not from mutable Rngs state, so the function stays pure and replicas agree."""
    state = rest.state()
    variables = jax.tree_util.tree_leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    if rng is None or len(variables) != len(rest.values):
        return state
    key = rng if _is_key(rng) else jax.random.wrap_key_data(rng)
    values = []
    for i, (var, old) in enumerate(zip(variables, rest.values)):
        if isinstance(var, nnx.RngKey):
            new = jax.random.fold_in(key, i)
            if not _is_key(old):
                new = jax.random.key_data(new)
            old = new
        values.append(old)
    return jax.tree_util.tree_unflatten(rest.treedef, values)


def _nnx_fn(module: nnx.Module) -> ModelFn:
    graphdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    params, stats, rest = _Split(params), _Split(stats), _Split(rest)
    # A module written as `__call__(x, train)` gets the flag too: a call-time argument overrides
    # the mode attributes.
    takes_train = 'train' in inspect.signature(type(module).__call__).parameters

    def apply(v, x, train, rng):
        merged = nnx.merge(
            graphdef,
            params.state(v['params']),
            stats.state(v.get('batch_stats')),
            _reseeded(rest, rng),
        )
        merged = nnx.view(
            merged, deterministic=not train, use_running_average=not train, raise_if_not_found=False
        )
        logits = merged(x, train=train) if takes_train else merged(x)
        if not train:
            return logits, v.get('batch_stats', {})
        return logits, stats.read(nnx.state(merged, nnx.BatchStat))

    def rebuild(v):
        return nnx.merge(
            graphdef, params.state(v['params']), stats.state(v.get('batch_stats')), rest.state()
        )

    return ModelFn(
        'nnx', {'params': params.to_dict(), 'batch_stats': stats.to_dict()}, apply, rebuild
    )
