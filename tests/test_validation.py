"""ljax.config.validate, a sparsity that empties a layer, and main.py's --help built from the same FIELDS table."""

import os
import subprocess
import sys

import pytest

from ljax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_values(**values):
    c = config_lib.base()
    c.model_kwargs.hidden = (8,)
    for k, v in values.items():
        c[k] = v
    return c


def test_the_defaults_are_valid():
    config_lib.validate(config_lib.base())


@pytest.mark.parametrize(
    'field, value',
    [
        ('mode', 'serch'),
        ('lr', -1.0),
        ('lr', 0.0),
        ('pretrain_lr', 0.0),
        ('momentum', 1.0),
        ('momentum', -0.1),
        ('weight_decay', -1e-4),
        ('score_margin', -1.0),
        ('score_margin', 1.0),
        ('sparsity', 1.0),
        ('sparsity', -0.1),
        ('epochs', 0),
        ('pretrain_epochs', 0),
        ('batch_size', 0),
        ('eval_batch_size', -8),
        ('train_examples', -5),
        ('eval_examples', 0),
        ('checkpoint_every_steps', 0),
        ('log_every_steps', 0),
        ('max_to_keep', 0),
        ('restriction', 'cosin'),
        ('restriction', 'constant:1.5'),
        ('restriction', 'constant:abc'),
        ('score_init', 'zeros'),
        ('allocation', 'layerwise'),
        ('dataset', 'mnist'),
        ('model', 'resnet18'),
    ],
)
def test_each_bad_value_is_named(field, value):
    with pytest.raises(ValueError) as e:
        config_lib.validate(with_values(**{field: value}))
    message = str(e.value)
    assert message.startswith(f'config: {field}: expected') and repr(value) in message
    assert '\n' not in message


def test_every_problem_is_listed_at_once_in_field_order():
    c = with_values(lr=-1.0, max_to_keep=0, log_every_steps=0, sparsity=1.5)
    with pytest.raises(ValueError) as e:
        config_lib.validate(c)
    names = [p.split(':')[0] for p in str(e.value)[len('config: '):].split('; ')]
    assert names == ['sparsity', 'lr', 'log_every_steps', 'max_to_keep']


def test_types_are_checked_for_values_a_config_file_sets():
    import ml_collections

    d = config_lib.base().to_dict()
    d.update(epochs=2.5, progress='yes', seed=True, lr=float('nan'))
    with pytest.raises(ValueError) as e:
        config_lib.validate(ml_collections.ConfigDict(d))
    for name in ('epochs', 'progress', 'seed', 'lr'):
        assert f'{name}: expected' in str(e.value)


def test_restriction_values_that_are_accepted():
    for r in ('none', 'cosine', 'poly4', 'linear', 'constant:0', 'constant:0.5', 'constant:1'):
        config_lib.validate(with_values(restriction=r))


def test_a_sparsity_that_empties_a_layer_names_it():
    from ljax import search_jackpot
    from tests.test_search import Net, data, pretrained

    with pytest.raises(ValueError, match=r'sparsity: 0\.999 keeps no weight in 1 layer\(s\) \(Dense_1/kernel'):
        search_jackpot(Net(), pretrained(), data(1), sparsity=0.999, epochs=1, progress=False)


def test_every_field_has_a_one_line_help():
    assert set(config_lib.FIELD_HELP) == set(config_lib.base().keys())
    for name, text in config_lib.FIELD_HELP.items():
        assert text.strip() and '\n' not in text, name


def test_main_help_lists_the_modes_and_every_field():
    proc = subprocess.run(
        [sys.executable, 'main.py', '--help'], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for mode in config_lib.MODES:
        assert f'\n  {mode} ' in proc.stdout
    for name, text in config_lib.FIELD_HELP.items():
        assert f'--config.{name} ' in proc.stdout and text in proc.stdout


def test_main_help_with_a_config_file_shows_that_files_values():
    proc = subprocess.run(
        [sys.executable, 'main.py', '--config', 'configs/fashion_mnist.py', '--help'],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    epochs = next(line for line in proc.stdout.splitlines() if '--config.epochs ' in line)
    # configs/fashion_mnist.py searches 10 epochs where the base default is 30
    assert epochs.endswith('[in configs/fashion_mnist.py 10]'), epochs
    assert config_lib.base().epochs == 30
