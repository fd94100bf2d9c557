import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from ljax import config as config_lib, data
from ljax.models import get_model

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs', '*.py')))
PAPER = {  # the paper's hyper-parameter table
    'resnet50': dict(
        sparsity=0.9, epochs=30, batch_size=256, lr=0.1, weight_decay=1e-4, dataset='imagenet2012'
    ),
    'vgg19_cifar10': dict(
        sparsity=0.9, epochs=30, batch_size=256, lr=0.1, weight_decay=5e-4, dataset='cifar10'
    ),
    'vgg19_cifar100': dict(
        sparsity=0.9, epochs=30, batch_size=256, lr=0.1, weight_decay=5e-4, dataset='cifar100'
    ),
    'resnet32_cifar10': dict(
        sparsity=0.9, epochs=30, batch_size=256, lr=0.1, weight_decay=5e-4, dataset='cifar10'
    ),
    'resnet32_cifar100': dict(
        sparsity=0.9, epochs=30, batch_size=256, lr=0.1, weight_decay=5e-4, dataset='cifar100'
    ),
}


def load(path):
    spec = importlib.util.spec_from_file_location('config_under_test', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_every_config_is_listed():
    names = {os.path.splitext(os.path.basename(p))[0] for p in CONFIGS}
    assert names == set(PAPER) | {'fashion_mnist', 'minilm_wordnet'}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_builds_its_model_for_its_data(path):
    c = load(path)
    assert set(c.keys()) == set(config_lib.base().keys())  # no field outside ljax/config.py
    for field, value in PAPER.get(os.path.splitext(os.path.basename(path))[0], {}).items():
        assert c[field] == value, field
    if c.model in config_lib.TEXT_MODELS:  # a pre-trained sentence encoder: token ids in
        assert c.dataset == config_lib.TEXT_MODELS[c.model]
        model = get_model(c.model, c.num_classes, path=c.pretrained or None)
        out = jax.eval_shape(lambda: model(np.zeros((2, c.max_seq_length), np.int32)))
        assert out.shape == (2, 384)
        return
    info = data.dataset_info(c.dataset, image_size=c.image_size)
    assert info['num_classes'] == c.num_classes
    model = get_model(c.model, c.num_classes, **dict(c.model_kwargs))
    x = np.zeros((1,) + tuple(info['image_shape']), np.float32)
    logits = jax.eval_shape(
        lambda: model.apply(model.init(jax.random.key(0), x, train=False), x, train=False)
    )
    assert logits.shape == (1, c.num_classes)


def test_shipped_default_model_fits_its_config():
    from ljax import convert
    from ljax.search import check_variables

    c = load(os.path.join(os.path.dirname(__file__), '..', 'configs', 'fashion_mnist.py'))
    assert os.path.getsize(c.pretrained) <= 5 * 2**20
    check_variables(
        get_model(c.model, 10, **dict(c.model_kwargs)),
        convert.load_variables_npz(c.pretrained),
        np.zeros((1, 28, 28, 1), np.float32),
    )


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_passes_validation(path):
    config_lib.validate(load(path))
