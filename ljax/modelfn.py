"""How ljax calls a Flax model: one pure function for flax.linen and flax.nnx modules.

`model_fn(model, variables, sample_x)` returns a `ModelFn`: the model's variables as plain dicts
{'params': ..., 'batch_stats': ...} and a pure `apply(variables, x, train=, rng=)` that can be
jitted, differentiated with respect to the params and pmapped. Layers are named by their path
joined with '/' ('Conv_0/kernel'; NNX list indices become strings: 'layers/0/kernel').

Inputs: x is an array, or a pytree of arrays with a common leading batch axis; a tuple x is
passed as positional arguments (`model(x0, x1)`), a dict as keyword arguments (`model(ids=...,
mask=...)`), anything else as the one argument. Outputs: the array the model returns, or the
one `output=` picks from a dict or tuple (a key or index, or a function of the output); a dict
with a 'logits' entry gives that entry by default.
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


def _init_rngs():
    """The streams of a shape-only `model.init`: a 'dropout' one too, as an nnx.bridge.to_linen
    module builds its Dropout at init. Made inside `jax.eval_shape`, they compile nothing."""
    return {'params': jax.random.key(0), 'dropout': jax.random.key(1)}


def call_args(x) -> tuple[tuple, dict]:
    """(args, kwargs) the model is called with for input x (module docstring)."""
    if isinstance(x, tuple) and not hasattr(x, '_fields'):
        return x, {}
    if isinstance(x, Mapping):
        return (), dict(x)
    return (x,), {}


def pick_output(out, output=None):
    """The logits among a model's outputs: `output` (a key/index, or a callable of the output);
    None: the output itself if it is an array, a dict's 'logits'; ValueError naming `output=`
    otherwise."""
    if callable(output):
        return output(out)
    if output is not None:
        try:
            return out[output]
        except (KeyError, IndexError, TypeError):
            what = f'keys {sorted(out)}' if isinstance(out, Mapping) else type(out).__name__
            raise ValueError(
                f'output: {output!r} is not among the model\'s outputs ({what})'
            ) from None
    if isinstance(out, Mapping):
        if 'logits' in out:
            return out['logits']
        raise ValueError(
            f'output: the model returns a dict with keys {sorted(out)}; pass output=KEY (or a '
            'function of the output) naming the logits'
        )
    if isinstance(out, (tuple, list)):
        raise ValueError(
            f'output: the model returns a {type(out).__name__} of {len(out)}; pass output=INDEX '
            '(or a function of the output) naming the logits'
        )
    return out


def _flat(tree) -> dict[str, Any]:
    return traverse_util.flatten_dict(unfreeze(tree), sep='/') if tree else {}


def model_fn(model, variables=None, sample_x=None, output=None) -> ModelFn:
    """The `ModelFn` of a flax.linen Module (with its `variables`) or a flax.nnx Module.

    linen: `variables` {'params': ..., 'batch_stats': ...?} is checked against the shapes that
    `model.init` creates for `sample_x` (skipped when sample_x is None). nnx: the module holds its
    weights and `variables` must be None. ValueError for anything else. `output` picks the
    logits (`pick_output`).
    """
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(
                'variables: an nnx.Module holds its own weights; pass variables=None '
                f'(got {type(variables).__name__})'
            )
        fn = _nnx_fn(model)
    elif isinstance(model, nn.Module):
        fn = _linen_fn(model, variables, sample_x)
    else:
        raise ValueError(
            f'model: expected a flax.linen or flax.nnx Module, got {type(model).__name__}'
        )
    inner = fn._apply

    def apply(v, x, train, rng):
        out, batch_stats = inner(v, x, train, rng)
        return pick_output(out, output), batch_stats

    return dataclasses.replace(fn, _apply=apply)


def takes_train(module) -> bool:
    """Whether the module's `__call__` takes a `train` argument (or **kwargs): models written
    with and without one are both called, the flag passed only where it is taken."""
    params = inspect.signature(type(module).__call__).parameters
    return 'train' in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# ------------------------------------------------------------------------------------- linen
def check_variables(model: nn.Module, variables, x) -> None:
    """ValueError unless `variables` has exactly the params (and batch_stats) the model creates
    for input `x`; x=None checks only the form."""
    if not isinstance(variables, Mapping) or 'params' not in variables:
        got = (
            f'a {type(variables).__name__} with keys {sorted(map(str, variables))[:6]}, which are '
            "not the model's parameters either"
            if isinstance(variables, Mapping)
            else type(variables).__name__
        )
        raise ValueError(
            "variables: expected the pre-trained variables {'params': ..., 'batch_stats': ...} "
            f'(what model.init returns), got {got}'
        )
    if x is None:
        return
    try:
        flag = {'train': False} if takes_train(model) else {}
        args, kwargs = call_args(x)
        expected = jax.eval_shape(lambda: model.init(_init_rngs(), *args, **kwargs, **flag))
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


def _with_params_key(model: nn.Module, variables, x):
    """variables as given, or {'params': variables} when the caller passed the params alone
    (a mapping without 'params' whose entries are the model's top-level parameter modules)."""
    if not isinstance(variables, Mapping) or 'params' in variables or x is None:
        return variables
    try:
        flag = {'train': False} if takes_train(model) else {}
        args, kwargs = call_args(x)
        expected = jax.eval_shape(lambda: model.init(_init_rngs(), *args, **kwargs, **flag))
    except Exception:  # check_variables says why the model does not run
        return variables
    if set(variables) and set(variables) == set(expected.get('params', {})):
        return {'params': variables}
    return variables


def _linen_fn(model: nn.Module, variables, sample_x) -> ModelFn:
    variables = _with_params_key(model, variables, sample_x)
    check_variables(model, variables, sample_x)
    # Other collections (user constants) are passed through unchanged; they do not train.
    extra = {k: v for k, v in variables.items() if k not in COLLECTIONS}
    own = {c: unfreeze(variables.get(c) or {}) for c in COLLECTIONS}
    flagged = takes_train(model)

    def apply(v, x, train, rng):
        vs = dict(extra, params=v['params'])
        if v.get('batch_stats'):
            vs['batch_stats'] = v['batch_stats']
        # Never empty: a to_linen-wrapped module builds its Dropout (off in eval) on every call.
        rngs = {'dropout': rng if rng is not None else jax.random.key(0)}
        flag = {'train': train} if flagged else {}
        args, kwargs = call_args(x)
        kwargs = {**kwargs, **flag}
        if not train and (flagged or not v.get('batch_stats')):
            return model.apply(vs, *args, rngs=rngs, **kwargs), v.get('batch_stats', {})
        if not train:  # without a flag BatchNorm may still write its statistics: dropped here
            out = model.apply(vs, *args, rngs=rngs, mutable=['batch_stats'], **kwargs)[0]
            return out, v['batch_stats']
        logits, updates = model.apply(vs, *args, mutable=['batch_stats'], rngs=rngs, **kwargs)
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
    flagged = takes_train(module)

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
        args, kwargs = call_args(x)
        logits = merged(*args, **kwargs, train=train) if flagged else merged(*args, **kwargs)
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
