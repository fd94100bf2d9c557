"""PyTorch <-> ljax conversion: logit parity with reference torch models, round trips, errors, CLI.

The torch models are written here with torch.nn (torchvision's ResNet-50 layout, the authors'
VGG-19 and ResNet-32 layouts with 1x1-conv classifiers), so no torchvision is needed.
"""

import argparse
import copy
import functools
import hashlib
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file as save_safetensors

from ljax.convert import (
    download_pretrained,
    from_torch,
    infer_model_config,
    load_state_dict,
    load_variables_npz,
    save_variables_npz,
    to_torch,
)
from ljax.models import get_model

REPO = Path(__file__).resolve().parents[1]
SMALL_CIFAR = {'num_classes': 10, 'widths': (8, 16, 32)}


def _tree_equal(a, b):
    leaves = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    )
    same_structure = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return same_structure and all(leaves)


def _random_variables(arch, seed=0, **config):
    """ljax variables (numpy float32) with random weights and BN statistics; no compilation."""
    model = get_model(arch, **config)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: rng.uniform(0.1, 1.0, x.shape).astype(np.float32), abstract
    )


# ----------------------------------------------------------------------------- torch models


def _torch_modules():
    """Reference PyTorch models, defined only when torch is installed."""
    torch = pytest.importorskip('torch')
    nn, F = torch.nn, torch.nn.functional

    class Bottleneck(nn.Module):  # torchvision v1.5
        def __init__(self, inplanes, width, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(width * 4)
            self.downsample = None
            if stride != 1 or inplanes != width * 4:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4)
                )

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return F.relu(out + (x if self.downsample is None else self.downsample(x)))

    class TorchResNet50(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inplanes = 64
            for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), 1):
                layers = []
                for block in range(blocks):
                    layers.append(Bottleneck(inplanes, width, 2 if stage > 1 and block == 0 else 1))
                    inplanes = width * 4
                setattr(self, f'layer{stage}', nn.Sequential(*layers))
            self.fc = nn.Linear(2048, num_classes)

        def forward(self, x):
            x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(x.mean((2, 3)))

    class TorchVGG19Cifar(nn.Module):  # the authors' models/vgg_cifar.py
        def __init__(self, num_classes):
            super().__init__()
            cfg = [
                64,
                64,
                'M',
                128,
                128,
                'M',
                256,
                256,
                256,
                256,
                'M',
                512,
                512,
                512,
                512,
                'M',
                512,
                512,
                512,
                512,
                'M',
            ]
            layers, in_channels = [], 3
            for item in cfg:
                if item == 'M':
                    layers.append(nn.MaxPool2d(2, 2))
                else:
                    layers += [
                        nn.Conv2d(in_channels, item, 3, 1, 1, bias=False),
                        nn.BatchNorm2d(item),
                        nn.ReLU(inplace=True),
                    ]
                    in_channels = item
            layers.append(nn.AvgPool2d(1, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Conv2d(512, num_classes, 1, bias=True)

        def forward(self, x):
            return self.classifier(self.features(x)).flatten(1)

    class BasicBlock(nn.Module):  # the authors' ResBasicBlock, option-A shortcut
        def __init__(self, inplanes, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.stride = stride
            self.pad = ((planes - inplanes) // 2, planes - inplanes - (planes - inplanes) // 2)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x
            if self.stride != 1 or self.pad != (0, 0):
                shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, *self.pad))
            return F.relu(out + shortcut)

    class TorchResNet32Cifar(nn.Module):  # the authors' models/resnet_cifar.py, widths as option
        def __init__(self, num_classes, widths):
            super().__init__()
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            inplanes = widths[0]
            for stage, width in enumerate(widths, 1):
                blocks = []
                for block in range(5):
                    blocks.append(BasicBlock(inplanes, width, 2 if stage > 1 and block == 0 else 1))
                    inplanes = width
                setattr(self, f'layer{stage}', nn.Sequential(*blocks))
            self.fc = nn.Conv2d(widths[2], num_classes, 1, bias=True)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(F.adaptive_avg_pool2d(x, 1)).flatten(1)

    return torch, {
        'resnet50': lambda: TorchResNet50(10),
        'vgg19_cifar': lambda: TorchVGG19Cifar(10),
        'resnet32_cifar': lambda: TorchResNet32Cifar(100, (32, 64, 128)),
    }


def _randomise(torch, model, seed, image_size):
    """Random weights and BN affine parameters; running statistics measured on random images
    (so activations stay O(1) through deep nets) and then perturbed away from them."""
    generator = torch.Generator().manual_seed(seed)
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                scale = (2 / module.weight[0].numel()) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * scale)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
        for module in batch_norms:
            n = module.num_features
            module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            module.momentum = None  # cumulative average over the calibration batches
        # Logits of order 1: float32 forward passes of ResNet-50 in torch and in XLA each drift
        # about 2e-5 relative from the float64 result, so logits of order 10 would differ by
        # more than the 1e-4 tolerance for reasons that have nothing to do with the conversion
        # (test_conversion_is_exact_in_float64 checks the conversion itself to 1e-9).
        classifier = model.fc if hasattr(model, 'fc') else model.classifier
        classifier.weight.mul_(0.25)
        classifier.bias.mul_(0.1)
        model.train()
        for _ in range(2):
            model(torch.randn((8, 3, image_size, image_size), generator=generator))
        for module in batch_norms:
            n = module.num_features
            module.running_mean.add_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.mul_(torch.rand(n, generator=generator) * 0.5 + 0.75)
            module.momentum = 0.1
    return model.eval()


IMAGE_SIZE = {'resnet50': 64, 'vgg19_cifar': 32, 'resnet32_cifar': 32}


@pytest.fixture(scope='module', params=['resnet50', 'vgg19_cifar', 'resnet32_cifar'])
def torch_case(request, tmp_path_factory):
    """A random torch model saved three ways, its conversion, inputs and a jitted ljax forward."""
    torch, builders = _torch_modules()
    arch = request.param
    model = _randomise(torch, builders[arch](), seed=len(arch), image_size=IMAGE_SIZE[arch])
    state = model.state_dict()
    folder = tmp_path_factory.mktemp(arch)
    arrays = {k: v.numpy() for k, v in state.items()}
    if arch == 'resnet50':
        torch.save(state, folder / 'model.pth')
    else:
        # The authors' files: {'state_dict': ...}, DataParallel prefix, search-state extras.
        wrapped = {f'module.{k}': v for k, v in state.items()}
        for key, value in state.items():
            if key.endswith('.weight') and value.ndim == 4:
                wrapped[f'module.{key[: -len("weight")]}mask'] = torch.rand_like(value)
                wrapped[f'module.{key[: -len("weight")]}b_mask'] = torch.ones_like(value)
        torch.save({'state_dict': wrapped, 'epoch': 3}, folder / 'model.pth')
    save_safetensors(arrays, str(folder / 'model.safetensors'))
    np.savez(folder / 'model.npz', **arrays)

    size = IMAGE_SIZE[arch]
    images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    variables = from_torch(folder / 'model.pth', arch)
    flax_model = get_model(arch, **infer_model_config(variables, arch))
    apply = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))
    return {
        'arch': arch,
        'torch': torch,
        'model': model,
        'folder': folder,
        'images': images,
        'variables': variables,
        'apply': apply,
    }


def _torch_logits(case):
    torch = case['torch']
    with torch.no_grad():
        return case['model'](torch.from_numpy(case['images'].transpose(0, 3, 1, 2))).numpy()


def test_all_formats_convert_identically(torch_case):
    reference = torch_case['variables']
    for name in ('model.safetensors', 'model.npz'):
        assert _tree_equal(from_torch(torch_case['folder'] / name, torch_case['arch']), reference)
    in_memory = from_torch(torch_case['model'].state_dict(), torch_case['arch'])
    assert _tree_equal(in_memory, reference)


def test_structure_matches_init_and_is_float32_numpy(torch_case):
    variables = torch_case['variables']
    arch = torch_case['arch']
    model = get_model(arch, **infer_model_config(variables, arch))
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(variables)
    for ref, leaf in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(variables)):
        assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32 and leaf.shape == ref.shape


def test_logits_match_torch(torch_case):
    expected = _torch_logits(torch_case)
    logits = np.asarray(torch_case['apply'](torch_case['variables'], torch_case['images']))
    assert expected.std() > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_conversion_is_exact_in_float64(torch_case):
    torch = torch_case['torch']
    model64 = copy.deepcopy(torch_case['model']).double()
    with torch.no_grad():
        expected = model64(
            torch.from_numpy(torch_case['images'].transpose(0, 3, 1, 2)).double()
        ).numpy()
    with jax.enable_x64(True):
        variables64 = jax.tree_util.tree_map(
            lambda x: x.astype(np.float64), torch_case['variables']
        )
        logits = np.asarray(
            torch_case['apply'](variables64, torch_case['images'].astype(np.float64))
        )
    assert logits.dtype == np.float64
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-9)


def test_masked_round_trip_loads_strict_and_matches(torch_case):
    torch, arch, variables = torch_case['torch'], torch_case['arch'], torch_case['variables']
    rng = np.random.default_rng(1)
    flat_params = flatten_dict(variables['params'])
    # Every conv kernel, including the authors' 1x1-conv classifiers (any kernel may be masked).
    flat_mask = {path: rng.random(w.shape) < 0.5 for path, w in flat_params.items() if w.ndim == 4}
    state = to_torch(variables, arch, mask=unflatten_dict(flat_mask))
    model = _torch_modules()[1][arch]()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    model.eval()

    masked = unflatten_dict(
        {
            path: np.where(flat_mask[path], w, 0) if path in flat_mask else w
            for path, w in flat_params.items()
        }
    )
    with torch.no_grad():
        expected = model(torch.from_numpy(torch_case['images'].transpose(0, 3, 1, 2))).numpy()
    # What torch holds is exactly the masked weights: pruned positions are exact zeros.
    reference = to_torch({'params': masked, 'batch_stats': variables['batch_stats']}, arch)
    loaded = {k: v.numpy() for k, v in model.state_dict().items()}
    assert loaded.keys() == state.keys() == reference.keys()
    for key in state:
        assert np.array_equal(loaded[key], state[key]) and np.array_equal(
            state[key], reference[key]
        ), key
    pruned = sum(int(np.count_nonzero(~m)) for m in flat_mask.values())
    zeros = sum(int(np.count_nonzero(v == 0)) for k, v in loaded.items() if v.ndim == 4)
    assert pruned > 0 and zeros >= pruned
    logits = np.asarray(
        torch_case['apply'](
            {'params': masked, 'batch_stats': variables['batch_stats']}, torch_case['images']
        )
    )
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- without torch


@pytest.fixture
def no_torch(monkeypatch):
    """Makes `import torch` fail, as on a machine without it."""
    monkeypatch.setitem(sys.modules, 'torch', None)


def test_safetensors_and_npz_round_trip_without_torch(no_torch, tmp_path):
    variables = _random_variables('resnet32_cifar', **SMALL_CIFAR)
    state = to_torch(variables, 'resnet32_cifar')
    assert state['fc.weight'].shape == (10, 32, 1, 1)
    assert state['layer2.0.bn1.num_batches_tracked'].dtype == np.int64
    save_safetensors({k: v for k, v in state.items()}, str(tmp_path / 'm.safetensors'))
    np.savez(tmp_path / 'm.npz', **state)
    for name in ('m.safetensors', 'm.npz'):
        back = from_torch(tmp_path / name, 'resnet32_cifar')
        assert _tree_equal(back, jax.tree_util.tree_map(np.asarray, variables))
    assert infer_model_config(back, 'resnet32_cifar') == SMALL_CIFAR


def test_pth_without_torch_says_what_to_install(no_torch, tmp_path):
    (tmp_path / 'm.pth').write_bytes(b'not really')
    with pytest.raises(ImportError, match='PyTorch'):
        from_torch(tmp_path / 'm.pth', 'resnet50')


def test_pth_is_loaded_with_weights_only(tmp_path):
    torch = pytest.importorskip('torch')
    state = {
        k: torch.from_numpy(v)
        for k, v in to_torch(
            _random_variables('resnet32_cifar', **SMALL_CIFAR), 'resnet32_cifar'
        ).items()
    }
    # An arbitrary pickled object, as in checkpoints that also store the run's argparse.Namespace.
    torch.save({'state_dict': state, 'args': argparse.Namespace(lr=0.1)}, tmp_path / 'm.pth')
    with pytest.raises(ValueError, match=r'weights_only=True.*argparse\.Namespace'):
        from_torch(tmp_path / 'm.pth', 'resnet32_cifar')
    torch.save({'state_dict': state, 'epoch': 30}, tmp_path / 'ok.pth')
    variables = from_torch(tmp_path / 'ok.pth', 'resnet32_cifar')
    assert infer_model_config(variables, 'resnet32_cifar') == SMALL_CIFAR


def test_linear_and_conv_classifier_layouts_both_load():
    variables = _random_variables('resnet32_cifar', **SMALL_CIFAR)
    as_conv = to_torch(variables, 'resnet32_cifar')
    as_linear = to_torch(variables, 'resnet32_cifar', classifier_as_conv=False)
    assert as_linear['fc.weight'].shape == (10, 32)
    assert _tree_equal(
        from_torch(as_conv, 'resnet32_cifar'), from_torch(as_linear, 'resnet32_cifar')
    )


def test_resnet50_writes_torchvision_keys():
    model = get_model('resnet50', 1000)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    variables = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32), abstract)
    state = to_torch(variables, 'resnet50')
    assert state['conv1.weight'].shape == (64, 3, 7, 7)
    assert state['layer1.0.downsample.0.weight'].shape == (256, 64, 1, 1)
    assert state['layer4.2.bn3.running_var'].shape == (2048,)
    assert state['fc.weight'].shape == (1000, 2048)
    # torchvision resnet50().state_dict(): 320 entries (161 params + 159 BN buffers).
    assert len(state) == 320


def test_vgg_keys_are_the_authors_feature_indices():
    variables = _random_variables('vgg19_cifar', num_classes=10)
    state = to_torch(variables, 'vgg19_cifar')
    conv_indices = sorted(
        int(k.split('.')[1])
        for k in state
        if k.endswith('.weight') and state[k].ndim == 4 and k.startswith('features')
    )
    assert conv_indices == [0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49]
    assert state['features.50.running_var'].shape == (512,)
    assert state['classifier.weight'].shape == (10, 512, 1, 1)


def test_authors_wrapping_and_extras_are_ignored():
    state = to_torch(_random_variables('resnet32_cifar', **SMALL_CIFAR), 'resnet32_cifar')
    wrapped = {f'module.{k}': v for k, v in state.items()}
    wrapped['module.conv1.mask'] = np.ones_like(state['conv1.weight'])
    wrapped['module.conv1.b_mask'] = np.ones_like(state['conv1.weight'])
    cleaned = load_state_dict({'state_dict': wrapped, 'best_prec1': np.float32(93.0)})
    assert 'conv1.mask' not in cleaned and 'conv1.weight' in cleaned
    assert not any(k.endswith('num_batches_tracked') for k in cleaned)
    unwrapped = from_torch({'state_dict': wrapped}, 'resnet32_cifar')
    assert _tree_equal(unwrapped, from_torch(state, 'resnet32_cifar'))


@pytest.mark.parametrize(
    'edit, expected',
    [
        (
            lambda s: s.pop('layer3.4.bn2.running_var'),
            r'1 missing: layer3\.4\.bn2\.running_var \(expected \(32,\)\)',
        ),
        (
            lambda s: s.update({'layer4.0.conv1.weight': np.zeros((3, 3), np.float32)}),
            r'1 unexpected: layer4\.0\.conv1\.weight \(found \(3, 3\)\)',
        ),
        (
            lambda s: s.update({'layer1.2.conv2.weight': np.zeros((8, 8, 5, 5), np.float32)}),
            r'layer1\.2\.conv2\.weight \(expected \(8, 8, 3, 3\), found \(8, 8, 5, 5\)',
        ),
        (
            lambda s: s.update(
                {'layer1.2.conv2.weight': s['layer1.2.conv2.weight'].astype(np.int32)}
            ),
            r'layer1\.2\.conv2\.weight .*int32',
        ),
    ],
    ids=['missing', 'unexpected', 'shape', 'dtype'],
)
def test_mismatch_raises_one_value_error(edit, expected):
    state = to_torch(_random_variables('resnet32_cifar', **SMALL_CIFAR), 'resnet32_cifar')
    edit(state)
    with pytest.raises(ValueError, match=expected):
        from_torch(state, 'resnet32_cifar')


def test_mismatch_message_lists_a_few_keys_for_the_wrong_arch():
    state = to_torch(_random_variables('resnet32_cifar', **SMALL_CIFAR), 'resnet32_cifar')
    with pytest.raises(ValueError) as info:
        from_torch(state, 'vgg19_cifar')
    message = str(info.value)
    assert '\n' not in message and 'more)' in message and 'features.0.weight' in message


def test_to_torch_checks_variables_and_mask():
    variables = _random_variables('resnet32_cifar', **SMALL_CIFAR)
    broken = jax.tree_util.tree_map(lambda x: x, variables)
    broken['params']['layer1_0']['conv1']['kernel'] = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(ValueError, match='params/layer1_0/conv1/kernel'):
        to_torch(broken, 'resnet32_cifar')
    with pytest.raises(ValueError, match='variables vs resnet50 .* does not match: .* missing'):
        to_torch(variables, 'resnet50')
    with pytest.raises(ValueError, match='not those of a vgg19_cifar'):
        to_torch(variables, 'vgg19_cifar')
    with pytest.raises(ValueError, match='mask vs params'):
        to_torch(variables, 'resnet32_cifar', mask={'conv1': {'kernel': np.ones((3, 3), bool)}})
    with pytest.raises(ValueError, match='unknown arch'):
        to_torch(variables, 'resnet18')


def test_to_torch_mask_zeros_are_exact_and_others_unchanged():
    variables = _random_variables('resnet32_cifar', **SMALL_CIFAR)
    kernel = variables['params']['conv1']['kernel']
    mask = np.random.default_rng(0).random(kernel.shape) < 0.3
    tree = {'params': {'conv1': {'kernel': mask}, 'fc': {'kernel': None}}}  # None: not masked
    state = to_torch(variables, 'resnet32_cifar', mask=tree)
    expected = np.where(mask, kernel, 0).transpose(3, 2, 0, 1)
    assert np.array_equal(state['conv1.weight'], expected)
    assert np.all(np.signbit(state['conv1.weight'][expected == 0]) == False)  # noqa: E712 (+0.0 only)
    assert np.array_equal(
        state['layer1.0.conv1.weight'],
        variables['params']['layer1_0']['conv1']['kernel'].transpose(3, 2, 0, 1),
    )


def test_variables_npz_round_trip(tmp_path):
    variables = _random_variables('resnet32_cifar', **SMALL_CIFAR)
    path = tmp_path / 'v.npz'
    save_variables_npz(variables, path)
    assert 'params/conv1/kernel' in np.load(path).files
    assert _tree_equal(load_variables_npz(path), jax.tree_util.tree_map(np.asarray, variables))
    assert [p.name for p in tmp_path.iterdir()] == ['v.npz']  # no temporary file left
    with pytest.raises(ValueError, match="contains '/'"):
        save_variables_npz({'a/b': np.zeros(1)}, tmp_path / 'bad.npz')


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run(
        [sys.executable, '-m', 'ljax.convert', *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope='module')
def torch_npz(tmp_path_factory):
    state = to_torch(_random_variables('resnet32_cifar', **SMALL_CIFAR), 'resnet32_cifar')
    path = tmp_path_factory.mktemp('cli') / 'torch.npz'
    np.savez(path, **state)
    return path


def test_cli_converts_and_refuses_to_overwrite(torch_npz, tmp_path):
    dst = tmp_path / 'out.npz'
    done = _cli(torch_npz, dst, '--arch', 'resnet32_cifar')
    assert done.returncode == 0, done.stderr
    assert 'params/fc/kernel' in np.load(dst).files
    assert _tree_equal(load_variables_npz(dst), from_torch(torch_npz, 'resnet32_cifar'))

    dst.write_bytes(b'keep me')
    refused = _cli(torch_npz, dst, '--arch', 'resnet32_cifar')
    assert refused.returncode == 2 and '--force' in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and dst.read_bytes() == b'keep me'

    forced = _cli(torch_npz, dst, '--arch', 'resnet32_cifar', '--force')
    assert forced.returncode == 0, forced.stderr
    assert 'params/fc/kernel' in np.load(dst).files


@pytest.mark.parametrize(
    'problem', ['corrupt_safetensors', 'corrupt_pth', 'wrong_arch', 'missing_file']
)
def test_cli_bad_input_is_one_line_and_exit_2(problem, torch_npz, tmp_path):
    src, arch = torch_npz, 'resnet32_cifar'
    if problem.startswith('corrupt'):
        src = tmp_path / (
            'broken.safetensors' if problem == 'corrupt_safetensors' else 'broken.pth'
        )
        src.write_bytes(b'\x00garbage')
    elif problem == 'wrong_arch':
        arch = 'vgg19_cifar'
    else:
        src = tmp_path / 'absent.pth'
    done = _cli(src, tmp_path / 'out.npz', '--arch', arch)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and 'Traceback' not in done.stderr
    assert not (tmp_path / 'out.npz').exists()


# ----------------------------------------------------------------------------- downloads


@pytest.fixture
def file_server(tmp_path):
    """Serves tmp_path/'served' on 127.0.0.1; yields (base URL, folder, request log)."""
    folder = tmp_path / 'served'
    folder.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(Handler, directory=folder)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}', folder, requests
    server.shutdown()
    server.server_close()


def test_download_verifies_and_caches(file_server, tmp_path, monkeypatch):
    for proxy in ('http_proxy', 'HTTP_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(proxy, raising=False)
    base, folder, requests = file_server
    payload = b'weights' * 1000
    name = f'tiny-{hashlib.sha256(payload).hexdigest()[:8]}.pth'
    (folder / name).write_bytes(payload)
    cache = tmp_path / 'cache'
    path = download_pretrained(f'{base}/{name}', cache)
    assert path == cache / name and path.read_bytes() == payload
    assert download_pretrained(f'{base}/{name}', cache) == path
    assert len(requests) == 1  # the second call used the cache


def test_download_checksum_mismatch_leaves_nothing(file_server, tmp_path, monkeypatch):
    for proxy in ('http_proxy', 'HTTP_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(proxy, raising=False)
    base, folder, _ = file_server
    (folder / 'tiny-deadbeef.pth').write_bytes(b'tampered')
    cache = tmp_path / 'cache'
    with pytest.raises(ValueError, match='checksum mismatch'):
        download_pretrained(f'{base}/tiny-deadbeef.pth', cache)
    assert list(cache.iterdir()) == []
    with pytest.raises(ValueError, match='torchvision://resnet50'):
        download_pretrained('resnet50', cache)
