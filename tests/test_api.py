"""`search_jackpot` takes models as users write them: several inputs, dict and tuple outputs,
params passed alone, and every wrong call fails in one line naming the wrong argument."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ljax import search_jackpot


class TwoInputs(nn.Module):
    """model(x, z) -> {'logits': ..., 'features': ...}; no train argument."""

    @nn.compact
    def __call__(self, x, z):
        h = nn.relu(nn.Dense(32)(x) + nn.Dense(32)(z))
        features = nn.relu(nn.Dense(32)(h))
        return {'features': features, 'logits': nn.Dense(4)(features)}


class Keywords(nnx.Module):
    """module(ids=..., scale=...) -> (logits, features)."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(50, 16, rngs=rngs)
        self.hidden = nnx.Linear(16, 32, rngs=rngs)
        self.head = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, ids, scale):
        h = nnx.relu(self.hidden(self.embed(ids).mean(1) * scale[:, None]))
        return self.head(h), h


def two_input_batches(n=4, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(batch, 6)).astype(np.float32)
        z = rng.normal(size=(batch, 3)).astype(np.float32)
        out.append(((x, z), (x[:, 0] + z[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0)))
    return out


def keyword_batches(n=4, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            'ids': rng.integers(0, 50, size=(batch, 5)).astype(np.int32),
            'scale': rng.uniform(0.5, 1.5, size=(batch,)).astype(np.float32),
            'label': rng.integers(0, 4, size=(batch,)).astype(np.int32),
        }
        for _ in range(n)
    ]


def two_inputs():
    model = TwoInputs()
    v = model.init(jax.random.key(0), np.zeros((1, 6), np.float32), np.zeros((1, 3), np.float32))
    return model, jax.tree.map(np.asarray, v)


def test_tuple_inputs_are_positional_and_a_dict_output_gives_its_logits():
    model, v = two_inputs()
    jp = search_jackpot(model, v, two_input_batches(), sparsity=0.5, epochs=2, progress=False)
    # the classifier is found from the output used: the logits' Dense stays dense
    assert jp.mask['Dense_3']['kernel'] is None
    assert set(jp.kept_per_layer) == {'Dense_0/kernel', 'Dense_1/kernel', 'Dense_2/kernel'}
    x, z = two_input_batches(1, seed=3)[0][0]
    out = model.apply(jp.variables, x, z)
    masked = {**jp.variables['params']}
    assert np.all(np.asarray(masked['Dense_0']['kernel'])[~jp.mask['Dense_0']['kernel']] == 0)
    assert out['logits'].shape == (16, 4)


def test_output_option_picks_another_entry():
    model, v = two_inputs()
    jp = search_jackpot(
        model, v, two_input_batches(), sparsity=0.5, epochs=1, progress=False,
        output=lambda out: out['logits'] * 2.0,
    )  # fmt: skip
    assert jp.mask['Dense_3']['kernel'] is None


def test_dict_batches_are_keyword_inputs_and_tuple_outputs_take_an_index():
    module = Keywords(nnx.Rngs(0))
    jp = search_jackpot(module, keyword_batches(), sparsity=0.5, epochs=1, progress=False, output=0)
    assert set(jp.kept_per_layer) == {'hidden/kernel'}  # embeddings are not products
    assert jp.mask['embed']['embedding'] is None
    with pytest.raises(ValueError, match=r'^output: the model returns a tuple of 2; pass output='):
        search_jackpot(module, keyword_batches(), sparsity=0.5, epochs=1, progress=False)


def test_params_alone_are_accepted_as_variables():
    model, v = two_inputs()
    jp = search_jackpot(model, v['params'], two_input_batches(), sparsity=0.5, epochs=1,
                        progress=False)  # fmt: skip
    assert jp.sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    'call, message',
    [
        (lambda m, v, b: search_jackpot(m, b, sparsity=0.5, epochs=1),
         r'^variables: a flax.linen model needs its pre-trained variables'),
        (lambda m, v, b: search_jackpot(m, {'Dense_9': v['params']['Dense_0']}, b, sparsity=0.5,
                                        epochs=1),
         r"^variables: expected the pre-trained variables .* keys \['Dense_9'\]"),
        (lambda m, v, b: search_jackpot(m, v, [(y, x) for x, y in b], sparsity=0.5, epochs=1),
         r'^batches: batch 0: the labels are a tuple; .*are x and y swapped'),
        (lambda m, v, b: search_jackpot(m, v, b, sparsity=0.5, epochs=1, output='scores'),
         r"^output: 'scores' is not among the model's outputs \(keys \['features', 'logits'\]\)"),
    ],
)  # fmt: skip
def test_wrong_calls_name_the_argument(call, message):
    model, v = two_inputs()
    with pytest.raises(ValueError, match=message):
        call(model, v, two_input_batches())


class Flat(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1).astype(jnp.float32))))


def test_swapped_x_and_y_are_named():
    model = Flat()
    v = model.init(jax.random.key(0), np.zeros((1, 5), np.float32))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=8).astype(np.int32)
    with pytest.raises(ValueError, match=r'are x and y swapped\? batches are \(x, y\)'):
        search_jackpot(model, v, [(y, x)], sparsity=0.5, epochs=1, progress=False)


def test_uint8_images_get_a_warning():
    model = Flat()
    v = model.init(jax.random.key(0), np.zeros((1, 5), np.float32))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(8, 5)).astype(np.uint8)
    y = rng.integers(0, 3, size=8).astype(np.int32)
    with pytest.warns(UserWarning, match='uint8'):
        search_jackpot(model, v, [(x, y)], sparsity=0.5, epochs=1, progress=False)
