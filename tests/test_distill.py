"""Label-free search (teacher='dense'): the mask learns to reproduce the frozen dense model."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from ljax import search_jackpot
from ljax.search import Search, SearchOptions


class Classifier(nn.Module):
    """MLP without BatchNorm or dropout: at sparsity 0 the student is the teacher exactly."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(6)(x)


class Embedder(nnx.Module):
    """An embedding model: its last kernel feeds the output, and there is no classifier."""

    def __init__(self, rngs):
        self.a = nnx.Linear(16, 48, rngs=rngs)
        self.b = nnx.Linear(48, 24, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.gelu(self.a(x)))


class Layered(nnx.Module):
    """An embedding model that also returns its hidden states: (embedding, (h1, h2))."""

    def __init__(self, rngs):
        self.a = nnx.Linear(16, 48, rngs=rngs)
        self.b = nnx.Linear(48, 32, rngs=rngs)
        self.c = nnx.Linear(32, 24, rngs=rngs)

    def __call__(self, x):
        h1 = nnx.gelu(self.a(x))
        h2 = nnx.gelu(self.b(h1))
        return self.c(h2), (h1, h2)


def inputs(n_batches=6, batch=32, features=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, features)).astype(np.float32) for _ in range(n_batches)]


def classifier():
    model = Classifier()
    return model, jax.tree.map(np.asarray, model.init(jax.random.key(0), np.zeros((1, 16))))


def test_kl_loss_is_the_tempered_kl_divergence_to_the_dense_logits():
    model, v = classifier()
    x = inputs(1)[0]
    t = 2.5
    search = Search.create(
        model, v, x[:1], sparsity=0.5, total_steps=1,
        options=SearchOptions(teacher='dense', temperature=t),
    )  # fmt: skip
    rng = np.random.default_rng(1)
    out, teacher = rng.normal(size=(2, 8, 6)).astype(np.float32) * 3
    loss, agree = search.losses(out, None, teacher)
    p = np.exp(teacher / t) / np.exp(teacher / t).sum(-1, keepdims=True)
    q = np.exp(out / t) / np.exp(out / t).sum(-1, keepdims=True)
    want = t * t * np.sum(p * (np.log(p) - np.log(q)), -1)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(agree, out.argmax(-1) == teacher.argmax(-1))


def test_cosine_loss_is_one_minus_the_cosine():
    search = Search.create(
        Embedder(nnx.Rngs(0)), None, inputs(1)[0][:1], sparsity=0.5, total_steps=1,
        options=SearchOptions(teacher='dense', distill='cosine'),
    )  # fmt: skip
    rng = np.random.default_rng(2)
    out, teacher = rng.normal(size=(2, 5, 3, 7)).astype(np.float32)
    loss, cos = search.losses(out, None, teacher)
    c = (out * teacher).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(teacher, axis=-1)
    np.testing.assert_allclose(cos, c.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(loss, 1 - c.mean(-1), rtol=1e-5, atol=1e-6)


def cos_rows(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_hidden_loss_averages_one_minus_cosine_over_the_output_and_every_hidden_state():
    search = Search.create(
        Layered(nnx.Rngs(0)), None, inputs(1)[0][:1], sparsity=0.5, total_steps=1,
        options=SearchOptions(teacher='dense', distill='hidden'),
    )  # fmt: skip
    assert search.num_classes == 24  # the final output's width, not a hidden state's
    rng = np.random.default_rng(3)
    shapes = [(5, 7), (5, 4, 9), (5, 3)]
    out = tuple(rng.normal(size=s).astype(np.float32) for s in shapes)
    teacher = tuple(rng.normal(size=s).astype(np.float32) for s in shapes)
    loss, cos = search.losses((out[0], out[1:]), None, (teacher[0], teacher[1:]))
    per = [cos_rows(a, b).reshape(5, -1).mean(-1) for a, b in zip(out, teacher)]
    np.testing.assert_allclose(cos, per[0], rtol=1e-5)
    np.testing.assert_allclose(loss, 1 - sum(per) / 3, rtol=1e-5, atol=1e-6)


def test_hidden_distillation_matches_hidden_states_and_scores_the_embedding():
    model = Layered(nnx.Rngs(0))
    batches = inputs(6)
    held_out = np.concatenate(inputs(2, seed=5))
    dense, (dense_h1, dense_h2) = jax.tree.map(np.asarray, model(held_out))

    def mean_cos(m):
        emb, (h1, h2) = m(held_out)
        return [float(np.mean(cos_rows(np.asarray(a), b)))
                for a, b in ((emb, dense), (h1, dense_h1), (h2, dense_h2))]

    kw = dict(sparsity=0.7, epochs=5, teacher='dense', lr=0.5, progress=False,
              eval_batches=[(held_out, np.zeros(len(held_out), np.int32))])
    hidden = search_jackpot(model, batches, distill='hidden', **kw)
    assert set(hidden.kept_per_layer) == {'a/kernel', 'b/kernel', 'c/kernel'}
    search = Search.create(
        model, None, batches[0][:1], sparsity=0.7, total_steps=1,
        options=SearchOptions(teacher='dense', distill='hidden'),
    )  # fmt: skip
    one_shot = mean_cos(search.fn.rebuild(search.jackpot_variables(search.magnitude, None)))
    got = mean_cos(hidden.model)
    assert np.mean(got) > np.mean(one_shot) + 0.02 and got[0] > one_shot[0], (got, one_shot)
    # matching the output alone leaves the hidden states further from the dense ones
    final_only = mean_cos(search_jackpot(model, batches, distill='cosine', output=0, **kw).model)
    assert np.mean(got[1:]) > np.mean(final_only[1:]) + 0.005, (got, final_only)
    # evaluation scores the cosine of the final output (the embedding) to the dense one
    assert hidden.history[-1]['eval_accuracy'] == pytest.approx(got[0], abs=1e-4)


def test_hidden_distillation_needs_hidden_states_in_the_output():
    with pytest.raises(ValueError, match="distill: 'hidden' matches hidden states"):
        search_jackpot(Embedder(nnx.Rngs(0)), inputs(1), sparsity=0.5, epochs=1,
                       teacher='dense', distill='hidden', progress=False)


def test_at_sparsity_zero_the_student_is_the_teacher():
    model, v = classifier()
    jp = search_jackpot(
        model, v, inputs(), sparsity=0.0, epochs=1, teacher='dense', temperature=2.0,
        progress=False,
    )  # fmt: skip
    assert jp.history[0]['loss'] == pytest.approx(0.0, abs=1e-6)
    assert jp.history[0]['accuracy'] == 1.0


def test_distillation_without_labels_moves_the_pruned_model_toward_the_dense_one():
    model, v = classifier()
    batches = inputs(8)  # x alone: no labels anywhere
    held_out = np.concatenate(inputs(4, seed=9))
    dense = np.asarray(model.apply(v, held_out)).argmax(-1)

    def agreement(variables):
        return np.mean(np.asarray(model.apply(variables, held_out)).argmax(-1) == dense)

    jp = search_jackpot(
        model, v, batches, sparsity=0.8, epochs=6, teacher='dense', lr=0.5, progress=False
    )
    # the one-shot magnitude mask, where the search starts
    search = Search.create(model, v, batches[0][:1], sparsity=0.8, total_steps=1)
    magnitude = search.jackpot_variables(search.magnitude, None)
    assert jp.history[-1]['loss'] < jp.history[0]['loss']
    assert agreement(jp.variables) > agreement(magnitude) + 0.1
    # the classifier stays dense, as with labels
    assert jp.mask['Dense_2']['kernel'] is None


def test_cosine_distillation_prunes_every_kernel_of_an_embedding_model():
    model = Embedder(nnx.Rngs(0))
    batches = inputs(6)
    held_out = np.concatenate(inputs(2, seed=5))
    dense = np.asarray(model(held_out))

    def mean_cos(m):
        out = np.asarray(m(held_out))
        return np.mean(
            (out * dense).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(dense, axis=-1)
        )

    jp = search_jackpot(
        model, batches, sparsity=0.7, epochs=5, teacher='dense', distill='cosine', lr=0.5,
        eval_batches=[(held_out, np.zeros(len(held_out), np.int32))], progress=False,
    )  # fmt: skip
    assert set(jp.kept_per_layer) == {'a/kernel', 'b/kernel'}
    assert jp.sparsity == pytest.approx(0.7, abs=1e-3)
    search = Search.create(
        model, None, batches[0][:1], sparsity=0.7, total_steps=1,
        options=SearchOptions(teacher='dense', distill='cosine'),
    )  # fmt: skip
    one_shot = search.fn.rebuild(search.jackpot_variables(search.magnitude, None))
    assert mean_cos(jp.model) > mean_cos(one_shot) + 0.01
    # evaluation scores the mean cosine to the dense outputs, not labels
    assert jp.history[-1]['eval_accuracy'] == pytest.approx(mean_cos(jp.model), abs=1e-4)


@pytest.mark.parametrize(
    'options, message',
    [
        ({'teacher': 'dense', 'loss': optax.softmax_cross_entropy_with_integer_labels}, 'loss:'),
        ({'teacher': 'student'}, r"teacher: expected None \(labels\) or 'dense'"),
        ({'teacher': 'dense', 'distill': 'mse'}, 'distill: expected one of'),
        ({'teacher': 'dense', 'temperature': 0.0}, 'temperature: expected a finite number > 0'),
    ],
)
def test_bad_distillation_options_name_the_option(options, message):
    model, v = classifier()
    with pytest.raises(ValueError, match=message):
        search_jackpot(model, v, inputs(1), sparsity=0.5, epochs=1, progress=False, **options)


def test_without_a_teacher_batches_must_hold_labels():
    model, v = classifier()
    with pytest.raises(ValueError, match='batches: batch 0 is a ndarray'):
        search_jackpot(model, v, inputs(1), sparsity=0.5, epochs=1, progress=False)
