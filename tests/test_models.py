"""Models: exact parameter counts, output shapes, BatchNorm train/eval behaviour, get_model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ljax.models import MLP, MODEL_NAMES, ResNet50, ResNetCifar, VGG19Cifar, get_model
from ljax.models.resnet_cifar import option_a_shortcut


def _abstract_variables(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize(
    'name, num_classes, kwargs, shape, expected',
    [
        # The authors' VGG-19: "20.04M" params on CIFAR-10.
        ('vgg19_cifar', 10, {}, (1, 32, 32, 3), 20_035_018),
        ('vgg19_cifar', 100, {}, (1, 32, 32, 3), 20_081_188),
        # He et al.'s ResNet-32 (0.46M) and the authors' 32/64/128 variant (1.85M).
        ('resnet32_cifar', 10, {}, (1, 32, 32, 3), 464_154),
        ('resnet32_cifar', 10, {'widths': (32, 64, 128)}, (1, 32, 32, 3), 1_849_898),
        ('resnet32_cifar', 100, {'widths': (32, 64, 128)}, (1, 32, 32, 3), 1_861_508),
        # torchvision's resnet50().
        ('resnet50', 1000, {}, (1, 224, 224, 3), 25_557_032),
        # 784*768+768 + 2*768 (BN) + 768*768+768 + 2*768 + 768*10+10
        ('mlp', 10, {}, (1, 28, 28, 1), 1_204_234),
    ],
)
def test_param_count(name, num_classes, kwargs, shape, expected):
    variables = _abstract_variables(get_model(name, num_classes, **kwargs), shape)
    assert _count(variables['params']) == expected


def test_resnet50_batch_stats_count():
    variables = _abstract_variables(ResNet50(), (1, 224, 224, 3))
    # 53 BN layers; torchvision's running_mean + running_var buffers.
    assert _count(variables['batch_stats']) == 53_120


@pytest.mark.parametrize(
    'model, shape, path',
    [
        (VGG19Cifar(), (2, 32, 32, 3), [('conv1_1', (3, 3, 3, 64)), ('classifier', (512, 10))]),
        (ResNetCifar(), (2, 32, 32, 3), [('conv1', (3, 3, 3, 16)), ('fc', (64, 10))]),
        (ResNet50(), (2, 224, 224, 3), [('conv1', (7, 7, 3, 64)), ('fc', (2048, 1000))]),
        (MLP(), (2, 28, 28, 1), [('dense1', (784, 768)), ('classifier', (768, 10))]),
    ],
)
def test_first_and_last_kernel_names(model, shape, path):
    params = _abstract_variables(model, shape)['params']
    for name, kernel_shape in path:
        assert params[name]['kernel'].shape == kernel_shape


def test_resnet50_block_names():
    params = _abstract_variables(ResNet50(), (1, 64, 64, 3))['params']
    assert params['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)
    assert params['layer2_0']['downsample_conv']['kernel'].shape == (1, 1, 256, 512)
    assert 'downsample_conv' not in params['layer2_1']
    assert sorted(k for k in params if k.startswith('layer4')) == [
        'layer4_0',
        'layer4_1',
        'layer4_2',
    ]


@pytest.mark.parametrize(
    'model, shape',
    [
        (VGG19Cifar(num_classes=7), (3, 32, 32, 3)),
        (ResNetCifar(widths=(8, 16, 32), num_classes=7), (3, 32, 32, 3)),
        (MLP(hidden=(16, 8), num_classes=7), (3, 28, 28, 1)),
    ],
)
def test_output_shape_and_dtype(model, shape):
    x = jnp.ones(shape, jnp.float32)
    init_and_apply = jax.jit(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0])
    logits = init_and_apply(x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_resnet50_output_shape_small_input():
    model = ResNet50(num_classes=5)
    out = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)[0]
    )
    assert out.shape == (2, 5) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    'model, shape',
    [
        (ResNetCifar(widths=(4, 8, 8), depth=8), (4, 16, 16, 3)),
        (MLP(hidden=(16,)), (4, 28, 28, 1)),
    ],
)
def test_batch_stats_update_only_in_train(model, shape):
    x = jax.random.normal(jax.random.key(1), shape) * 3.0 + 1.0
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    apply = jax.jit(
        lambda v, x, train: model.apply(v, x, train=train, mutable=['batch_stats']),
        static_argnames='train',
    )
    _, updated = apply(variables, x, train=True)
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'], updated['batch_stats']
    )
    assert all(jax.tree_util.tree_leaves(changed))
    _, same = apply(variables, x, train=False)
    unchanged = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.all(a == b)), variables['batch_stats'], same['batch_stats']
    )
    assert all(jax.tree_util.tree_leaves(unchanged))


def test_batch_norm_momentum_is_pytorch_default():
    model = MLP(hidden=(3,), num_classes=2)
    x = jax.random.normal(jax.random.key(1), (8, 5))
    variables = model.init(jax.random.key(0), x, train=False)
    _, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    h = x @ variables['params']['dense1']['kernel'] + variables['params']['dense1']['bias']
    # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch (running mean starts at 0).
    np.testing.assert_allclose(
        updated['batch_stats']['bn1']['mean'], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6
    )


def test_option_a_shortcut_matches_reference():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    out = np.asarray(option_a_shortcut(jnp.asarray(x), 8, 2))
    # PyTorch: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, (8-3)//2, 8-3-(8-3)//2)) in NCHW.
    expected = np.zeros((2, 2, 2, 8), np.float32)
    expected[..., 2:5] = x[:, ::2, ::2, :]
    np.testing.assert_array_equal(out, expected)


def test_resnet_cifar_rejects_bad_depth():
    with pytest.raises(ValueError, match='6n\\+2'):
        ResNetCifar(depth=33).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


def test_get_model_kwargs():
    assert get_model('resnet32_cifar', 100, widths=[32, 64, 128]).widths == (32, 64, 128)
    assert get_model('mlp', 10, hidden=[5]).hidden == (5,)
    assert get_model('vgg19_cifar', 10, bn_axis_name='batch').bn_axis_name == 'batch'


def test_get_model_unknown_name_lists_known():
    with pytest.raises(ValueError) as info:
        get_model('resnet18', 10)
    for name in MODEL_NAMES:
        assert name in str(info.value)
