"""ResNet for CIFAR (He et al. 2016, section 4.2) as in the authors' code (models/resnet_cifar.py).

conv3x3-BN-ReLU stem, three stages of n = (depth - 2) / 6 basic blocks, the first block of stages
2 and 3 with stride 2, global average pool, classifier `fc`. Shortcuts are "option A": parameter
free, a stride-2 subsample (rows and columns 0, 2, 4, ...) and zero channels padded on both sides
(`(out - in) // 2` before, the rest after), exactly as their `F.pad` does.

widths=(16, 32, 64) is He et al.'s ResNet-32 (0.46M params); the authors' checkpoints use
(32, 64, 128) (1.85M params). Their `fc` is a 1x1 convolution; here it is a `Dense`.

Param names: `conv1`, `bn1`, `layer{s}_{b}` (stage s in 1..3, block b from 0) holding `conv1`,
`bn1`, `conv2`, `bn2`; `fc`. These are the torch keys with '.' turned into '_' at block level.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ljax.models.layers import Conv

_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _batch_norm(train: bool, axis_name: str | None, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name, name=name
    )


def _conv3x3(features: int, stride: int, name: str) -> Conv:
    # Explicit (1, 1) padding: "SAME" with stride 2 pads (0, 1), which is not PyTorch's padding=1.
    return Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        kernel_init=_conv_init,
        name=name,
    )


def option_a_shortcut(x: jnp.ndarray, out_width: int, stride: int) -> jnp.ndarray:
    """Parameter-free shortcut: subsample by `stride`, zero-pad channels to `out_width` (NHWC)."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = out_width - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the option-A shortcut, then ReLU."""

    width: int
    stride: int = 1
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = _conv3x3(self.width, self.stride, 'conv1')(x)
        y = nn.relu(_batch_norm(train, self.bn_axis_name, 'bn1')(y))
        y = _conv3x3(self.width, 1, 'conv2')(y)
        y = _batch_norm(train, self.bn_axis_name, 'bn2')(y)
        return nn.relu(y + option_a_shortcut(x, self.width, self.stride))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs. Input NHWC float32; output (batch, num_classes)."""

    depth: int = 32
    widths: tuple[int, int, int] = (16, 32, 64)
    num_classes: int = 10
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f'ResNetCifar depth must be 6n+2 with n >= 1, got {self.depth}')
        if len(self.widths) != 3:
            raise ValueError(f'ResNetCifar needs 3 stage widths, got {self.widths}')
        blocks_per_stage = (self.depth - 2) // 6
        x = _conv3x3(self.widths[0], 1, 'conv1')(x)
        x = nn.relu(_batch_norm(train, self.bn_axis_name, 'bn1')(x))
        for stage, width in enumerate(self.widths, start=1):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 1 and block == 0 else 1
                x = BasicBlock(width, stride, self.bn_axis_name, name=f'layer{stage}_{block}')(
                    x, train
                )
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name='fc')(x)
