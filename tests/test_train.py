"""The main job in-process on TFDS mock data: a CIFAR config started from an authors'-format
PyTorch checkpoint (converted on the fly and cached), then the jackpot exported back to PyTorch."""

import json
import os

import jax
import numpy as np
import pytest

from ljax import convert, data, train
from ljax.models import get_model

torch = pytest.importorskip('torch')
pytestmark = pytest.mark.slow  # about a minute: ResNet-32 compiles for 4 devices


@pytest.fixture
def authors_checkpoint(tmp_path):
    """A random ResNet-32 saved as the authors save theirs: {'state_dict': {'module.' + key: tensor}}."""
    model = get_model('resnet32_cifar', 10, widths=(16, 32, 64))
    v = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
    state = convert.to_torch(jax.device_get(v), 'resnet32_cifar', classifier_as_conv=True)
    path = tmp_path / 'resnet32_cifar10.pt'
    torch.save(
        {
            'state_dict': {'module.' + k: torch.from_numpy(np.array(a)) for k, a in state.items()},
            'epoch': 160,
        },
        path,
    )
    return path


@pytest.fixture
def mock_cifar(monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(data, '_network_available', lambda url: True)
    with tfds.testing.mock_data(num_examples=64):
        yield


def cifar_config(pretrained):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        'cfg', os.path.join(os.path.dirname(__file__), '..', 'configs', 'resnet32_cifar10.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.pretrained = str(pretrained)
    c.epochs, c.batch_size, c.eval_batch_size = 1, 16, 16
    c.train_examples, c.eval_examples = 64, 32
    c.progress = False
    return c


def test_cifar_search_from_a_pytorch_checkpoint_and_export_back(
    authors_checkpoint, mock_cifar, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv('LJAX_CACHE', str(tmp_path / 'cache'))
    workdir = str(tmp_path / 'run')
    results = train.run(cifar_config(authors_checkpoint), workdir)
    assert 'converted' in capsys.readouterr().out
    assert len(os.listdir(tmp_path / 'cache')) == 1  # the converted copy
    assert results['sparsity'] == pytest.approx(0.9, abs=1e-6)
    assert results['steps'] == 4
    with open(os.path.join(workdir, 'results.json')) as f:
        assert json.load(f)['model'] == 'resnet32_cifar'

    # the second use of the same .pt reads the cache, and evaluate mode re-scores the jackpot
    c = cifar_config(authors_checkpoint)
    c.mode = 'evaluate'
    out = train.run(c, workdir)
    assert 'converted' not in capsys.readouterr().out
    assert out['accuracy'] == pytest.approx(results['jackpot_accuracy'])

    # export the jackpot to PyTorch (safetensors needs no torch; .pth through torch.save)
    jackpot = os.path.join(workdir, 'jackpot.npz')
    for suffix in ('.safetensors', '.pth'):
        dst = str(tmp_path / f'jackpot{suffix}')
        assert convert.main([jackpot, dst, '--arch', 'resnet32_cifar']) == 0
        state = convert.load_state_dict(dst)
        saved = convert.load_variables_npz(jackpot)
        zeros = sum(
            int(np.sum(state[k] == 0))
            for k in state
            if k.endswith('conv1.weight') or k.endswith('conv2.weight')
        )
        pruned = sum(int(np.sum(~m)) for m in jax.tree.leaves(saved['mask']))
        assert zeros >= pruned  # every pruned position is an exact zero in the export
        np.testing.assert_array_equal(
            state['fc.weight'].reshape(10, -1), saved['params']['fc']['kernel'].T
        )
